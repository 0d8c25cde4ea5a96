"""The on-disk index store: manifest.json + one index per layer, every file checksummed.

A store is written into a hidden temporary folder beside its destination and
renamed into place only once complete, so an interrupted build never leaves a
folder that looks like a valid store. Loading checks the manifest against its own
checksum and every file against the manifest first: a missing, extra or altered
file is an error naming it. Stores of another format version are refused with a
request to rebuild rather than migrated: a build is minutes, and a migration would
have to reproduce the defaults older builds used, the very branches a version retires.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from ann_mlp import __version__
from ann_mlp.checkpoint import CheckpointSource, sha256_file
from ann_mlp.config import STORE_FORMAT_VERSION
from ann_mlp.errors import BackendError, CheckpointError, StoreError
from ann_mlp.index import MipsIndex, backend_class

MANIFEST = "manifest.json"
# Arrays a layer may store beside its index, each recorded in LayerEntry.<part>_file.
LAYER_ARRAYS = ("tail_mean", "tail_map", "up_codes", "up_ranges")


@dataclass
class LayerEntry:
    layer: int
    d_model: int
    d_ff: int
    gated: bool
    activation: str
    backend: str
    build_params: dict[str, Any]
    search_params: dict[str, Any]  # tuned query-time parameters
    effort_param: str
    effort_range: list[int]  # [lo, hi] allowed for effort_param at the store's k
    files: dict[str, str]  # file name -> sha256
    build_recall: float | None  # recall@k on held-out calibration tokens at search_params
    build_scanned_fraction: float | None
    build_seconds: float
    # recall@k at search_params on a kind of text other than the calibration's (BuildConfig.check_text)
    check_recall: float | None = None
    k: int | None = None  # this layer's k when chosen per layer (None: the store's k)
    plan: dict[str, Any] | None = None  # planner.plan_layer: where approximation pays (None: not measured)
    tail_mean_file: str | None = None  # (d_ff,) float32 .npy: build.dropped_mean, for the tail correction
    tail_map_file: str | None = None  # (r, d_model + 1 + d_model) float32 .npy: build.fit_tail_map
    # Held-out metrics.total_relative_error of the MLP output without and with the fitted map (None: not fit).
    tail_map_error: list[float] | None = None
    # Gated layers: neurons retrieved by gate score per token, of which the k with the largest estimated
    # |act(gate) * up| are kept (build.tune_candidates; None: k), estimated from these 8-bit codes of the
    # up rows: (d_ff, d_model) uint8 and their (2, d_model) float32 per-dimension minimum and range.
    candidates: int | None = None
    up_codes_file: str | None = None
    up_ranges_file: str | None = None

    def array_files(self) -> dict[str, str]:
        """The arrays stored beside the layer's index: part (one of LAYER_ARRAYS) -> file name."""
        return {part: name for part in LAYER_ARRAYS if (name := getattr(self, f"{part}_file"))}


@dataclass
class Manifest:
    name: str
    family: str
    kind: str
    backend: str
    k: int
    target_recall: float | None
    source: dict[str, Any]  # CheckpointSource.to_json()
    calibration: dict[str, Any]  # the text the build captured: its description, sources and counts
    build: dict[str, Any]  # BuildConfig.to_json(): every setting the build was given
    layers: list[LayerEntry]
    format_version: int = STORE_FORMAT_VERSION
    ann_mlp_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)  # plan_machine: where the plans were measured
    checksum: str = ""  # manifest_checksum of the rest, written by StoreWriter.commit

    def to_json(self) -> dict[str, Any]:
        """The manifest as stored: JSON types only (tuples as lists), with its checksum."""
        data = json.loads(json.dumps(asdict(self)))
        return {**data, "checksum": manifest_checksum(data)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """The manifest, its fields type-checked and its layers consistent; StoreError naming the first fault."""
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != STORE_FORMAT_VERSION:
            raise StoreError(
                f"store format version {version!r} is not supported (expected {STORE_FORMAT_VERSION}); "
                "rebuild it with `ann-mlp build ... --force`"
            )
        if data.get("checksum") != manifest_checksum(data):
            raise StoreError(
                f"{MANIFEST} does not match its checksum: it was edited or corrupted "
                "(rebuild the store with `ann-mlp build ... --force`)"
            )
        try:
            manifest = TypeAdapter(cls).validate_python(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise StoreError(f"malformed manifest: {where}: {first['msg']}") from None
        manifest.check_layers()
        return manifest

    def check_layers(self) -> None:
        """Layers in order, each naming only plain files of its own, its effort within its range."""
        if not self.layers:
            raise StoreError("malformed manifest: it lists no layers")
        for position, entry in enumerate(self.layers):
            if entry.layer != position:
                raise StoreError(f"malformed manifest: layer entry {position} is numbered {entry.layer}")
            for name in [*entry.files, *entry.array_files().values()]:
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise StoreError(f"malformed manifest: layer {entry.layer} names a file outside the store: {name}")
            for name in entry.array_files().values():
                if name not in entry.files:
                    raise StoreError(f"malformed manifest: layer {entry.layer}'s {name} has no checksum")
            try:
                defaults = backend_class(entry.backend).default_build_params(entry.d_ff, entry.d_model + 1)
            except BackendError:
                raise StoreError(
                    f"malformed manifest: layer {entry.layer}'s backend {entry.backend!r} is unknown"
                ) from None
            missing = sorted(set(defaults) - set(entry.build_params))
            if missing:
                raise StoreError(
                    f"malformed manifest: layer {entry.layer}'s build parameters lack {', '.join(missing)}"
                )
            lo, hi = entry.effort_range
            effort = entry.search_params.get(entry.effort_param)
            if effort is not None and not (isinstance(effort, int) and lo <= effort <= hi):
                raise StoreError(
                    f"malformed manifest: layer {entry.layer}'s {entry.effort_param} {effort!r} is outside [{lo}, {hi}]"
                )


def manifest_checksum(data: dict[str, Any]) -> str:
    """sha256 of the manifest's JSON without its checksum field, keys sorted, no spaces."""
    body = {name: value for name, value in data.items() if name != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


RESUME_KEY = "resume-key"  # in a resumable build's folder: the fingerprint of what it builds


ENTRY_PATTERN = "layer_*.entry.json"  # a finished layer's entry, in a resumable build's folder


def _entry_file(layer: int) -> str:
    return f"layer_{layer:03d}.entry.json"


def _locked_folder(folder: Path, dest: Path) -> int:
    """An open descriptor of `folder` holding its exclusive lock, which ends when it is closed (or
    the process ends): two builds of one store at once would write over each other's layers."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StoreError(f"another build is writing {dest} (its layers are in {folder})") from None
    return descriptor


def partial_folder(dest: Path) -> Path:
    """Where a resumable build of `dest` keeps its finished layers until it commits."""
    return dest.with_name(f".{dest.name}.partial")


class StoreWriter:
    """Write a store atomically: `with StoreWriter(dest) as w: w.add_layer(...); w.commit(manifest)`.

    A resumable writer (`resume_key`: a fingerprint of the checkpoint, the settings and the text)
    works in `.<name>.partial` beside the destination and keeps that folder when the build stops
    before its commit, once a layer is finished: the next build of the same fingerprint takes
    every finished layer from it (`finished_layer`) instead of building it again. A layer counts
    as finished only once its files and then its entry are written, the entry last and by rename.
    """

    def __init__(self, dest: Path, overwrite: bool = False, resume_key: str | None = None) -> None:
        self.dest = Path(dest)
        if self.dest.exists() and not overwrite:
            raise StoreError(f"{self.dest} already exists (use --force to replace it)")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.resumable = resume_key is not None
        if resume_key is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        else:
            self.tmp = partial_folder(self.dest)
            self.tmp.mkdir(exist_ok=True)
            self._lock = _locked_folder(self.tmp, self.dest)
            key_file = self.tmp / RESUME_KEY
            if not (key_file.is_file() and key_file.read_text() == resume_key):
                for stale in self.tmp.iterdir():  # another build's layers: of no use to this one
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            key_file.write_text(resume_key)
        self.committed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed and not (self.resumable and any(self.tmp.glob(ENTRY_PATTERN))):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.resumable:
            os.close(self._lock)

    def finished_layer(self, layer: int) -> LayerEntry | None:
        """The entry of a layer an earlier, stopped build of the same fingerprint finished, every
        file of it present and intact; None when there is none."""
        path = self.tmp / _entry_file(layer)
        if not self.resumable or not path.is_file():
            return None
        try:
            entry = TypeAdapter(LayerEntry).validate_json(path.read_text())
        except ValidationError:
            return None
        intact = all(
            (self.tmp / name).is_file() and sha256_file(self.tmp / name) == sha for name, sha in entry.files.items()
        )
        return entry if intact and entry.layer == layer else None

    def finish_layer(self, entry: LayerEntry) -> None:
        """Record a layer whose files are written as finished (resumable writers only)."""
        if self.resumable:
            path = self.tmp / _entry_file(entry.layer)
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(asdict(entry)))
            os.replace(partial, path)

    def load_finished(self, entry: LayerEntry, keys: np.ndarray) -> tuple[MipsIndex, dict[str, np.ndarray]]:
        """A finished layer's index and the arrays beside it, as a store loads them."""
        return load_layer_index(self.tmp, entry, keys), load_layer_arrays(self.tmp, entry)

    def add_layer(self, layer: int, index: MipsIndex) -> dict[str, str]:
        """Save one layer's index; return its files with checksums."""
        names = index.save(self.tmp, f"layer_{layer:03d}")
        return {name: sha256_file(self.tmp / name) for name in names}

    def add_array(self, layer: int, part: str, array: np.ndarray) -> dict[str, str]:
        """Save one per-layer array beside the index; return it with its checksum."""
        name = f"layer_{layer:03d}.{part}.npy"
        np.save(self.tmp / name, array, allow_pickle=False)
        return {name: sha256_file(self.tmp / name)}

    def commit(self, manifest: Manifest) -> Path:
        for record in [self.tmp / RESUME_KEY, *self.tmp.glob(ENTRY_PATTERN)]:
            record.unlink(missing_ok=True)  # what a resumed build needed; not part of a store
        path = self.tmp / MANIFEST
        with open(path, "w") as f:
            json.dump(manifest.to_json(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if self.dest.exists():  # --force: move the old store aside, swap, then delete it
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        self.committed = True
        return self.dest


def _listed_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


class Store:
    """A verified store: manifest plus lazily loaded per-layer indexes."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: Path | str) -> Store:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{path} is not an index store (no {MANIFEST})")
        try:
            manifest = Manifest.from_json(json.loads(manifest_path.read_text()))
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path} is corrupted: {err}") from err
        expected = {name: sha for entry in manifest.layers for name, sha in entry.files.items()}
        present = _listed_files(path) - {MANIFEST}
        for name in sorted(set(expected) - present):
            raise StoreError(f"store {path} is missing {name}")
        for name in sorted(present - set(expected)):
            raise StoreError(f"store {path} has an unexpected file {name}")
        for name, sha in sorted(expected.items()):
            if sha256_file(path / name) != sha:
                raise StoreError(f"store {path}: {name} is corrupted (sha256 mismatch)")
        return cls(path, manifest)

    def file_bytes(self) -> int:
        """Bytes of the store's layer files: what serving holds beside the model, less any keys
        an index shares with it (an IVF's float32 lists, which the model then reads)."""
        return sum((self.path / name).stat().st_size for entry in self.manifest.layers for name in entry.files)

    def load_index(self, layer: int, keys: np.ndarray) -> MipsIndex:
        """keys: the layer's augmented keys (d_ff, d_model + 1) from the verified checkpoint."""
        return load_layer_index(self.path, self.manifest.layers[layer], keys)

    def load_layer_arrays(self, layer: int) -> dict[str, np.ndarray]:
        return load_layer_arrays(self.path, self.manifest.layers[layer])

    def verify_source(self, source: CheckpointSource) -> None:
        """Refuse a checkpoint whose weights are not the ones this store was built from."""
        built_from = self.manifest.source["weight_files"]
        if built_from != source.weight_files:
            raise CheckpointError(
                f"store {self.path} was built from other weights ({self.manifest.source['spec']}), not {source.spec}"
            )


def load_layer_index(folder: Path, entry: LayerEntry, keys: np.ndarray) -> MipsIndex:
    """A layer's index from `folder`; keys: its augmented keys (d_ff, d_model + 1) from the checkpoint."""
    if keys.shape != (entry.d_ff, entry.d_model + 1):
        raise StoreError(
            f"store {folder}: layer {entry.layer} was built for {entry.d_ff}x{entry.d_model} keys, "
            f"the checkpoint's are {keys.shape[0]}x{keys.shape[1] - 1}"
        )
    return backend_class(entry.backend).load(
        folder, f"layer_{entry.layer:03d}", keys, entry.build_params, entry.search_params
    )


def load_layer_arrays(folder: Path, entry: LayerEntry) -> dict[str, np.ndarray]:
    """The arrays beside a layer's index, those it has: its tail correction {"tail_mean": (d_ff,),
    "tail_map": (r, 2 d_model + 1)} and up codes {"up_codes": (d_ff, d_model), "up_ranges": (2, d_model)}."""
    return {part: np.load(folder / name, allow_pickle=False) for part, name in entry.array_files().items()}
