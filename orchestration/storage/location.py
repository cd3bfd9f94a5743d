"""``Location``: one file or folder on a local disk, a shared mount, or any filesystem pyarrow or fsspec reaches by URI.

Local paths (and ``file://`` URIs) are served with ``os`` calls, so writes can be made durable: a temporary file in
the same folder, ``fsync``, ``os.replace``, then ``fsync`` of the folder. Everything else goes through a pyarrow
filesystem: pyarrow's own for ``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, and fsspec's (wrapped for pyarrow) for
any other scheme an installed fsspec package knows. S3-compatible servers are reached through the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which
pyarrow, boto3 and Ray read alike. On object stores a single upload is atomic by itself: an object appears whole
or not at all.

Example::

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> run = Location(tmp.name) / "run"
    >>> (run / "summary.json").write_json({"step": 10})
    >>> (run / "summary.json").read_json()["step"], run.listdir()
    (10, ['summary.json'])
    >>> Location("s3://bucket/runs/a").name, str(Location("s3://bucket/runs/a").parent)
    ('a', 's3://bucket/runs')
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from orchestration.errors import StorageError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# filesystems whose single upload is atomic (the object appears whole or not at all), so a write needs no rename
_OBJECT_STORES = ("s3", "gcs", "abfs")


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a non-local filesystem (``scheme://...`` other than ``file://``).

    >>> is_uri("s3://bucket/run"), is_uri("/mnt/shared/run"), is_uri("file:///tmp/run"), is_uri("runs/a")
    (True, False, False, False)
    """
    text = os.fspath(path)
    return bool(_URI.match(text)) and not text.startswith("file://")


_filesystems: dict[str, tuple[Any, str]] = {}
_filesystems_lock = threading.Lock()


def _filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI. One filesystem object per scheme and authority (bucket,
    host): opening one can cost a request (S3 looks up the bucket's region), so it is done once per process."""
    import pyarrow
    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    root = f"{scheme}://{rest.split('/', 1)[0]}"
    with _filesystems_lock:
        cached = _filesystems.get(root)
    if cached is None:
        try:
            cached = pafs.FileSystem.from_uri(root)
        except pyarrow.ArrowInvalid:  # a scheme pyarrow does not know: fsspec's implementations
            import fsspec.core

            try:
                fs, path = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as exc:
                raise StorageError(f"no filesystem for {uri!r}: neither pyarrow nor fsspec knows the scheme "
                                   f"{scheme!r} ({exc}); install its fsspec package (s3fs, gcsfs, adlfs, ...) or use "
                                   "a local path or a shared mount") from None
            cached = pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
        except OSError as exc:
            raise StorageError(f"cannot open {uri!r}: {exc}. {_access_hint(scheme)}") from None
        with _filesystems_lock:
            _filesystems[root] = cached
    fs, root_path = cached
    return fs, root_path.rstrip("/") + uri[len(root):]


def _access_hint(scheme: str) -> str:
    if scheme in ("s3", "s3a"):
        return ("Check the bucket name and the AWS credentials of this process (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or an instance role), and AWS_ENDPOINT_URL for an S3-compatible server")
    if scheme in ("gs", "gcs"):
        return "Check the bucket name and Google credentials (gcloud auth application-default login)"
    return "Check the address and the credentials of this process"


@contextlib.contextmanager
def _errors(what: str, uri: str) -> Iterator[None]:
    """Storage failures other than a missing file become one clear StorageError naming the location."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        scheme = uri.split("://", 1)[0] if is_uri(uri) else "file"
        hint = _access_hint(scheme) if is_uri(uri) else "Check the path, its permissions and the free disk space"
        raise StorageError(f"cannot {what} {uri!r}: {exc}. {hint}") from None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# the process's umask, read once (reading it means setting it): files written through a temporary file get the
# permissions a plain open() would give them, not mkstemp's owner-only 0600
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _write_local(path: str, data, fsync_dir: bool = True) -> None:
    """Durable atomic replace: a reader or a crash (power loss included) sees the old file or the new one. ``data``
    is bytes or an open binary file (copied in chunks, never whole in memory)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, length=16 * 1024 * 1024)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync_dir:
        _fsync_dir(directory)


class Location:
    """A file or folder: a local path (made absolute) or a URI. Cheap to create, picklable, compared by ``uri``.

    Reading a missing file raises ``FileNotFoundError``; any other failure raises ``StorageError`` naming the
    location and what to check.
    """

    __slots__ = ("uri", "_fs", "_path")

    def __init__(self, where: str | os.PathLike | Location):
        if isinstance(where, Location):
            self.uri = where.uri
        else:
            text = os.fspath(where)
            if not text:
                raise StorageError("an empty path is not a location; give a folder, a shared mount or a URI")
            if text.startswith("file://"):
                text = text[len("file://"):]
            if is_uri(text):
                if "?" in text:
                    raise StorageError(f"{text!r}: options in the URI are not supported; give them through the "
                                       "standard environment variables (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ...)")
                scheme, rest = text.split("://", 1)
                self.uri = f"{scheme}://{rest.rstrip('/')}"
            else:
                # absolute, so the same string means the same place to every process on this node (and, on a
                # shared mount, on every node); symlinks are kept: a mount may be reached through one
                self.uri = os.path.abspath(os.path.expanduser(text))
        self._fs = self._path = None

    # --- naming ------------------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def local_path(self) -> Path:
        """The path on this node's filesystem (local locations only)."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is not on a local filesystem; copy it with local_copy() first")
        return Path(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri) if not self.is_local else os.path.basename(self.uri)

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(os.path.dirname(self.uri))
        scheme, rest = self.uri.split("://", 1)
        return Location(f"{scheme}://{posixpath.dirname(rest)}")

    def __truediv__(self, name: str) -> Location:
        name = str(name).strip("/")
        return Location(os.path.join(self.uri, name) if self.is_local else f"{self.uri}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # the filesystem object stays behind: each process opens its own
        return Location, (self.uri,)

    @property
    def fs(self):
        """The pyarrow filesystem (LocalFileSystem for local paths) and, in ``fs_path``, the path inside it."""
        if self._fs is None:
            if self.is_local:
                import pyarrow.fs as pafs

                self._fs, self._path = pafs.LocalFileSystem(), self.uri
            else:
                self._fs, self._path = _filesystem(self.uri)
        return self._fs

    @property
    def fs_path(self) -> str:
        self.fs  # noqa: B018 (resolves the path too)
        return self._path

    # --- queries -----------------------------------------------------------------------------------------------

    def _info(self):
        with _errors("look up", self.uri):
            return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.exists(self.uri)
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        if self.is_local:
            return os.path.isfile(self.uri)
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        if self.is_local:
            return os.path.isdir(self.uri)
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def listdir(self) -> list[str]:
        """Names of the entries directly inside this folder, sorted (empty when it does not exist)."""
        if self.is_local:
            return sorted(os.listdir(self.uri)) if os.path.isdir(self.uri) else []
        return sorted(posixpath.basename(info.path) for info in self._select(recursive=False))

    def files(self) -> dict[str, int]:
        """Every file below this folder: path relative to it (with /) -> size in bytes (empty when missing)."""
        if self.is_local:
            out = {}
            for root, _, names in os.walk(self.uri):
                for n in names:
                    full = os.path.join(root, n)
                    out[os.path.relpath(full, self.uri).replace(os.sep, "/")] = os.path.getsize(full)
            return out
        import pyarrow.fs as pafs

        prefix = self.fs_path.rstrip("/") + "/"
        return {info.path[len(prefix):]: info.size for info in self._select(recursive=True)
                if info.type == pafs.FileType.File}

    def _select(self, recursive: bool):
        import pyarrow.fs as pafs

        with _errors("list", self.uri):
            return self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive))

    # --- reading -----------------------------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        if self.is_local:
            with _errors("read", self.uri), open(self.uri, "rb") as f:
                return f.read()
        with _errors("read", self.uri), self.fs.open_input_stream(self.fs_path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def sha256(self) -> tuple[str, int]:
        """(SHA-256 hex digest, size in bytes) of the file, read in chunks (a large file never whole in memory)."""
        digest, size = hashlib.sha256(), 0
        with _errors("read", self.uri), (open(self.uri, "rb") if self.is_local
                                         else self.fs.open_input_stream(self.fs_path)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def read_json(self) -> Any:
        try:
            return json.loads(self.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.uri} is not valid JSON ({exc}); the file is damaged") from None

    def read_yaml(self) -> Any:
        import yaml

        try:
            return yaml.safe_load(self.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.uri} is not valid YAML ({exc}); the file is damaged") from None

    # --- writing -----------------------------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Replace the file atomically and durably: readers (and a crash) see the old content or the new."""
        if self.is_local:
            with _errors("write", self.uri):
                _write_local(self.uri, data)
            return
        with _errors("write", self.uri):
            self.parent.mkdir()
            if self.fs.type_name in _OBJECT_STORES:
                with self.fs.open_output_stream(self.fs_path) as f:
                    f.write(data)
                return
            tmp = f"{self.fs_path}.tmp-{os.getpid()}-{threading.get_ident()}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.fs_path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, value: Any, indent: int | None = 2) -> None:
        """Strict JSON (NaN and infinities are refused, so every reader can parse it)."""
        self.write_text(json.dumps(value, indent=indent, allow_nan=False))

    def append_text(self, text: str) -> None:
        """Add ``text`` at the end of the file (created when missing); durable once this returns. Object stores
        cannot append, so there the file is rewritten whole (use MetricsLog for repeated appends)."""
        if not self.is_local:
            try:
                old = self.read_bytes()
            except FileNotFoundError:
                old = b""
            self.write_bytes(old + text.encode("utf-8"))
            return
        with _errors("append to", self.uri):
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
            with open(self.uri, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def fsync(self) -> None:
        """Make a local file or folder (every file and folder in it) durable, as written by another program (Ray
        Train's checkpoint upload). Object stores are durable once an upload returns: nothing to do there."""
        if not self.is_local or not os.path.exists(self.uri):
            return
        files, folders = [self.uri], [os.path.dirname(self.uri)]
        if os.path.isdir(self.uri):
            files = [os.path.join(root, n) for root, _, names in os.walk(self.uri) for n in names]
            folders += [root for root, _, _ in os.walk(self.uri)]
        with _errors("sync", self.uri):
            for path in files:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            for folder in folders:
                _fsync_dir(folder)

    def mkdir(self) -> None:
        """Create the folder and its parents (object stores have no folders: nothing to do there)."""
        if self.is_local:
            with _errors("create", self.uri):
                os.makedirs(self.uri, exist_ok=True)
        elif self.fs.type_name not in _OBJECT_STORES:
            with _errors("create", self.uri):
                self.fs.create_dir(self.fs_path, recursive=True)

    def remove(self) -> None:
        """Delete the file or the folder with everything in it; a missing one is fine."""
        if self.is_local:
            with _errors("delete", self.uri):
                if os.path.isdir(self.uri) and not os.path.islink(self.uri):
                    shutil.rmtree(self.uri)
                elif os.path.lexists(self.uri):
                    os.unlink(self.uri)
            return
        import pyarrow.fs as pafs

        info = self._info()
        with _errors("delete", self.uri):
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.fs_path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.fs_path)

    # --- copying between this node's disk and the location -------------------------------------------------------

    def upload(self, source: str | os.PathLike, exclude: tuple[str, ...] = ()) -> None:
        """Copy a local file to this location, or the files of a local folder into this folder (merged with what is
        there); each file is replaced atomically, and all are durable once this returns. Top-level names in
        ``exclude`` are left out."""
        source = os.fspath(source)
        if os.path.isfile(source):
            files = {"": source}
        else:
            files = {rel: os.path.join(source, rel) for rel in sorted(_local_files(source))
                     if rel.split("/", 1)[0] not in exclude}
        touched = set()
        for rel, path in files.items():
            target = self / rel if rel else self
            with open(path, "rb") as f, _errors("write", target.uri):
                if self.is_local:
                    _write_local(target.uri, f, fsync_dir=False)
                    touched.add(os.path.dirname(target.uri))
                else:
                    target._stream_from(f)
        for directory in sorted(touched):  # once per folder, not per file
            _fsync_dir(directory)

    def _stream_from(self, f) -> None:
        """Write an open local file to this (non-local) location in chunks, without holding it in memory."""
        if self.fs.type_name not in _OBJECT_STORES:
            self.parent.mkdir()
        with self.fs.open_output_stream(self.fs_path) as out:
            shutil.copyfileobj(f, out, length=16 * 1024 * 1024)

    def download(self, target: str | os.PathLike) -> Path:
        """Copy this file to the local path ``target``, or this folder's files into the local folder ``target``."""
        target = Path(target)
        if self.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if self.is_local:
                shutil.copyfile(self.uri, target)
            else:
                with _errors("read", self.uri), self.fs.open_input_stream(self.fs_path) as f, open(target, "wb") as out:
                    shutil.copyfileobj(f, out, length=16 * 1024 * 1024)
            return target
        files = self.files()
        if not files and not self.exists():
            raise FileNotFoundError(f"{self.uri} does not exist")
        target.mkdir(parents=True, exist_ok=True)
        for rel in files:
            (self / rel).download(target / rel)
        return target


def _local_files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            out.append(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/"))
    return out


def ray_storage(location: Location) -> dict:
    """``RunConfig`` arguments that put a Ray Train or Tune run's storage at ``location``: the path or URI itself
    for what pyarrow resolves (Ray opens it the same way on every node), the filesystem object for schemes only
    fsspec knows."""
    import pyarrow.fs as pafs

    if location.is_local or not isinstance(location.fs, pafs.PyFileSystem):
        return {"storage_path": location.uri}
    return {"storage_path": location.fs_path, "storage_filesystem": location.fs}
