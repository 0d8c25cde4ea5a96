"""Real text available offline: Python standard library docstrings, or any text file.

The standard library is split by module file into a calibration part and an
evaluation part, so that `eval` by default measures on text the tuner never saw.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from ann_mlp.config import TextConfig
from ann_mlp.errors import InputError

Split = Literal["calibration", "evaluation"]
STDLIB_SOURCE = "stdlib"  # a calibration source naming the standard library's calibration split
MIN_PASSAGE_CHARS = 40
TEXT_SUFFIXES = {".txt", ".rst", ".md"}
_SKIP_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__"}


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _file_split(relative: str) -> Split:
    # One module in four goes to evaluation; stable across machines and versions.
    return "evaluation" if hashlib.sha1(relative.encode()).digest()[0] % 4 == 0 else "calibration"


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield _clean(inspect.cleandoc(doc))


def stdlib_passages(split: Split) -> Iterator[str]:
    """Docstrings of the standard library's modules in `split`, in a fixed pseudo-random module order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)]
    relative = {p: p.relative_to(root).as_posix() for p in files}
    ordered = sorted(files, key=lambda p: hashlib.sha1(relative[p].encode()).hexdigest())
    seen: set[str] = set()
    for path in ordered:
        if _file_split(relative[path]) != split:
            continue
        for doc in _docstrings(path):
            if len(doc) >= MIN_PASSAGE_CHARS and doc not in seen:
                seen.add(doc)
                yield doc


JSONL_SUFFIXES = {".jsonl", ".ndjson"}
DEFAULT_JSONL_FIELD = "text"


def read_file(path: Path, fmt: TextConfig = TextConfig()) -> tuple[list[str], str]:
    """(passages, how the file was read) of a UTF-8 text or JSON Lines file; an error if there are none.

    fmt.split and fmt.jsonl_field say how (TextConfig): paragraphs, lines, or one passage per
    JSON record; "auto" takes each line as a passage when the file has no blank line, since a
    file of one-line entries would otherwise be a single passage.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read text file {path}: {err}") from err
    if fmt.jsonl_field is not None or path.suffix in JSONL_SUFFIXES:
        field = fmt.jsonl_field or DEFAULT_JSONL_FIELD
        found, how = _jsonl_passages(path, text, field), f"JSON Lines, field {field!r}"
    else:
        lines = fmt.split == "lines" or (fmt.split == "auto" and not re.search(r"\n\s*\n", text.strip()))
        pieces = text.splitlines() if lines else re.split(r"\n\s*\n", text)
        how = (
            ("one passage per line" + (" (no blank lines)" if fmt.split == "auto" else ""))
            if lines
            else "one passage per paragraph"
        )
        found = [_clean(p) for p in pieces]
    found = [p for p in found if p]
    if not found:
        raise InputError(f"text file {path} is empty")
    return found, how


def _jsonl_passages(path: Path, text: str, field: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not a JSON record ({err.msg})") from err
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise InputError(
                f"{path}:{number}: the record has no text field {field!r} (name the field with --jsonl-field)"
            )
        found.append(_clean(value))
    return found


def file_passages(path: Path, fmt: TextConfig = TextConfig()) -> list[str]:
    return read_file(path, fmt)[0]


def text_files(path: Path) -> list[Path]:
    """A file, or a folder's text files (.txt, .rst, .md, .jsonl, .ndjson) in name order."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES and p.is_file())
    return [path]


def corpus_passages(paths: list[Path], fmt: TextConfig = TextConfig()) -> list[str]:
    """Passages of text files; a folder stands for its text files. An error if none."""
    found = []
    for path in paths:
        for file in text_files(path):
            try:
                found += file_passages(file, fmt)
            except InputError:
                if file == Path(path):  # a file the user named must be readable text; a folder may hold empty ones
                    raise
    if not found:
        raise InputError(f"no text in {', '.join(map(str, paths))}")
    return found


def passages(path: Path | None, split: Split, fmt: TextConfig = TextConfig()) -> Iterator[str]:
    """The user's file or folder when given, else the standard library split."""
    return iter(corpus_passages([path], fmt)) if path is not None else stdlib_passages(split)


def calibration_passages(sources: Sequence[str | Path], fmt: TextConfig = TextConfig()) -> Iterator[str]:
    """Passages taken in turn from each source, so that a token budget covers every source alike:
    `stdlib` (the standard library's calibration split), a text file, or a folder of them. No
    sources: the standard library's.

    Calibrating on several kinds of text makes an index's tuned recall hold on text of other
    kinds (README, "Fidelity frontier")."""
    if not sources:
        return stdlib_passages("calibration")
    streams = [
        stdlib_passages("calibration") if _is_stdlib(source) else iter(corpus_passages([Path(source)], fmt))
        for source in sources
    ]
    return _in_turn(streams)


def _is_stdlib(source: str | Path) -> bool:
    return str(source) == STDLIB_SOURCE


def _in_turn(streams: list[Iterator[str]]) -> Iterator[str]:
    while streams:
        for stream in list(streams):
            passage = next(stream, None)
            if passage is None:
                streams.remove(stream)
            else:
                yield passage


def describe_calibration(sources: Sequence[str | Path], fmt: TextConfig = TextConfig()) -> str:
    return " + ".join(
        describe(None if _is_stdlib(source) else Path(source), "calibration", fmt)
        for source in sources or [STDLIB_SOURCE]
    )


def recorded_sources(sources: Sequence[str | Path]) -> list[str]:
    """The sources as a manifest records them: `stdlib`, or absolute paths (a rebuild may run elsewhere)."""
    return [STDLIB_SOURCE if _is_stdlib(source) else str(Path(source).resolve()) for source in sources]


def describe(path: Path | None, split: Split, fmt: TextConfig = TextConfig()) -> str:
    """The text's name as reports give it: the file and how it was read, a folder and its file count."""
    if path is None:
        return f"python-stdlib-docstrings:{split}"
    path = Path(path)
    if path.is_dir():
        return f"{path} ({len(text_files(path))} files)"
    try:
        return f"{path} ({read_file(path, fmt)[1]})"
    except InputError:
        return str(path)
