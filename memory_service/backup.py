"""A memory's shared backup: the place every acknowledged write also reaches, so the memory outlives its node.

``MemoryConfig.backup`` names it: a URI of any filesystem pyarrow knows (``s3://``, ``gs://``, ``abfs://``; S3
and S3-compatible servers through the standard AWS variables) or an absolute folder every node mounts. Layout::

    memory.json                       the memory's structural config: the backup's birth certificate
    log/<seq>.rec                     one record per write since the snapshot (store.LogRecord, no pickle)
    snapshots/<seq>/store.sqlite      a consistent copy of the store (entries, keys, counters)
    snapshots/<seq>/index.faiss       the FAISS index covering the log up to seq
    snapshots/<seq>/lru.npy           last-retrieved ticks (eviction='lru')
    snapshot.json                     {"seq", "files": {name: size}}: which snapshot is whole (written last)

Every object is written whole or not at all (an object store's upload; a temporary file renamed on a folder), so a
crash never leaves half a record. Records are named by the log sequence number, so writing one again (a retry)
replaces it with the same content.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

from memory_service.errors import MemoryServiceError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_OBJECT_STORES = ("s3", "gcs", "abfs")  # a single upload is atomic: no temporary name needed


class SharedBackup:
    """Named byte blobs under a URI or a shared folder (see the module docstring)."""

    def __init__(self, where: str):
        import pyarrow.fs as pafs

        if not _URI.match(where) and not os.path.isabs(where):
            raise MemoryServiceError(f"MemoryConfig.backup={where!r} must be a URI (s3://bucket/memories/name) or an "
                                     "absolute path of a folder every node mounts: it is opened on whatever node "
                                     "serves the memory")
        self.where = where.rstrip("/")
        try:
            self._fs, self._root = pafs.FileSystem.from_uri(self.where if _URI.match(where) else "file://" + self.where)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others for unusable URIs
            raise MemoryServiceError(f"cannot open the memory backup {where!r}: {exc}; check the URI and the "
                                     "credentials of the node (AWS_* variables, an instance role, ...)") from None
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._atomic = self._fs.type_name in _OBJECT_STORES

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def put(self, name: str, data: bytes) -> None:
        """Write ``name`` whole (durably, on a shared folder) or raise MemoryServiceError."""
        try:
            if self._local:
                _write_local(self._path(name), data)
            elif self._atomic:
                with self._fs.open_output_stream(self._path(name)) as f:
                    f.write(data)
            else:
                self._fs.create_dir(os.path.dirname(self._path(name)), recursive=True)
                tmp = f"{self._path(name)}.tmp-{os.getpid()}"
                with self._fs.open_output_stream(tmp) as f:
                    f.write(data)
                self._fs.move(tmp, self._path(name))
        except OSError as exc:
            raise MemoryServiceError(f"cannot write {name} to the memory backup {self.where}: {exc}") from None

    def get(self, name: str) -> bytes | None:
        """The bytes of ``name``, or None when there is no such object."""
        try:
            with self._fs.open_input_stream(self._path(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MemoryServiceError(f"cannot read {name} from the memory backup {self.where}: {exc}") from None

    def get_json(self, name: str) -> dict | None:
        data = self.get(name)
        return None if data is None else json.loads(data)

    def names(self, folder: str, folders: bool = False) -> list[str]:
        """Names of the objects (or, with ``folders``, the sub-folders) directly in ``folder``, sorted."""
        import pyarrow.fs as pafs

        try:
            infos = self._fs.get_file_info(pafs.FileSelector(self._path(folder), allow_not_found=True))
        except OSError as exc:
            raise MemoryServiceError(f"cannot list the memory backup {self.where}/{folder}: {exc}") from None
        kind = pafs.FileType.Directory if folders else pafs.FileType.File
        return sorted(os.path.basename(info.path) for info in infos if info.type == kind)

    def delete(self, names: list[str], folders: bool = False) -> None:
        """Delete objects (or, with ``folders``, folders and all in them); missing ones are fine."""
        for name in names:
            try:
                (self._fs.delete_dir if folders else self._fs.delete_file)(self._path(name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise MemoryServiceError(f"cannot delete {name} from the memory backup {self.where}: {exc}") from None

    def put_file(self, name: str, local_path: str) -> None:
        with open(local_path, "rb") as f:
            self.put(name, f.read())

    def get_file(self, name: str, local_path: str) -> None:
        data = self.get(name)
        if data is None:
            raise MemoryServiceError(f"the memory backup {self.where} lacks {name}; it is incomplete")
        _write_local(local_path, data)


def _write_local(path: str, data: bytes) -> None:
    """A temporary file in the same folder, fsynced, renamed over ``path``, and the folder fsynced."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
