"""Data bundles: files made once (token shards, a tokenizer, a task stream), published to shared storage and
cached once per node.

The driver builds a bundle into its node's cache, ``<cache_dir>/<digest>/``, publishes it to a shared location
and hands the workers a ``BundleRef`` (through Ray). A worker calls ``fetch_bundle(ref, cache_dir)``: on a node that
already holds the bundle (the driver's, or one where another worker fetched it) nothing is copied; elsewhere one
process per node downloads it under a file lock, checks every file's size and SHA-256 against the manifest and
renames the folder into place; the node's other processes wait on the lock and then read the same files. So no
path made on one node's disk is ever opened on another, and a node copies each bundle once however many workers
it runs.

Example::

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> cache, shared = f"{tmp.name}/cache", Location(tmp.name) / "shared"
    >>> local = build_bundle(cache, "abc123", lambda d: (d / "train.txt").write_text("tokens"))
    >>> ref = publish_bundle(local, shared / "abc123")
    >>> (fetch_bundle(ref, f"{tmp.name}/other-cache") / "train.txt").read_text()   # another node's cache
    'tokens'
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from orchestration.errors import StorageError
from orchestration.storage.location import Location
from orchestration.storage.runfiles import (MANIFEST, copy_folder, damaged_files, is_complete, read_manifest,
                                            write_manifest)


@dataclass(frozen=True)
class BundleRef:
    """Where a published bundle lives, and the digest that names its content (the node caches' key)."""
    digest: str
    uri: str


def _cache(cache_dir: str | os.PathLike) -> Path:
    # the cache is this node's own by design: each node keeps its copy
    path = Path(os.path.expanduser(os.fspath(cache_dir)))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this node (released when the holder exits, even by a crash)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete_local(folder: Path) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    manifest = json.loads((folder / MANIFEST).read_text())
    present = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return is_complete(manifest, present)


def _move_into_place(tmp: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete leftover of a crash
    os.replace(tmp, folder)
    fd = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _once_per_node(cache_dir: str | os.PathLike, digest: str, make: Callable[[Path], None]) -> Path:
    """The complete folder ``<cache_dir>/<digest>`` of this node: there already, or made by ``make(tmp)`` in a
    temporary folder renamed into place, by one process of the node at a time."""
    cache = _cache(cache_dir)
    folder = cache / digest
    if _is_complete_local(folder):
        return folder
    with _node_lock(cache / f"{digest}.lock"):
        if _is_complete_local(folder):  # another process of this node made it while we waited
            return folder
        tmp = cache / f".{digest}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            make(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _move_into_place(tmp, folder)
    return folder


def build_bundle(cache_dir: str | os.PathLike, digest: str, build: Callable[[Path], object]) -> Path:
    """The bundle ``<cache_dir>/<digest>`` on this node, made by ``build(folder)`` (which writes the files) unless
    it is there already; once per node, under a lock."""
    def make(tmp: Path) -> None:
        tmp.mkdir()
        build(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        write_manifest(tmp)

    return _once_per_node(cache_dir, digest, make)


def publish_bundle(folder: str | os.PathLike, target: Location) -> BundleRef:
    """Copy a local bundle (made by ``build_bundle``) to shared storage, unless ``target`` already holds it."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if read_manifest(target) != manifest:
        copy_folder(folder, target)
    return BundleRef(folder.name, target.uri)


def fetch_bundle(ref: BundleRef, cache_dir: str | os.PathLike) -> Path:
    """The local folder of a published bundle on this node: ``<cache_dir>/<digest>``, downloaded and checked
    once per node."""
    def download(tmp: Path) -> None:
        try:
            Location(ref.uri).download(tmp)
        except FileNotFoundError:
            raise StorageError(f"the data bundle {ref.uri} does not exist (deleted, or published to storage this "
                               "node cannot see); run the command again to publish it") from None
        manifest = tmp / MANIFEST
        bad = damaged_files(tmp, json.loads(manifest.read_text())) if manifest.is_file() else [MANIFEST]
        if bad:
            raise StorageError(f"the data bundle {ref.uri} is damaged or incomplete ({', '.join(bad)}); run the "
                               "command again to publish it afresh")

    return _once_per_node(cache_dir, ref.digest, download)
