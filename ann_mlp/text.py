"""Real text available offline: named sources found on the machine, or any text file.

Named sources (`SOURCES`), each split into a calibration part and an evaluation part (one in
four: module files for the standard library, passages for the others), so that what is measured
by default is text the tuner never saw:
- `stdlib`: the Python standard library's docstrings (program documentation, in code);
- `man`: the manual pages under /usr/share/man, from their roff source (terse command reference);
- `package-docs`: the descriptions of the installed Python distributions (READMEs, in prose);
- `licenses`: the licence texts under /usr/share/common-licenses (legal prose).
Calibrating and distilling on several unlike kinds (`DEFAULT_MIX`) makes what is tuned or
learned hold on kinds of text it never saw; `licenses`, left out of the mix, is the default
kind a report holds out.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import importlib.metadata
import inspect
import json
import re
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from ann_mlp.config import TextConfig
from ann_mlp.errors import InputError

Split = Literal["calibration", "evaluation"]
STDLIB_SOURCE = "stdlib"
MIN_PASSAGE_CHARS = 40
TEXT_SUFFIXES = {".txt", ".rst", ".md"}
_SKIP_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__"}


class _Replay:
    """A passage stream read once and replayed: every iteration yields what was read so far, then
    reads on. Passages are read lazily, so a caller that takes a few of a large source reads few."""

    def __init__(self, stream: Iterator[str]):
        self._stream: Iterator[str] | None = stream
        self._read: list[str] = []
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[str]:
        position = 0
        while True:
            with self._lock:
                if position == len(self._read):
                    passage = next(self._stream, None) if self._stream is not None else None
                    if passage is None:
                        self._stream = None
                        return
                    self._read.append(passage)
                passage = self._read[position]
            position += 1
            yield passage


def _read_once(reader: Callable[..., Iterator[str]]) -> Callable[..., Iterator[str]]:
    """A source reader whose passages are read from disk once per process. One build or sparsify
    asks for the same source several times (which sources the machine has, the calibration text,
    the check text), and reading the manual pages or parsing the standard library takes seconds."""
    replays: dict[tuple, _Replay] = {}
    lock = threading.Lock()

    @functools.wraps(reader)
    def replayed(*args) -> Iterator[str]:
        with lock:
            if args not in replays:
                replays[args] = _Replay(reader(*args))
            replay = replays[args]
        return iter(replay)

    return replayed


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _split_of(key: str) -> Split:
    # One module file (or passage) in four goes to evaluation; stable across machines and versions.
    return "evaluation" if hashlib.sha1(key.encode()).digest()[0] % 4 == 0 else "calibration"


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


@_read_once
def stdlib_passages(split: Split) -> Iterator[str]:
    """Docstrings of the standard library's modules in `split`, in a fixed pseudo-random module order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)]
    relative = {p: p.relative_to(root).as_posix() for p in files}
    ordered = sorted(files, key=lambda p: hashlib.sha1(relative[p].encode()).hexdigest())
    seen: set[str] = set()
    for path in ordered:
        if _split_of(relative[path]) != split:
            continue
        for doc in _docstrings(path):
            if len(doc) >= MIN_PASSAGE_CHARS and doc not in seen:
                seen.add(doc)
                yield doc


MAN_ROOT = Path("/usr/share/man")
LICENSE_ROOT = Path("/usr/share/common-licenses")
# A passage is prose when letters and spaces make most of it: option tables, code and URLs are not.
MIN_PROSE_SHARE = 0.8


def _is_prose(passage: str) -> bool:
    return len(passage) >= MIN_PASSAGE_CHARS and sum(c.isalpha() or c == " " for c in passage) >= MIN_PROSE_SHARE * len(
        passage
    )


def _in_fixed_order(names: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())


def _split_prose(passages: Iterator[str], split: Split) -> Iterator[str]:
    """The prose passages of `split`, each once. Split by passage, not by file: pages and
    READMEs share boilerplate paragraphs, which a split by file would put in both."""
    seen: set[str] = set()
    for passage in passages:
        if passage not in seen and _is_prose(passage) and _split_of(passage) == split:
            seen.add(passage)
            yield passage


# roff: font and size changes, named characters and strings, and the escapes that print nothing.
_ROFF_CHARACTERS = {"em": "—", "en": "–", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "•"}
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|([-e &%c|^~0:]))"
)
_ROFF_BREAKS = {"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "sp", "br", "TH", "RS", "RE", "nf", "fi", "EX", "EE"}
_ROFF_FONT_LINES = {"B", "I", "R", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI"}


def _roff_escape(match: re.Match) -> str:
    named, bracketed, plain = match.group(1), match.group(2), match.group(3)
    if named or bracketed:
        return _ROFF_CHARACTERS.get(named or bracketed, "")
    return {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " "}.get(plain or "", "")


def roff_passages(source: str) -> list[str]:
    """The paragraphs of a manual page's roff source as plain text: sections, paragraphs and
    displays break passages, font macros keep their words, every other request is dropped."""
    found: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            found.append(_clean(" ".join(current)))
            current.clear()

    def text(line: str) -> str:
        return re.sub(r"\\.", "", _ROFF_ESCAPE.sub(_roff_escape, line))  # then escapes that print nothing known

    skipping_until = None  # inside a table (.TS ... .TE) or a macro definition (.de ... ..)
    for line in source.splitlines():
        if skipping_until is not None:
            if line.strip() == skipping_until:
                skipping_until = None
            continue
        if line.startswith((".", "'")):
            request, _, arguments = line[1:].strip().partition(" ")
            if request in ("TS", "de", "de1", "am"):
                flush()
                skipping_until = ".TE" if request == "TS" else ".."
            elif request in _ROFF_BREAKS:
                flush()
            elif request in _ROFF_FONT_LINES:
                current.append(text(arguments.replace('"', "")))
            continue
        if not line.strip():
            flush()
            continue
        current.append(text(line))
    flush()
    return found


def _families_in_turn(names: list[str]) -> list[str]:
    """Manual pages ordered so that every family (`git`, `git-commit`, `git-log`, ... are one) gives
    its first page before any gives its second: one large suite must not make a whole mix."""
    rank: dict[str, int] = {}
    keyed = []
    for name in names:  # already in a fixed pseudo-random order
        family = re.split(r"[._-]", Path(name).name, maxsplit=1)[0]
        keyed.append((rank.get(family, 0), len(keyed), name))
        rank[family] = rank.get(family, 0) + 1
    return [name for *_, name in sorted(keyed)]


@_read_once
def man_passages(split: Split, root: Path = MAN_ROOT) -> Iterator[str]:
    """Prose paragraphs of the English manual pages under `root` (man1 ... man8), in a fixed order;
    a page that only points to another (`.so`) is skipped."""
    pages = {p.relative_to(root).as_posix(): p for p in root.glob("man[1-8]/*") if p.is_file()} if root.is_dir() else {}
    return _split_prose(_man_page_passages(pages), split)


def _man_page_passages(pages: dict[str, Path]) -> Iterator[str]:
    for name in _families_in_turn(_in_fixed_order(list(pages))):
        path = pages[name]
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            source = raw.decode("utf-8", errors="replace")
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if source.lstrip().startswith(".so "):
            continue
        yield from roff_passages(source)


@_read_once
def package_doc_passages(split: Split) -> Iterator[str]:
    """Prose paragraphs of the installed Python distributions' descriptions (their READMEs)."""
    descriptions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        if name and isinstance(body, str) and name not in descriptions:
            descriptions[name] = body
    return _split_prose(_markdown_paragraphs(descriptions[n] for n in _in_fixed_order(list(descriptions))), split)


def _markdown_paragraphs(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for paragraph in re.split(r"\n\s*\n", document):
            paragraph = re.sub(r"<[^>]*>|https?://\S+", " ", paragraph)  # HTML tags, addresses
            paragraph = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", paragraph)  # [text](link): the text
            yield _clean(re.sub(r"[#*`>|=_~\[\]]+", " ", paragraph))  # markup characters


@_read_once
def license_passages(split: Split, root: Path = LICENSE_ROOT) -> Iterator[str]:
    """Prose paragraphs of the licence texts under `root`."""
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    texts = (path.read_text(encoding="utf-8", errors="replace") for path in files)
    return _split_prose((_clean(p) for text in texts for p in re.split(r"\n\s*\n", text)), split)


SOURCES: dict[str, Callable[[Split], Iterator[str]]] = {
    STDLIB_SOURCE: stdlib_passages,
    "man": man_passages,
    "package-docs": package_doc_passages,
    "licenses": license_passages,
}
SOURCE_NAMES = {
    STDLIB_SOURCE: "python-stdlib-docstrings",
    "man": "man-pages",
    "package-docs": "python-package-docs",
    "licenses": "licenses",
}
# Three unlike kinds: documentation in code, command reference, project prose.
DEFAULT_MIX = (STDLIB_SOURCE, "man", "package-docs")
HELD_OUT_SOURCE = "licenses"  # the kind no default calibration or training uses


def source_passages(name: str, split: Split) -> Iterator[str]:
    """A named source's passages in `split`; an error when this machine has none of it."""
    stream = SOURCES[name](split)
    first = next(stream, None)
    if first is None:
        raise InputError(f"the text source {name!r} has no {split} passages on this machine")
    yield first
    yield from stream


def available_sources(names: Sequence[str], split: Split = "calibration") -> list[str]:
    """The named sources this machine has text of (a default mix uses what it finds)."""
    return [name for name in names if next(SOURCES[name](split), None) is not None]


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


def passages(source: str | Path | None, split: Split, fmt: TextConfig = TextConfig()) -> Iterator[str]:
    """A named source's `split`, the user's file or folder, or by default the standard library's split."""
    if source is None:
        return stdlib_passages(split)
    return source_passages(str(source), split) if is_named(source) else iter(corpus_passages([Path(source)], fmt))


def mixed_passages(
    sources: Sequence[str | Path],
    split: Split,
    fmt: TextConfig = TextConfig(),
    split_files: bool = False,
    balanced: bool = False,
) -> Iterator[str]:
    """Passages taken in turn from each source, so that a token budget covers every source alike:
    a named source (SOURCES) in `split`, a text file, or a folder of them (whole, or with
    `split_files` their passages in `split`, one in four to evaluation). No sources: the default
    mix, of what this machine has. `balanced`: the mix ends with its shortest source.

    Calibrating on several kinds of text makes an index's tuned recall hold on text of other
    kinds (README, "Fidelity frontier")."""
    streams = []
    for source in list(sources) or default_mix():
        if is_named(source):
            streams.append(source_passages(str(source), split))
            continue
        found = corpus_passages([Path(source)], fmt)
        streams.append(iter([p for p in found if _split_of(p) == split] if split_files else found))
    return _in_turn(streams, balanced)


def calibration_passages(sources: Sequence[str | Path], fmt: TextConfig = TextConfig()) -> Iterator[str]:
    return mixed_passages(sources, "calibration", fmt)


def default_mix() -> list[str]:
    return available_sources(DEFAULT_MIX)


def is_named(source: str | Path) -> bool:
    return isinstance(source, str) and source in SOURCES


def _in_turn(streams: list[Iterator[str]], balanced: bool = False) -> Iterator[str]:
    """One passage of each stream in turn; a stream that ends drops out, or with `balanced` the
    whole mix ends there, so that every source gives as many passages as the others."""
    while streams:
        for stream in list(streams):
            passage = next(stream, None)
            if passage is None and balanced:
                return
            if passage is None:
                streams.remove(stream)
            else:
                yield passage


def describe_mix(sources: Sequence[str | Path], split: Split, fmt: TextConfig = TextConfig()) -> str:
    return " + ".join(describe(source, split, fmt) for source in list(sources) or default_mix())


def describe_calibration(sources: Sequence[str | Path], fmt: TextConfig = TextConfig()) -> str:
    return describe_mix(sources, "calibration", fmt)


def recorded_sources(sources: Sequence[str | Path]) -> list[str]:
    """The sources as a manifest records them: names, or absolute paths (a rebuild may run elsewhere)."""
    return [
        str(source) if is_named(source) else str(Path(source).resolve()) for source in list(sources) or default_mix()
    ]


def describe(source: str | Path | None, split: Split, fmt: TextConfig = TextConfig()) -> str:
    """The text's name as reports give it: a named source and its split, the file and how it was
    read, a folder and its file count."""
    if source is None or is_named(source):
        return f"{SOURCE_NAMES[str(source or STDLIB_SOURCE)]}:{split}"
    path = Path(source)
    if path.is_dir():
        return f"{path} ({len(text_files(path))} files)"
    try:
        return f"{path} ({read_file(path, fmt)[1]})"
    except InputError:
        return str(path)
