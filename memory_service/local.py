"""LocalMemory: the in-process semantic memory (index + durable store + write-ahead log + snapshots).

The Ray actor wraps exactly this class, so both implementations share every behaviour.

Concurrency: one writer at a time (add/remove/snapshot hold `_writer`), and an index read/write lock so
searches run in parallel with each other and only wait while a write mutates FAISS (which is not safe to
mutate during a search).

Directory layout under `config.path`::

    store.sqlite              entries (id, text, metadata JSON), write-ahead log, counters, config, idempotency keys
    snapshots/index-SEQ.faiss FAISS index covering the log up to SEQ (written to .tmp, fsynced, renamed)
    snapshots/lru-SEQ.npy     last-retrieved tick per id at that snapshot (for eviction='lru')
    LOCK                      flock held while a process has the memory open

With `config.backup` (memory_service.backup), every write also reaches the shared backup before it is
acknowledged, snapshots are copied there, and a path that holds no store (or an older one) is rebuilt from it.
What an acknowledgement guarantees: when add() or remove() returns, the write is in the local store (fsynced when
`fsync`) and, with a backup, in the backup too; a memory reopened anywhere (the same path, or any node's path
with the same backup) holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import faiss
import numpy as np

from memory_service.backup import SharedBackup
from memory_service.config import STRUCTURAL_FIELDS, MemoryConfig
from memory_service.errors import MemoryServiceError
from memory_service.index import VectorIndex
from memory_service.store import LogRecord, Store, object_array
from memory_service.validation import check_ids, check_k, check_key, check_metadata, check_texts, check_vectors


# Searches with fewer queries than this run FAISS on one thread.
SMALL_BATCH = 8

log = logging.getLogger(__name__)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Hit(NamedTuple):
    """One neighbour of one query."""

    id: int
    score: float
    text: str
    metadata: dict | None


class SearchHits(NamedTuple):
    """Neighbours of Q queries, best first. Unpacks as ``ids_QK, scores_QK, texts, metadata``.

    Where the memory holds fewer than k entries the trailing slots have id -1, score NaN, text None.
    Scores are cosine similarity / inner product (higher is closer) or squared L2 distance (lower is closer).
    """

    ids_QK: np.ndarray
    scores_QK: np.ndarray
    texts: list[list[str | None]]
    metadata: list[list[dict | None]]

    def query(self, q: int) -> list[Hit]:
        """The real hits of query q (padding dropped)."""
        return [Hit(int(i), float(s), t, m) for i, s, t, m in
                zip(self.ids_QK[q], self.scores_QK[q], self.texts[q], self.metadata[q]) if i >= 0]


class PackedHits(NamedTuple):
    """SearchHits in the compact form the actor sends: numbers as one bytes buffer, texts as nested lists of str, and
    metadata as the JSON of the hits that have some. Bytes and lists of str go through Ray's in-band pickle, which
    for results this small is cheaper than out-of-band numpy buffers, and the client decodes all metadata with one
    json.loads call."""

    shape: tuple[int, int]  # (Q, K)
    numbers: bytes  # little-endian ids_QK int64, scores_QK float32, then int32 flat positions of the hits in metas
    texts: list[list[str | None]]
    metas: list[str]  # metadata JSON of the hits that have metadata, in flat hit order

    @classmethod
    def pack(cls, ids_QK: np.ndarray, scores_QK: np.ndarray, texts_QK: np.ndarray, metas_QK: np.ndarray) -> PackedHits:
        at_M = np.flatnonzero(metas_QK.ravel() != None)  # noqa: E711 (elementwise on an object array)
        numbers = b"".join([ids_QK.astype("<i8", copy=False).tobytes(), scores_QK.astype("<f4", copy=False).tobytes(),
                            at_M.astype("<i4").tobytes()])
        return cls(ids_QK.shape, numbers, texts_QK.tolist(), metas_QK.ravel()[at_M].tolist())

    def unpack(self) -> SearchHits:
        n = self.shape[0] * self.shape[1]
        ids_QK = np.frombuffer(self.numbers, "<i8", n).reshape(self.shape).astype(np.int64)  # copies: writable
        scores_QK = np.frombuffer(self.numbers, "<f4", n, 8 * n).reshape(self.shape).astype(np.float32)
        metadata_H = np.full(n, None)
        if self.metas:
            metadata_H[np.frombuffer(self.numbers, "<i4", len(self.metas), 12 * n)] = _decode_json(self.metas)
        return SearchHits(ids_QK, scores_QK, self.texts, metadata_H.reshape(self.shape).tolist())


def _decode_json(metas: list[str]) -> np.ndarray:
    """Object array of fresh metadata dicts from their JSON texts, in one json.loads call."""
    return object_array(json.loads("[" + ",".join(metas) + "]"))


def _decode_metadata(metas: np.ndarray) -> np.ndarray:
    """Object array (any shape) of metadata JSON or None -> the same with dicts."""
    decoded = np.full(metas.shape, None)
    has = metas != None  # noqa: E711 (elementwise on an object array)
    if has.any():
        decoded[has] = _decode_json(metas[has].tolist())
    return decoded


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so a stream of searches cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class LocalMemory:
    """An in-process semantic memory.

    Example::

        >>> import numpy as np, tempfile
        >>> from memory_service import LocalMemory, MemoryConfig
        >>> folder = tempfile.TemporaryDirectory()
        >>> mem = LocalMemory(MemoryConfig(dim=4, metric="l2", path=folder.name))
        >>> ids = mem.add(np.eye(2, 4, dtype=np.float32), ["north", "east"], [{"src": "a"}, None])
        >>> hits = mem.search(np.eye(1, 4, dtype=np.float32), k=1)
        >>> hits.texts[0], hits.ids_QK[0].tolist(), hits.metadata[0]
        (['north'], [0], [{'src': 'a'}])
        >>> mem.remove(ids[:1])
        1
        >>> mem.stats()["count"], mem.get(ids[1:])
        (1, [('east', None)])
        >>> mem.close(); folder.cleanup()
    """

    def __init__(self, config: MemoryConfig | None = None, **overrides) -> None:
        config = config or MemoryConfig()
        if overrides:
            config = MemoryConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self._ephemeral = config.path is None
        self.directory = tempfile.mkdtemp(prefix="memtrain-memory-") if self._ephemeral else os.path.abspath(config.path)
        # an ephemeral memory's folder is deleted by close(), or else when the memory is garbage-collected or the
        # interpreter exits (the finalizer holds no reference to the memory, so it does not keep it alive)
        self._remove_directory = (weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
                                  if self._ephemeral else None)
        self._writer = threading.Lock()
        self._rw = _ReadWriteLock()
        self._ticks = itertools.count(1)  # next() on a count is atomic under the GIL: searches may call it concurrently
        self._searches = 0
        self._counter_lock = threading.Lock()
        self._closed = True
        self._faiss_threads = config.faiss_threads or faiss.omp_get_max_threads()
        self._backup = SharedBackup(config.backup) if config.backup else None
        self._backed_up_seq = 0  # the newest log record the backup holds (as a record or inside its snapshot)
        self._restored: dict | None = None  # what the last open rebuilt from the backup
        self._backup_is_new = False
        self._damaged_snapshot = 0  # a current snapshot found damaged at open (recovered from the previous one)
        os.makedirs(os.path.join(self.directory, "snapshots"), exist_ok=True)
        self._lock_file = self._take_directory_lock()
        try:
            self._restore_from_backup()
            self._open()
            if self._damaged_snapshot:  # recovered from the previous snapshot: write a good current one now
                with self._writer:
                    self._snapshot_locked()
                self._damaged_snapshot = 0
            if self._backup_is_new and self._snapshot_seq:
                # a memory given a backup later: its log no longer holds what its snapshot covers
                with self._writer:
                    if self._store.last_seq() != self._snapshot_seq:
                        self._snapshot_locked()
                    else:
                        self._backup_snapshot(self._snapshot_seq)
            self._sync_backup()  # writes a crash left in the local store only
        except BaseException:
            if not self._closed:
                self._store.close()
            self._lock_file.close()
            if self._ephemeral:
                self._remove_directory()
            raise

    # ----- opening and recovery -----------------------------------------------------------------------
    def _take_directory_lock(self):
        lock_file = open(os.path.join(self.directory, "LOCK"), "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise MemoryServiceError(f"the memory at {self.directory} is already open in another LocalMemory or process; "
                                     "close that one first, or share it through get_or_create_memory(...)") from None
        return lock_file

    def _open(self) -> None:
        """Load the last snapshot, replay the log after it, and rebuild the id bookkeeping from the store."""
        started = time.perf_counter()
        self._store = Store(os.path.join(self.directory, "store.sqlite"), fsync=self.config.fsync and not self._ephemeral)
        stored = self._store.stored_config()
        if stored is None:
            self._store.save_config(self.config.to_dict())
        else:
            differing = {f: (stored.get(f), getattr(self.config, f)) for f in STRUCTURAL_FIELDS
                         if stored.get(f) != getattr(self.config, f)}
            if differing:
                self._store.close()
                raise MemoryServiceError(
                    f"the memory at {self.directory} was created with a different config: "
                    + ", ".join(f"{f} stored={a!r} requested={b!r}" for f, (a, b) in differing.items())
                    + "; use the stored values or a new path")
        counters = self._store.counters()
        self._next_id = counters["next_id"]
        self._evicted_total = counters["evicted_total"]
        self._removed_total = counters["removed_total"]
        self._snapshot_seq = self._usable_snapshot()
        index_file = self._snapshot_file("index", self._snapshot_seq)
        self._index = (VectorIndex.load(self.config, index_file) if self._snapshot_seq
                       else VectorIndex(self.config))
        replayed = 0
        for _seq, op, ids_N, vectors_ND in self._store.log_since(self._snapshot_seq, self.config.dim):
            if op == "add":
                self._index.add(ids_N, vectors_ND)
                replayed += ids_N.size
            else:
                self._index.remove(ids_N)
        self._logged_vectors = self._store.logged_vectors(self.config.dim)
        live_ids_N = self._store.live_ids()
        self._index.reconcile(live_ids_N)
        self._alive_I = np.zeros(max(self._next_id, 1024), dtype=bool)
        self._alive_I[live_ids_N] = True
        self._count = int(live_ids_N.size)
        self._last_used_I = np.zeros_like(self._alive_I, dtype=np.int64)
        lru_file = self._snapshot_file("lru", self._snapshot_seq)
        if self._snapshot_seq and os.path.exists(lru_file):
            saved_I = np.load(lru_file, allow_pickle=False)
            self._last_used_I[:saved_I.size] = saved_I
            self._ticks = itertools.count(int(saved_I.max(initial=0)) + 1)
        self._remove_stale_snapshot_files()
        self._closed = False
        self._recovery = {"seconds": time.perf_counter() - started, "replayed_vectors": replayed}

    def _restore_from_backup(self) -> None:
        """Make the local store at least as new as the backup: keep it when it is, else rebuild it from the backup's
        snapshot and log (a new node, a lost disk, a stale copy). A new backup gets the memory's config."""
        if self._backup is None:
            return
        backup = self._backup
        structure = {f: getattr(self.config, f) for f in STRUCTURAL_FIELDS}
        born = backup.get_json("memory.json")
        pointer = backup.get_json("snapshot.json")
        log_seqs = [int(name.split(".")[0]) for name in backup.names("log")]
        if born is None:
            if pointer or log_seqs:
                raise MemoryServiceError(f"the memory backup {backup.where} holds a log or snapshot but no memory.json; "
                                         "it is damaged or not a memtrain memory backup")
            backup.put("memory.json", json.dumps({"config": structure}).encode())
            self._backup_is_new = True  # an existing local store is copied there whole once it is open
            return
        if born["config"] != structure:
            raise MemoryServiceError(f"the memory backup {backup.where} belongs to a memory with config {born['config']}, "
                                     f"not {structure}; use the same structural settings or another backup")
        snapshot_seq = pointer["seq"] if pointer else 0
        self._backed_up_seq = max([snapshot_seq, *log_seqs])
        db_path = os.path.join(self.directory, "store.sqlite")
        local_last = 0
        if os.path.exists(db_path):
            store = Store(db_path, fsync=False)
            local_last = max(store.last_seq(), store.counters()["snapshot_seq"])
            store.close()
        if local_last >= self._backed_up_seq:
            return  # the local store holds all the backup does (and maybe writes not yet sent there)
        started = time.perf_counter()
        for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, name))
        for file in glob.glob(os.path.join(self.directory, "snapshots", "*")):
            os.remove(file)
        if pointer:
            folder = f"snapshots/{snapshot_seq:012d}"
            backup.get_file(f"{folder}/store.sqlite", db_path)
            backup.get_file(f"{folder}/index.faiss", self._snapshot_file("index", snapshot_seq))
            if "lru.npy" in pointer["files"]:
                backup.get_file(f"{folder}/lru.npy", self._snapshot_file("lru", snapshot_seq))
            sizes = {name: os.path.getsize(path) for name, path in (
                ("store.sqlite", db_path), ("index.faiss", self._snapshot_file("index", snapshot_seq)))}
            if any(pointer["files"][name] != size for name, size in sizes.items()):
                raise MemoryServiceError(f"the snapshot {snapshot_seq} in the memory backup {backup.where} is "
                                         f"incomplete ({sizes} against {pointer['files']})")
        store = Store(db_path, fsync=self.config.fsync)
        try:
            for seq in sorted(s for s in log_seqs if s > snapshot_seq):
                store.apply(LogRecord.decode(backup.get(f"log/{seq:012d}.rec")))
        finally:
            store.close()
        self._restored = {"from_backup": backup.where, "snapshot_seq": snapshot_seq,
                          "log_records": sum(s > snapshot_seq for s in log_seqs),
                          "seconds": round(time.perf_counter() - started, 3)}

    def _sync_backup(self) -> None:
        """Send the backup every log record it lacks (the caller holds the writer lock, or is opening the memory)."""
        if self._backup is None:
            return
        for record in self._store.records_since(self._backed_up_seq, self.config.dim):
            try:
                self._backup.put(f"log/{record.seq:012d}.rec", record.encode())
            except MemoryServiceError as exc:
                raise MemoryServiceError(f"{exc}. The write is in the local store but not in the shared backup, so it "
                                         "is not acknowledged; retry it (an add with the same key returns the same "
                                         "ids) once the backup is reachable") from None
            self._backed_up_seq = record.seq

    def _backup_snapshot(self, seq: int) -> None:
        """Copy the snapshot at ``seq`` to the backup, point snapshot.json at it, then drop what it covers there. A
        failure leaves the backup's log whole (it was synced before the local log was truncated)."""
        backup = self._backup
        folder = f"snapshots/{seq:012d}"
        with tempfile.TemporaryDirectory(prefix="memtrain-memory-snapshot-") as tmp:
            db_copy = os.path.join(tmp, "store.sqlite")
            self._store.copy_to(db_copy)
            files = {"store.sqlite": db_copy, "index.faiss": self._snapshot_file("index", seq),
                     "lru.npy": self._snapshot_file("lru", seq)}
            for name, path in files.items():
                backup.put_file(f"{folder}/{name}", path)
            backup.put("snapshot.json", json.dumps({"seq": seq, "files": {
                name: os.path.getsize(path) for name, path in files.items()}}).encode())
        backup.delete([f"log/{name}" for name in backup.names("log") if int(name.split(".")[0]) <= seq])
        backup.delete([f"snapshots/{name}" for name in backup.names("snapshots", folders=True)
                       if name != f"{seq:012d}"], folders=True)

    def _usable_snapshot(self) -> int:
        """The sequence number of the snapshot to load: the current one when its index file has the recorded
        SHA-256, else the previous one (the log still holds everything after it), else none (the whole log)."""
        snap = self._store.snapshots()
        for seq, sha256 in ((snap["seq"], snap["sha256"]), (snap["previous_seq"], snap["previous_sha256"])):
            if not seq:
                return 0
            path = self._snapshot_file("index", seq)
            if os.path.exists(path) and (not sha256 or _file_sha256(path) == sha256):  # no sha256: made before them
                if seq != snap["seq"]:
                    self._damaged_snapshot = snap["seq"]
                return seq
            log.warning("memory %s: snapshot %d is damaged or missing (%s); recovering from the snapshot before it "
                        "and the log", self.directory, seq, path)
        raise MemoryServiceError(f"both snapshots of the memory at {self.directory} ({snap['seq']} and "
                                 f"{snap['previous_seq']}) are damaged or missing, and the log only goes back to the "
                                 "older one; restore the folder from a backup (MemoryConfig.backup)")

    def _snapshot_file(self, kind: str, seq: int) -> str:
        suffix = "faiss" if kind == "index" else "npy"
        return os.path.join(self.directory, "snapshots", f"{kind}-{seq:012d}.{suffix}")

    def _remove_stale_snapshot_files(self) -> None:
        """Files of snapshots older than the previous one, and of a newer one a crash left unrecorded, are not needed."""
        snap = self._store.snapshots()
        keep = {self._snapshot_file(kind, seq) for seq in (snap["seq"], snap["previous_seq"]) for kind in ("index", "lru")}
        for file in glob.glob(os.path.join(self.directory, "snapshots", "*")):
            if file not in keep:
                os.remove(file)

    # ----- writes -------------------------------------------------------------------------------------
    def add(self, vectors_ND: np.ndarray, texts: list[str], metadata: list[dict | None] | None = None,
            key: str | None = None) -> np.ndarray:
        """Store vectors with their texts (and optional JSON-able metadata dicts); returns their new int64 ids.

        Durable when it returns: the write-ahead log holds the batch (and, with a backup, the backup does too). At
        capacity, the oldest (or least recently retrieved) entries are evicted first, in the same atomic write.
        ``key`` makes the add idempotent: an add again with a key already applied changes nothing and returns the
        ids of the first (so a caller may retry an add whose answer it lost).
        """
        c = self.config
        vectors_ND = check_vectors(vectors_ND, c.dim, "vectors", c.metric == "cosine", c.max_batch)
        n = vectors_ND.shape[0]
        texts = check_texts(texts, n, c.max_text_bytes)
        metas = check_metadata(metadata, n, c.max_metadata_bytes)
        key = check_key(key)
        capacity = c.capacity
        if capacity and n > capacity:
            raise MemoryServiceError(f"a batch of {n} vectors is larger than the capacity {capacity}; split it or raise "
                                     "MemoryConfig.capacity")
        with self._writer:
            self._check_open()
            done = self._store.applied(key) if key is not None else None
            if done is not None:
                first, n_done = done
                if n_done != n:
                    raise MemoryServiceError(f"the idempotency key {key!r} was used for an add of {n_done} vectors, not "
                                             f"{n}; use a new key for a different batch")
                self._sync_backup()
                return np.arange(first, first + n, dtype=np.int64)
            faiss.omp_set_num_threads(self._faiss_threads)  # per calling thread, see search()
            victims_V = self._pick_victims(self._count + n - capacity) if capacity else np.empty(0, np.int64)
            ids_N = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            counters = self._counters(next_id=self._next_id + n, evicted_total=self._evicted_total + victims_V.size)
            try:
                if victims_V.size:
                    # Deleting rows a concurrent search may be about to read: commit and apply under the index lock.
                    with self._rw.write():
                        self._store.write_add(ids_N, texts, metas, vectors_ND, victims_V, counters, key)
                        self._apply_add(ids_N, vectors_ND, victims_V)
                else:
                    # New rows are invisible until FAISS holds their ids, so searches keep running during the commit.
                    self._store.write_add(ids_N, texts, metas, vectors_ND, victims_V, counters, key)
                    with self._rw.write():
                        self._apply_add(ids_N, vectors_ND, victims_V)
            except MemoryServiceError:
                raise  # the store refused the write: nothing of it was committed
            except Exception as exc:  # FAISS failed after the commit (e.g. out of memory while retraining IVF)
                self._reload_after(exc, f"the add of ids {ids_N[0]}..{ids_N[-1]}")
            self._next_id += n
            self._evicted_total += int(victims_V.size)
            self._logged_vectors += n
            self._sync_backup()
            self._maybe_auto_snapshot()
        return ids_N

    def _reload_after(self, exc: Exception, what: str) -> None:
        """A write the store committed could not be applied in memory: rebuild the in-memory state from disk (which
        holds the write), so the memory stays consistent, and raise an error that names the real cause."""
        cause = f"{type(exc).__name__}: {exc}"
        with self._rw.write():
            self._store.close()
            self._closed = True
            try:
                self._open()
            except Exception as again:
                raise MemoryServiceError(f"{what} was stored, but applying it failed ({cause}), and so did reloading the "
                                         f"memory from {self.directory} ({type(again).__name__}: {again}); the memory "
                                         "is closed: fix the cause (e.g. free memory) and open it again") from exc
        self._sync_backup()
        raise MemoryServiceError(f"{what} was stored, but applying it to the FAISS index failed ({cause}); the memory "
                                 "reloaded itself from disk and holds the write (an add again with the same key "
                                 "returns its ids)") from exc

    def _counters(self, **changes: int) -> dict[str, int]:
        """Every counter of the store as it stands, with ``changes`` (what a write records in its log record)."""
        return {"next_id": self._next_id, "snapshot_seq": self._snapshot_seq, "evicted_total": self._evicted_total,
                "removed_total": self._removed_total, **{k: int(v) for k, v in changes.items()}}

    def _apply_add(self, ids_N: np.ndarray, vectors_ND: np.ndarray, victims_V: np.ndarray) -> None:
        if victims_V.size:
            self._index.remove(victims_V)
            self._alive_I[victims_V] = False
        self._index.add(ids_N, vectors_ND)
        needed = int(ids_N[-1]) + 1
        if needed > self._alive_I.size:
            grown = max(needed, 2 * self._alive_I.size)
            self._alive_I = np.concatenate([self._alive_I, np.zeros(grown - self._alive_I.size, bool)])
            self._last_used_I = np.concatenate([self._last_used_I, np.zeros(grown - self._last_used_I.size, np.int64)])
        self._alive_I[ids_N] = True
        self._last_used_I[ids_N] = next(self._ticks)
        self._count += ids_N.size - victims_V.size

    def _pick_victims(self, n: int) -> np.ndarray:
        """The n entries to evict: smallest ids ('oldest'), or least recently retrieved then oldest ('lru')."""
        if n <= 0:
            return np.empty(0, np.int64)
        live_L = np.flatnonzero(self._alive_I[:self._next_id])
        if self.config.eviction == "oldest":
            return live_L[:n].astype(np.int64)
        order_L = np.argsort(self._last_used_I[live_L], kind="stable")  # stable: ties go to the smaller (older) id
        return live_L[order_L[:n]].astype(np.int64)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Delete entries by id; refuses (and removes nothing) if any id is unknown or already removed."""
        ids_N = check_ids(ids, self.config.max_batch)
        with self._writer:
            self._check_open()
            in_range_N = (ids_N >= 0) & (ids_N < self._next_id)
            known_N = in_range_N.copy()
            known_N[in_range_N] = self._alive_I[ids_N[in_range_N]]
            if not known_N.all():
                unknown = ids_N[~known_N]
                raise MemoryServiceError(f"unknown id(s) {unknown[:10].tolist()}{' ...' if unknown.size > 10 else ''}: "
                                         "never added, or already removed or evicted; nothing was removed")
            try:
                with self._rw.write():
                    self._store.write_remove(ids_N, self._counters(removed_total=self._removed_total + ids_N.size))
                    self._index.remove(ids_N)
                    self._alive_I[ids_N] = False
                    self._count -= ids_N.size
            except MemoryServiceError:
                raise
            except Exception as exc:
                self._reload_after(exc, f"the remove of {ids_N.size} id(s)")
            self._removed_total += int(ids_N.size)
            self._sync_backup()
        return int(ids_N.size)

    # ----- reads --------------------------------------------------------------------------------------
    def search(self, queries_QD: np.ndarray, k: int = 10) -> SearchHits:
        """The k nearest entries of each query: ids, scores, texts and metadata, best first."""
        ids_QK, scores_QK, texts_QK, metas_QK = self._search(queries_QD, k)
        return SearchHits(ids_QK, scores_QK, texts_QK.tolist(), _decode_metadata(metas_QK).tolist())

    def search_packed(self, queries_QD: np.ndarray, k: int = 10) -> PackedHits:
        """search() in its compact form (what the actor sends back): PackedHits.unpack() gives the SearchHits."""
        return PackedHits.pack(*self._search(queries_QD, k))

    def _search(self, queries_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids_QK, scores_QK, texts_QK, metas_QK): object arrays of texts and metadata JSON, None for padding."""
        c = self.config
        queries_QD = check_vectors(queries_QD, c.dim, "queries", c.metric == "cosine", c.max_batch)
        k = check_k(k, c.max_k)
        # OpenMP's thread count is per calling thread, so set it on every call (actor calls arrive on pool
        # threads). A few queries run on one thread: fork/join and spin-waits cost more than they save, and
        # concurrent calls already spread over the cores.
        faiss.omp_set_num_threads(1 if queries_QD.shape[0] < SMALL_BATCH else self._faiss_threads)
        with self._rw.read():
            self._check_open()
            scores_QK, ids_QK = self._index.search(queries_QD, k)
            texts_QK, metas_QK, found_QK = self._store.rows(ids_QK)
            real_QK = ids_QK >= 0
            if not np.array_equal(found_QK, real_QK):
                missing = np.unique(ids_QK[real_QK & ~found_QK])[:10].tolist()
                raise MemoryServiceError(f"ids {missing} are in the index but not in the store; the memory directory "
                                         "is inconsistent — call restore() or restore the directory from a backup")
            self._last_used_I[ids_QK[real_QK]] = next(self._ticks)
        with self._counter_lock:
            self._searches += queries_QD.shape[0]
        return ids_QK, np.where(real_QK, scores_QK, np.float32(np.nan)), texts_QK, metas_QK

    def get(self, ids: np.ndarray | list[int]) -> list[tuple[str, dict | None]]:
        """(text, metadata) of each id, in order; refuses unknown ids."""
        ids_N = check_ids(ids, self.config.max_batch)
        with self._rw.read():
            self._check_open()
            texts_N, metas_N, found_N = self._store.rows(ids_N)
        if not found_N.all():
            unknown = ids_N[~found_N]
            raise MemoryServiceError(f"unknown id(s) {unknown[:10].tolist()}: never added, or removed or evicted")
        return list(zip(texts_N.tolist(), _decode_metadata(metas_N).tolist()))

    def stats(self) -> dict:
        """Counts, index state and durability figures, as a JSON-able dict."""
        with self._rw.read():
            self._check_open()
            return {
                "count": self._count,
                "dim": self.config.dim,
                "metric": self.config.metric,
                "index": self._index.kind,
                "nlist": self._index.nlist,
                "nprobe": self.config.nprobe if self._index.nlist else 0,
                "tombstones": self._index.tombstones,
                "gpu": self._index.on_gpu,
                "capacity": self.config.capacity,
                "eviction": self.config.eviction,
                "added_total": self._next_id,
                "evicted_total": self._evicted_total,
                "removed_total": self._removed_total,
                "searched_queries": self._searches,
                "next_id": self._next_id,
                "snapshot_seq": self._snapshot_seq,
                "logged_vectors_since_snapshot": self._logged_vectors,
                "last_recovery_seconds": round(self._recovery["seconds"], 4),
                "last_recovery_replayed_vectors": self._recovery["replayed_vectors"],
                "faiss_threads": self._faiss_threads,
                "path": None if self._ephemeral else self.directory,
                "backup": self.config.backup or None,
                "backed_up_seq": self._backed_up_seq if self._backup else None,
                "restored_from_backup": self._restored,
            }

    # ----- durability ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Write the index atomically and truncate the log it covers; searches keep running meanwhile."""
        if self._ephemeral:
            raise MemoryServiceError("this memory has no path (MemoryConfig.path=None), so there is nowhere durable to "
                                     "snapshot to; create it with MemoryConfig(path=...)")
        with self._writer:
            self._check_open()
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict:
        started = time.perf_counter()
        seq = self._store.last_seq()
        if seq != self._snapshot_seq:
            self._sync_backup()  # the backup's log holds all the local log will drop
            # Writers are excluded (we hold _writer) and searches never mutate FAISS, so reading it is safe.
            self._index.save(self._snapshot_file("index", seq))
            lru_file = self._snapshot_file("lru", seq)
            with open(lru_file + ".tmp", "wb") as f:
                np.save(f, self._last_used_I[:self._next_id], allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(lru_file + ".tmp", lru_file)
            sha256 = _file_sha256(self._snapshot_file("index", seq))
            _fsync_dir(os.path.join(self.directory, "snapshots"))  # the renamed files' entries too
            self._store.mark_snapshot(seq, sha256)  # the commit point: before it, recovery uses the previous snapshot
            self._snapshot_seq = seq
            self._logged_vectors = 0
            if self._backup is not None:
                self._backup_snapshot(seq)
            self._remove_stale_snapshot_files()
        return {"snapshot_seq": seq, "count": self._count, "seconds": round(time.perf_counter() - started, 4)}

    def _maybe_auto_snapshot(self) -> None:
        """A snapshot once the log holds snapshot_every vectors. Its failure (a full disk) fails no write: the write
        is durable in the log already, so this warns and tries again after the next write."""
        if not self._ephemeral and self.config.snapshot_every and self._logged_vectors >= self.config.snapshot_every:
            try:
                self._snapshot_locked()
            except (OSError, RuntimeError, MemoryServiceError) as exc:
                log.warning("memory %s: automatic snapshot failed (%s: %s); the log still holds every write, the "
                            "snapshot is tried again after the next write", self.directory, type(exc).__name__, exc)

    def restore(self) -> dict:
        """Drop the in-memory state and reload it from disk (last snapshot + log), as after a crash; with a backup,
        from the backup when the local store is missing or older."""
        with self._writer, self._rw.write():
            self._check_open()
            self._store.close()
            self._closed = True
            self._restore_from_backup()
            self._open()
        return {**self._recovery, "restored_from_backup": self._restored}

    def close(self) -> None:
        """Release the directory (an ephemeral memory's directory is deleted). Safe to call twice."""
        with self._writer, self._rw.write():
            if self._closed:
                return
            self._closed = True
            self._store.close()
            self._lock_file.close()
            if self._ephemeral:
                self._remove_directory()

    def __enter__(self) -> LocalMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryServiceError("this memory is closed; open it again with LocalMemory(config)")
