from __future__ import annotations

from itertools import islice

import pytest

from ann_mlp.errors import InputError
from ann_mlp.text import file_passages, stdlib_passages


def test_stdlib_splits_are_real_disjoint_text():
    calibration = list(islice(stdlib_passages("calibration"), 300))
    evaluation = list(islice(stdlib_passages("evaluation"), 300))
    assert len(calibration) == 300 and len(evaluation) == 300
    assert not set(calibration) & set(evaluation)
    assert all(len(p) >= 40 for p in calibration)
    # deterministic order
    assert list(islice(stdlib_passages("evaluation"), 20)) == evaluation[:20]


def test_file_passages_and_empty_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("First paragraph\nwraps here.\n\n\nSecond one.\n")
    assert file_passages(path) == ["First paragraph wraps here.", "Second one."]
    path.write_text("  \n\n \n")
    with pytest.raises(InputError, match="empty"):
        file_passages(path)
