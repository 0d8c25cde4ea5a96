from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_checkpoints import FAMILIES, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_tiny_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]
