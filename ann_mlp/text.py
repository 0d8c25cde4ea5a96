"""Real text available offline: Python standard library docstrings, or any text file.

The standard library is split by module file into a calibration part and an
evaluation part, so that `eval` by default measures on text the tuner never saw.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

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


def file_passages(path: Path) -> list[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file; an error if there are none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read text file {path}: {err}") from err
    passages = [_clean(p) for p in re.split(r"\n\s*\n", text)]
    passages = [p for p in passages if p]
    if not passages:
        raise InputError(f"text file {path} is empty")
    return passages


def corpus_passages(paths: list[Path]) -> list[str]:
    """Paragraphs of text files; a folder stands for its .txt, .rst and .md files. An error if none."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        else:
            files.append(path)
    found = []
    for file in files:
        try:
            found += file_passages(file)
        except InputError:
            if file in paths:  # a file the user named must be readable text; a folder may hold empty ones
                raise
    if not found:
        raise InputError(f"no text in {', '.join(map(str, paths))}")
    return found


def passages(path: Path | None, split: Split) -> Iterator[str]:
    """The user's file when given, else the standard library split."""
    return iter(file_passages(path)) if path is not None else stdlib_passages(split)


def calibration_passages(sources: Sequence[str | Path]) -> Iterator[str]:
    """Passages taken in turn from each source, so that a token budget covers every source alike:
    `stdlib` (the standard library's calibration split), a text file, or a folder of them. No
    sources: the standard library's.

    Calibrating on several kinds of text makes an index's tuned recall hold on text of other
    kinds (README, "Fidelity frontier")."""
    if not sources:
        return stdlib_passages("calibration")
    streams = [stdlib_passages("calibration") if _is_stdlib(source) else iter(corpus_passages([Path(source)]))
               for source in sources]
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


def describe_calibration(sources: Sequence[str | Path]) -> str:
    return " + ".join(describe(None if _is_stdlib(source) else Path(source), "calibration")
                      for source in sources or [STDLIB_SOURCE])


def recorded_sources(sources: Sequence[str | Path]) -> list[str]:
    """The sources as a manifest records them: `stdlib`, or absolute paths (a rebuild may run elsewhere)."""
    return [STDLIB_SOURCE if _is_stdlib(source) else str(Path(source).resolve()) for source in sources]


def describe(path: Path | None, split: Split) -> str:
    return str(path) if path is not None else f"python-stdlib-docstrings:{split}"
