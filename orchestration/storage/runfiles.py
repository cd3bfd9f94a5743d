"""The files of a run folder, wherever it lives: checkpoints, metrics, TensorBoard events, local copies.

Every run type (pretrain, sweep trials, continual runs, PPO runs, the pipeline) keeps the same layout::

    <output>/config.yaml  metrics.jsonl  summary.json  tokenizer.json  tensorboard/
    <output>/checkpoints/<prefix><N>/       e.g. step_000200/ or iter_0004/, each with a manifest.json

A checkpoint (like a published data bundle) is complete when its ``manifest.json`` exists and every file the
manifest lists is there with its size: the manifest is written last by ``copy_folder``, and when Ray Train
uploads a checkpoint folder in another order, a folder cut short by a crash still lacks a listed file. The
manifest also holds each file's SHA-256, which ``local_copy`` checks, so a damaged file is found before it is used.
Checkpoints are ordered by the number in their name, never by the name itself (``step_1000000`` is newer than
``step_999999``).

Example::

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> run = Location(tmp.name) / "run"
    >>> src = Path(tmp.name) / "made"; src.mkdir(); _ = (src / "weights.bin").write_bytes(b"x" * 10)
    >>> copy_folder(src, run / CHECKPOINTS / "step_000010")
    >>> [c.step for c in list_checkpoints(run, "step_")]
    [10]
    >>> log = MetricsLog(run / "metrics.jsonl"); log.append({"step": 10, "loss": 2.5}); log.rows()
    [{'step': 10, 'loss': 2.5}]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from orchestration.errors import StorageError
from orchestration.storage.location import Location

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
METRICS_FILE = "metrics.jsonl"


# --- manifests ----------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_manifest(folder: str | os.PathLike) -> dict:
    """Size and SHA-256 of every file in a local folder (its manifest.json excluded)."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"files": files}


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write ``make_manifest(folder)`` into the folder as manifest.json; returns it."""
    manifest = make_manifest(folder)
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def is_complete(manifest: dict, present: dict[str, int]) -> bool:
    """Whether every file a manifest lists is among ``present`` (relative path -> size) with its size."""
    return all(present.get(rel) == entry["size"] for rel, entry in manifest.get("files", {}).items())


def damaged_files(folder: str | os.PathLike, manifest: dict) -> list[str]:
    """Files of a local folder that are missing or differ from the manifest."""
    folder = Path(folder)
    bad = []
    for rel, entry in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            bad.append(rel)
    return bad


def read_manifest(location: Location) -> dict | None:
    """The manifest.json of a folder, or None when it has none (or an unreadable one)."""
    try:
        manifest = (location / MANIFEST).read_json()
    except (FileNotFoundError, StorageError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


# --- checkpoints --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredCheckpoint:
    """One complete checkpoint of a run."""
    step: int
    """The number in its folder name (optimizer step, PPO iteration, ...)."""
    location: Location
    """Its folder."""


def copy_folder(source: str | os.PathLike, target: Location) -> None:
    """Copy a local folder (a checkpoint, a data bundle) to ``target``, replacing what is there, with its manifest
    written last: readers see it complete or not at all."""
    manifest = make_manifest(source)
    target.remove()
    target.upload(source, exclude=(MANIFEST,))
    (target / MANIFEST).write_json(manifest, indent=1)


def _candidates(run: Location, prefix: str) -> tuple[list[tuple[int, str]], dict[str, dict[str, int]]]:
    """(step, folder name) of every folder named <prefix><digits> under <run>/checkpoints, newest first, and the
    files of each (from one recursive listing)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    per_folder: dict[str, dict[str, int]] = {}
    for rel, size in (run / CHECKPOINTS).files().items():
        if "/" in rel:
            folder, inner = rel.split("/", 1)
            per_folder.setdefault(folder, {})[inner] = size
    found = [(int(m.group(1)), name) for name in per_folder if (m := pattern.match(name))]
    return sorted(found, reverse=True), per_folder


def list_checkpoints(run: Location, prefix: str) -> list[StoredCheckpoint]:
    """The complete checkpoints <run>/checkpoints/<prefix><N>/ of a run, oldest first (ordered by N)."""
    found, files = _candidates(run, prefix)
    out = []
    for step, name in reversed(found):
        location = run / CHECKPOINTS / name
        manifest = read_manifest(location) if MANIFEST in files[name] else None
        if manifest is not None and is_complete(manifest, files[name]):
            out.append(StoredCheckpoint(step, location))
    return out


def latest_checkpoint(run: Location, prefix: str) -> StoredCheckpoint | None:
    """The newest complete checkpoint of a run, or None."""
    found, files = _candidates(run, prefix)
    for step, name in found:
        location = run / CHECKPOINTS / name
        manifest = read_manifest(location) if MANIFEST in files[name] else None
        if manifest is not None and is_complete(manifest, files[name]):
            return StoredCheckpoint(step, location)
    return None


def damaged_in_storage(location: Location) -> list[str]:
    """Files of a folder in storage that are missing or differ from its manifest ([] when it is intact); reads
    every file once, where it is stored."""
    manifest = read_manifest(location)
    if manifest is None:
        return [MANIFEST]
    bad = []
    for rel, entry in manifest["files"].items():
        try:
            digest, size = (location / rel).sha256()
        except FileNotFoundError:
            digest, size = "", -1
        if size != entry["size"] or digest != entry["sha256"]:
            bad.append(rel)
    return bad


def newest_intact_checkpoint(run: Location, prefix: str) -> StoredCheckpoint | None:
    """The newest complete checkpoint whose files all match their manifest; a damaged newer one is skipped with a
    warning that names it (a resume then continues from the previous one instead of failing on it)."""
    for checkpoint in reversed(list_checkpoints(run, prefix)):
        bad = damaged_in_storage(checkpoint.location)
        if not bad:
            return checkpoint
        log.warning("checkpoint %s is damaged (%s missing or not what was written); trying the one before it",
                    checkpoint.location, ", ".join(bad))
    return None


def prune_checkpoints(run: Location, prefix: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and the incomplete folders older than the newest
    complete one (left by a crash mid-write)."""
    complete = list_checkpoints(run, prefix)
    if not complete:
        return
    kept = {c.location for c in complete[-keep:]}
    newest = complete[-1].step
    for step, name in _candidates(run, prefix)[0]:
        location = run / CHECKPOINTS / name
        if location not in kept and step <= newest:
            location.remove()


# --- local copies -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_copy(location: Location, verify: bool = True) -> Iterator[Path]:
    """A local path holding the file or folder at ``location``: the path itself when it is local, else a
    temporary copy removed afterwards. A folder with a manifest is checked against it first (``verify``), so a
    damaged checkpoint raises StorageError naming the files instead of failing somewhere inside a loader."""
    if location.is_local:
        path = location.local_path
        tmp = None
    else:
        tmp = tempfile.mkdtemp(prefix="memtrain-copy-")
        path = location.download(Path(tmp) / (location.name or "copy"))
    try:
        if verify and path.is_dir() and (path / MANIFEST).is_file():
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise StorageError(f"{location}: its {MANIFEST} is damaged") from None
            bad = damaged_files(path, manifest)
            if bad:
                raise StorageError(f"{location} is damaged: {', '.join(bad)} missing or not what was written "
                                   "(size or SHA-256 differs)")
        yield path
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged(location: Location) -> Iterator[Path]:
    """A local temporary folder whose files are copied into the folder ``location`` when the block ends without an
    error: each file replaced atomically and durably, wherever ``location`` is."""
    tmp = tempfile.mkdtemp(prefix="memtrain-stage-")
    try:
        yield Path(tmp)
        location.upload(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- metrics.jsonl ------------------------------------------------------------------------------------------------

class MetricsLog:
    """A run's metrics.jsonl: one JSON object per line, appended durably.

    On a local path each row is appended and fsynced; an object store cannot append, so there the log keeps the
    file's text and rewrites the object with each row. A torn last line (a crash during an append) is skipped
    when reading.
    """

    def __init__(self, location: Location):
        self.location = location
        self._text: str | None = None  # object stores: the file as last written

    def rows(self) -> list[dict]:
        try:
            text = self.location.read_text()
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: skipping a damaged line %r", self.location, line[:80])
        return rows

    def append(self, row: dict) -> None:
        line = json.dumps(row, allow_nan=False) + "\n"
        if self.location.is_local:
            self.location.append_text(line)
            return
        if self._text is None:
            try:
                self._text = self.location.read_text()
            except FileNotFoundError:
                self._text = ""
        self._text += line
        self.location.write_text(self._text)

    def keep(self, predicate: Callable[[dict], bool]) -> list[dict]:
        """Rewrite the log (atomically) with only the rows ``predicate`` accepts; returns them."""
        rows = [r for r in self.rows() if predicate(r)]
        self._text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        self.location.write_text(self._text)
        return rows


def read_metrics(run: str | os.PathLike | Location) -> list[dict]:
    """The rows of a run folder's metrics.jsonl (empty when it has none)."""
    return MetricsLog(Location(run) / METRICS_FILE).rows()


# --- TensorBoard --------------------------------------------------------------------------------------------------

class TensorBoardLog:
    """TensorBoard scalars of a run in <output>/tensorboard: written in place on a local path, else into a local
    folder that ``flush(upload=True)`` copies to the run's storage (event files are appended to, which object
    stores cannot do)."""

    def __init__(self, location: Location, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.location = location
        self._stage = None if location.is_local else tempfile.mkdtemp(prefix="memtrain-tb-")
        folder = location.local_path if location.is_local else self._stage
        self._writer = SummaryWriter(str(folder), purge_step=purge_step)
        self._last_upload = 0.0

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        """Every int or float in ``values`` (bools aside) as ``<prefix>/<key>`` at ``step``."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self, upload: bool = False, min_interval_s: float = 0.0) -> None:
        self._writer.flush()
        if self._stage is not None and upload and time.monotonic() - self._last_upload >= min_interval_s:
            self.location.upload(self._stage)
            self._last_upload = time.monotonic()

    def close(self) -> None:
        self._writer.close()
        if self._stage is not None:
            self.location.upload(self._stage)
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
