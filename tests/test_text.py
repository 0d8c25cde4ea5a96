from __future__ import annotations

from itertools import islice

import pytest

from ann_mlp.errors import InputError
from ann_mlp.text import calibration_passages, describe_calibration, file_passages, stdlib_passages


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


def test_calibration_sources_are_taken_in_turn(tmp_path):
    """Mixed sources alternate passage by passage, so a token budget covers each alike; a folder
    is one source; `stdlib` is the standard library's calibration split, also the default."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Note one.\n\nNote two.\n\nNote three.\n")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.rst").write_text("Doc one.\n\nDoc two.\n")
    (docs / "sub" / "b.md").write_text("Doc three.\n")
    assert list(calibration_passages([notes, docs])) == [
        "Note one.", "Doc one.", "Note two.", "Doc two.", "Note three.", "Doc three."]
    first_stdlib = list(islice(stdlib_passages("calibration"), 2))
    assert list(islice(calibration_passages(["stdlib", notes]), 4)) == [
        first_stdlib[0], "Note one.", first_stdlib[1], "Note two."]
    assert list(islice(calibration_passages([]), 2)) == first_stdlib
    assert describe_calibration([]) == "python-stdlib-docstrings:calibration"
    assert describe_calibration(["stdlib", notes]) == f"python-stdlib-docstrings:calibration + {notes}"
    with pytest.raises(InputError, match="cannot read"):
        calibration_passages([tmp_path / "missing.txt"])
