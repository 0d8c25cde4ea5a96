from __future__ import annotations

from itertools import islice

import pytest

from ann_mlp.capture import TextStats, batches
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import EvalConfig, TextConfig
from ann_mlp.errors import InputError
from ann_mlp.text import (
    DEFAULT_MIX,
    SOURCES,
    _read_once,
    calibration_passages,
    corpus_passages,
    describe,
    describe_calibration,
    file_passages,
    man_passages,
    mixed_passages,
    read_file,
    roff_passages,
    stdlib_passages,
)


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
        "Note one.",
        "Doc one.",
        "Note two.",
        "Doc two.",
        "Note three.",
        "Doc three.",
    ]
    first_stdlib = list(islice(stdlib_passages("calibration"), 2))
    assert list(islice(calibration_passages(["stdlib", notes]), 4)) == [
        first_stdlib[0],
        "Note one.",
        first_stdlib[1],
        "Note two.",
    ]
    mix = [next(SOURCES[name]("calibration")) for name in DEFAULT_MIX]
    assert list(islice(calibration_passages([]), len(mix))) == mix  # the default: one passage of each in turn
    assert (
        describe_calibration([])
        == "python-stdlib-docstrings:calibration + man-pages:calibration + python-package-docs:calibration"
    )
    assert (
        describe_calibration(["stdlib", notes])
        == f"python-stdlib-docstrings:calibration + {notes} (one passage per paragraph)"
    )
    with pytest.raises(InputError, match="cannot read"):
        calibration_passages([tmp_path / "missing.txt"])


def test_a_file_without_blank_lines_is_one_passage_per_line(tmp_path):
    entries = tmp_path / "entries.txt"
    entries.write_text("".join(f"Entry number {i} says something.\n" for i in range(3000)))
    passages, how = read_file(entries)
    assert len(passages) == 3000 and passages[7] == "Entry number 7 says something."
    assert how == "one passage per line (no blank lines)"
    assert describe(entries, "evaluation") == f"{entries} (one passage per line (no blank lines))"
    assert file_passages(entries, TextConfig(split="paragraphs")) == [" ".join(passages)]
    wrapped = tmp_path / "wrapped.txt"
    wrapped.write_text("A paragraph\nwrapped.\n\nAnother.\n")
    assert read_file(wrapped) == (["A paragraph wrapped.", "Another."], "one passage per paragraph")
    assert file_passages(wrapped, TextConfig(split="lines")) == ["A paragraph", "wrapped.", "Another."]


def test_json_lines_take_the_named_field_and_say_where_one_is_missing(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "First record."}\n\n{"text": "Second\\nrecord.", "id": 2}\n')
    assert read_file(records) == (["First record.", "Second record."], "JSON Lines, field 'text'")
    body = tmp_path / "body.json"  # any suffix, once a field is named
    body.write_text('{"body": "One."}\n{"body": "Two."}\n')
    assert file_passages(body, TextConfig(jsonl_field="body")) == ["One.", "Two."]
    with pytest.raises(InputError, match=r"body.json:1: the record has no text field 'text'"):
        file_passages(body, TextConfig(jsonl_field="text"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:2: not a JSON record"):
        file_passages(broken)


def test_a_folder_mixes_its_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("Line one.\nLine two.\n")
    (tmp_path / "b.jsonl").write_text('{"text": "A record."}\n')
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert corpus_passages([tmp_path]) == ["Line one.", "Line two.", "A record."]
    assert describe(tmp_path, "evaluation") == f"{tmp_path} (2 files)"


@pytest.mark.parametrize("bad", [dict(split="sentences"), dict(long_passages="drop"), dict(jsonl_field="")])
def test_text_options_are_checked(bad):
    with pytest.raises(InputError):
        TextConfig(**bad)


def test_long_passages_are_split_into_windows_or_cut_and_counted(tiny_checkpoints):
    checkpoint = load_checkpoint(str(tiny_checkpoints["opt"]))  # one token per byte
    texts = ["x" * 100, "short", "y" * 30]
    split = TextStats()
    lengths = [
        int(row.sum())
        for batch in batches(checkpoint, texts, TextConfig(max_seq_len=32, batch_size=4), split)
        for row in batch.mask
    ]
    assert lengths == [32, 32, 32, 4, 5, 30]  # the long passage in windows, every token run
    assert split.tokens == 135 and split.passages == 3 and split.sequences == 6
    assert (split.split, split.truncated, split.limit, split.whole_text) == (1, 0, 32, True)
    cut = TextStats()
    list(batches(checkpoint, texts, TextConfig(max_seq_len=32, batch_size=4, long_passages="cut"), cut))
    assert (cut.tokens, cut.passages, cut.truncated, cut.split) == (32 + 5 + 30, 3, 1, 0)
    assert cut.warnings() == [
        "only 67 tokens measured: figures from fewer than 1000 tokens are noisy",
        "1 of 3 passages were cut at 32 tokens",
    ]
    budget = TextStats()
    list(batches(checkpoint, ["z" * 20] * 50, TextConfig(max_tokens=100, max_seq_len=32, batch_size=4), budget))
    assert budget.tokens == 160 and budget.passages == 8 and not budget.whole_text  # two batches of four


def test_eval_reports_how_much_of_a_one_line_per_entry_file_it_measured(tiny_stores, tmp_path):
    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.evaluate import evaluate
    from ann_mlp.report import table

    entries = tmp_path / "entries.txt"
    entries.write_text("".join(f"Entry {i} is a sentence of its own.\n" for i in range(300)))
    model = ApproxModel.open(tiny_stores["tiny-llama"])
    report = evaluate(model, EvalConfig(text=TextConfig(max_tokens=100_000)), entries, progress=False)
    text = report.to_json()["text"]
    assert text["passages"] == 300 and text["whole_text"] and text["truncated"] == 0 == text["split"]
    assert text["tokens"] == sum(len(f"Entry {i} is a sentence of its own.") for i in range(300))  # bytes
    assert text["source"] == f"{entries} (one passage per line (no blank lines))"
    assert f"{text['tokens']} tokens in 300 passages" in table(report)
    short = evaluate(model, EvalConfig(text=TextConfig(max_tokens=50)), entries, progress=False)
    assert "warning: only" in table(short) and not short.text["whole_text"]


MAN_PAGE = r""".\\" a comment
.TH GREP 1 2024 "GNU" "User Commands"
.SH NAME
grep \- print lines that match patterns
.SH DESCRIPTION
.B grep
searches for
.I PATTERNS
in each
\fIFILE\fR, and prints each line that matches a pattern \(em the \f[B]whole\f[] line.
.TS
allbox;
l l.
not	prose
.TE
.de XX
.ft B
..
.PP
Typically \*(lqPATTERNS\*(rq should be quoted when grep is used in a shell command\&.
"""


def test_roff_pages_become_plain_paragraphs():
    """Sections and paragraphs break passages; font macros keep their words; escapes print what
    they stand for or nothing; tables and macro definitions are dropped."""
    assert roff_passages(MAN_PAGE) == [
        "grep - print lines that match patterns",
        "grep searches for PATTERNS in each FILE, and prints each line that matches a pattern — the whole line.",
        "Typically PATTERNS should be quoted when grep is used in a shell command.",
    ]


def test_man_pages_split_by_page_and_take_families_in_turn(tmp_path):
    """A page goes whole to one split; a page that only includes another (.so) gives nothing; every
    family gives its first page before any gives its second."""
    import gzip

    (tmp_path / "man1").mkdir()
    (tmp_path / "man7").mkdir()
    body = "\n.PP\nThe {name} command does something useful for people who run it every day.\n"
    names = [f"suite-{i}" for i in range(12)] + ["alpha", "beta", "gamma", "delta"]
    for name in names:
        (tmp_path / "man1" / f"{name}.1.gz").write_bytes(gzip.compress(body.format(name=name).encode()))
    (tmp_path / "man7" / "alias.7").write_text(".so man1/alpha.1\n")
    calibration = list(man_passages("calibration", tmp_path))
    evaluation = list(man_passages("evaluation", tmp_path))
    assert sorted(calibration + evaluation) == sorted(body.format(name=n).split("\n")[2] for n in names)
    assert not set(calibration) & set(evaluation)
    others = {p.split()[1] for p in calibration if not p.split()[1].startswith("suite")}
    first_suite = next(i for i, p in enumerate(calibration) if p.split()[1].startswith("suite"))
    assert first_suite <= len(others)  # one suite page among the families' first pages, not ahead of them all
    assert list(man_passages("calibration", tmp_path / "none")) == []


def test_named_sources_have_disjoint_splits_and_a_missing_one_is_an_error(monkeypatch):
    for name, source in SOURCES.items():
        calibration = list(islice(source("calibration"), 200))
        evaluation = list(islice(source("evaluation"), 200))
        assert calibration and evaluation, name
        assert not set(calibration) & set(evaluation), name
        assert all(len(p) >= 40 for p in calibration + evaluation), name
    monkeypatch.setitem(SOURCES, "man", lambda split: iter(()))  # a machine without manual pages
    with pytest.raises(InputError, match="'man' has no calibration passages"):
        next(mixed_passages(["man"], "calibration"))
    assert describe_calibration([]) == "python-stdlib-docstrings:calibration + python-package-docs:calibration"


def test_a_balanced_mix_ends_with_its_shortest_source(tmp_path):
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("S one.\n\nS two.\n")
    long.write_text("L one.\n\nL two.\n\nL three.\n\nL four.\n")
    assert list(mixed_passages([short, long], "calibration", balanced=True)) == ["S one.", "L one.", "S two.", "L two."]
    assert len(list(mixed_passages([short, long], "calibration"))) == 6


def test_a_source_is_read_from_disk_once_and_replayed_alike():
    reads = []

    @_read_once
    def counted(split):
        reads.append(split)
        yield from (f"{split} passage {i}" for i in range(5))

    first = counted("calibration")
    assert [next(first), next(first)] == ["calibration passage 0", "calibration passage 1"]
    assert list(counted("calibration")) == [f"calibration passage {i}" for i in range(5)]  # replays, then reads on
    assert list(first) == [f"calibration passage {i}" for i in range(2, 5)]
    assert list(counted("evaluation"))[0] == "evaluation passage 0"
    assert reads == ["calibration", "evaluation"]
