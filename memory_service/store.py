"""Durable store: texts and metadata, the write-ahead log and the service state, in one SQLite database (WAL mode).

One SQLite transaction per acknowledged write holds the entry rows, the log record (ids; for adds the float32
vectors, texts, metadata and idempotency key), the counters after the write, and the add's key, so a crash
leaves either all of a write or none of it. The log only holds what happened since the last snapshot; a
snapshot truncates it. A log record is complete enough to redo its write on another node (``LogRecord``,
``apply``), which is how a memory's shared backup is kept and restored. Nothing here is pickled: rows are text,
JSON and raw little-endian int64/float32 bytes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from memory_service.errors import MemoryServiceError
from memory_service.progress import progress

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, text TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS wal (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, ids BLOB NOT NULL, vectors BLOB);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, first_id INTEGER NOT NULL, n INTEGER NOT NULL);
"""
# Columns the log gained so that a record can be redone elsewhere (added to stores made before them).
WAL_COLUMNS = {"texts": "TEXT", "metas": "TEXT", "key": "TEXT", "counters": "TEXT"}

# Counters kept in the state table, updated in the same transaction as the write they count.
COUNTERS = ("next_id", "snapshot_seq", "evicted_total", "removed_total")
# Idempotency keys kept (newest first) after a snapshot prunes them: a client retries within seconds.
KEPT_KEYS = 100_000


class LogRecord(NamedTuple):
    """One write as the log holds it: enough to redo it on an empty store (a restore from the shared backup)."""

    seq: int
    op: str  # "add" or "remove" (an add's evictions are a "remove" record just before it)
    ids_N: np.ndarray  # int64
    vectors_ND: np.ndarray | None  # float32, adds only
    texts: list[str] | None  # adds only
    metas: list[str | None] | None  # metadata JSON, adds only
    key: str | None  # the add's idempotency key
    counters: dict[str, int]  # the counters after the write

    def encode(self) -> bytes:
        """A self-describing byte string: magic, header length, JSON header, then ids and vectors as raw bytes."""
        header = json.dumps({"seq": self.seq, "op": self.op, "n": int(self.ids_N.size),
                             "dim": 0 if self.vectors_ND is None else int(self.vectors_ND.shape[1]),
                             "texts": self.texts, "metas": self.metas, "key": self.key,
                             "counters": self.counters}).encode("utf-8")
        vectors = b"" if self.vectors_ND is None else self.vectors_ND.astype("<f4").tobytes()
        return b"".join([RECORD_MAGIC, len(header).to_bytes(8, "little"), header,
                         self.ids_N.astype("<i8").tobytes(), vectors])

    @classmethod
    def decode(cls, data: bytes) -> LogRecord:
        if not data.startswith(RECORD_MAGIC):
            raise MemoryServiceError("a backup log record does not start with the memtrain record header; the backup "
                                     "holds a foreign or damaged file")
        at = len(RECORD_MAGIC)
        size = int.from_bytes(data[at:at + 8], "little")
        header = json.loads(data[at + 8:at + 8 + size])
        at += 8 + size
        n, dim = header["n"], header["dim"]
        ids_N = np.frombuffer(data, "<i8", n, at).astype(np.int64)
        vectors_ND = np.frombuffer(data, "<f4", n * dim, at + 8 * n).reshape(n, dim).copy() if dim else None
        return cls(header["seq"], header["op"], ids_N, vectors_ND, header["texts"], header["metas"], header["key"],
                   header["counters"])


RECORD_MAGIC = b"memtrain-memory-log-1\n"


class _Mirror(NamedTuple):
    """Committed rows indexed by id, so searches gather texts and metadata with numpy instead of per-hit Python."""

    known_I: np.ndarray  # bool: slot i holds the committed row of id i
    text_I: np.ndarray  # object: str
    meta_I: np.ndarray  # object: metadata JSON str or None


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of these Python objects (np.array would make a list of str a fixed-width str array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class Store:
    """SQLite-backed entries + write-ahead log. Writes come from one thread at a time (the caller's writer lock);
    reads use one connection per thread so concurrent searches do not share a cursor."""

    def __init__(self, db_path: str, fsync: bool) -> None:
        self.db_path = db_path
        self._fsync = fsync
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        have = {row[1] for row in self._writer.execute("PRAGMA table_info(wal)")}
        for column, kind in WAL_COLUMNS.items():
            if column not in have:
                self._writer.execute(f"ALTER TABLE wal ADD COLUMN {column} {kind}")
        # The rows read or written since open, indexed by id: searches skip SQLite for them. It only ever holds
        # committed rows (filled after a commit or from a read). Fills and growth take _mirror_lock; readers take
        # no lock: they read one _Mirror tuple (growth swaps in a new one) and set slots in the order text, meta,
        # known. Forgetting rows (removals) runs only while the caller excludes reads.
        self._mirror = _Mirror(np.zeros(1024, bool), np.full(1024, None), np.full(1024, None))  # never empty
        self._mirror_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise MemoryServiceError(f"SQLite at {self.db_path} refused WAL mode (got {mode!r}); put the memory path on a "
                                     "local filesystem (network filesystems cannot host SQLite WAL)")
        # NORMAL in WAL mode: a commit reaches the OS before we acknowledge, so it survives a killed process;
        # FULL also fsyncs, so it survives power loss.
        conn.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._writer.close()

    # ----- state --------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        rows = dict(self._writer.execute("SELECT key, value FROM state").fetchall())
        return {name: int(rows.get(name, 0)) for name in COUNTERS}

    def stored_config(self) -> dict | None:
        row = self._writer.execute("SELECT value FROM state WHERE key = 'config'").fetchone()
        return json.loads(row[0]) if row else None

    def save_config(self, config: dict) -> None:
        self._writer.execute("INSERT OR REPLACE INTO state VALUES ('config', ?)", (json.dumps(config),))

    def _set_counters(self, values: dict[str, int]) -> None:
        self._writer.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", [(k, str(int(v))) for k, v in values.items()])

    # ----- writes (one transaction each) -------------------------------------------------------------
    def write_add(self, ids_N: np.ndarray, texts: list[str], metas: list[str | None], vectors_ND: np.ndarray,
                  victims_V: np.ndarray, counters: dict[str, int], key: str | None = None) -> None:
        """Evict victims_V (if any) and add the entries, logging both, atomically; ``key`` records the add under
        its idempotency key."""
        counters = {**self.counters(), **counters}
        with self._transaction():
            if victims_V.size:
                self._delete_entries(victims_V)
                self._log("remove", victims_V, None, None, None, None, counters)
            self._writer.executemany("INSERT INTO entries VALUES (?, ?, ?)", zip(ids_N.tolist(), texts, metas))
            self._log("add", ids_N, vectors_ND, texts, metas, key, counters)
            if key is not None:
                self._writer.execute("INSERT INTO keys VALUES (?, ?, ?)", (key, int(ids_N[0]), int(ids_N.size)))
            self._set_counters(counters)
        self._forget(victims_V)
        self._remember(ids_N, object_array(texts), object_array(metas))

    def write_remove(self, ids_N: np.ndarray, counters: dict[str, int]) -> None:
        counters = {**self.counters(), **counters}
        with self._transaction():
            self._delete_entries(ids_N)
            self._log("remove", ids_N, None, None, None, None, counters)
            self._set_counters(counters)
        self._forget(ids_N)

    def _log(self, op: str, ids_N: np.ndarray, vectors_ND: np.ndarray | None, texts: list[str] | None,
             metas: list[str | None] | None, key: str | None, counters: dict[str, int]) -> None:
        self._writer.execute(
            "INSERT INTO wal (op, ids, vectors, texts, metas, key, counters) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (op, ids_N.astype("<i8").tobytes(), None if vectors_ND is None else vectors_ND.astype("<f4").tobytes(),
             None if texts is None else json.dumps(texts), None if metas is None else json.dumps(metas), key,
             json.dumps(counters)))

    def apply(self, record: LogRecord) -> None:
        """Redo a write from another store's log at the same sequence number (restoring from a backup)."""
        with self._transaction():
            if record.op == "add":
                self._writer.executemany("INSERT INTO entries VALUES (?, ?, ?)",
                                         zip(record.ids_N.tolist(), record.texts, record.metas))
                if record.key is not None:
                    self._writer.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?)",
                                         (record.key, int(record.ids_N[0]), int(record.ids_N.size)))
            else:
                self._delete_entries(record.ids_N)
            self._writer.execute(
                "INSERT INTO wal (seq, op, ids, vectors, texts, metas, key, counters) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.seq, record.op, record.ids_N.astype("<i8").tobytes(),
                 None if record.vectors_ND is None else record.vectors_ND.astype("<f4").tobytes(),
                 None if record.texts is None else json.dumps(record.texts),
                 None if record.metas is None else json.dumps(record.metas), record.key, json.dumps(record.counters)))
            self._set_counters(record.counters)

    def records_since(self, seq: int, dim: int) -> Iterator[LogRecord]:
        """Every log record after ``seq``, whole (for the shared backup)."""
        for row in self._writer.execute("SELECT seq, op, ids, vectors, texts, metas, key, counters FROM wal "
                                        "WHERE seq > ? ORDER BY seq", (seq,)):
            row_seq, op, ids_blob, vectors_blob, texts, metas, key, counters = row
            ids_N = np.frombuffer(ids_blob, dtype="<i8").astype(np.int64)
            vectors_ND = None if vectors_blob is None else np.frombuffer(vectors_blob, dtype="<f4").reshape(-1, dim)
            yield LogRecord(row_seq, op, ids_N, vectors_ND, None if texts is None else json.loads(texts),
                            None if metas is None else json.loads(metas), key,
                            json.loads(counters) if counters else self.counters())

    def applied(self, key: str) -> tuple[int, int] | None:
        """(first id, count) of the add recorded under an idempotency key, or None."""
        row = self._writer.execute("SELECT first_id, n FROM keys WHERE key = ?", (key,)).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def copy_to(self, db_path: str) -> None:
        """A consistent copy of the whole database (SQLite's online backup; writers are excluded by the caller)."""
        target = sqlite3.connect(db_path)
        try:
            self._writer.backup(target)
        finally:
            target.close()

    def _remember(self, ids_N: np.ndarray, texts_N: np.ndarray, metas_N: np.ndarray) -> None:
        if not ids_N.size:
            return
        with self._mirror_lock:
            mirror = self._mirror
            needed = int(ids_N.max()) + 1
            if needed > mirror.known_I.size:
                extra = max(needed, 2 * mirror.known_I.size) - mirror.known_I.size
                mirror = self._mirror = _Mirror(np.concatenate([mirror.known_I, np.zeros(extra, bool)]),
                                                np.concatenate([mirror.text_I, np.full(extra, None)]),
                                                np.concatenate([mirror.meta_I, np.full(extra, None)]))
            mirror.text_I[ids_N] = texts_N
            mirror.meta_I[ids_N] = metas_N
            mirror.known_I[ids_N] = True

    def _forget(self, ids_N: np.ndarray) -> None:
        with self._mirror_lock:
            mirror = self._mirror
            ids_N = ids_N[ids_N < mirror.known_I.size]
            mirror.known_I[ids_N] = False
            mirror.text_I[ids_N] = None
            mirror.meta_I[ids_N] = None

    def mark_snapshot(self, seq: int, sha256: str) -> None:
        """The snapshot file for `seq` (with this SHA-256) is on disk: it becomes the current snapshot, the one before
        it the previous, and the log drops what the previous one covers (so a damaged current snapshot can still be
        rebuilt from the previous one plus the log); all but the newest idempotency keys go too."""
        snap = self.snapshots()
        # a snapshot again at the current seq (replacing a damaged file) keeps the older one as the previous
        previous_seq, previous_sha = ((snap["seq"], snap["sha256"]) if snap["seq"] != seq
                                      else (snap["previous_seq"], snap["previous_sha256"]))
        with self._transaction():
            self._set_counters({"snapshot_seq": seq})
            self._writer.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", [
                ("snapshot_sha256", sha256), ("previous_snapshot_seq", str(previous_seq)),
                ("previous_snapshot_sha256", previous_sha)])
            self._writer.execute("DELETE FROM wal WHERE seq <= ?", (previous_seq,))
            self._writer.execute("DELETE FROM keys WHERE rowid <= (SELECT MAX(rowid) FROM keys) - ?", (KEPT_KEYS,))

    def snapshots(self) -> dict:
        """The current and previous snapshot: {"seq", "sha256", "previous_seq", "previous_sha256"} ("" = unknown)."""
        state = dict(self._writer.execute("SELECT key, value FROM state WHERE key IN ('snapshot_seq', "
                                          "'snapshot_sha256', 'previous_snapshot_seq', 'previous_snapshot_sha256')"))
        return {"seq": int(state.get("snapshot_seq", 0)), "sha256": state.get("snapshot_sha256", ""),
                "previous_seq": int(state.get("previous_snapshot_seq", 0)),
                "previous_sha256": state.get("previous_snapshot_sha256", "")}

    def _delete_entries(self, ids_N: np.ndarray) -> None:
        self._writer.executemany("DELETE FROM entries WHERE id = ?", ((i,) for i in ids_N.tolist()))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._writer.execute("COMMIT")
        except sqlite3.Error as err:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            raise MemoryServiceError(f"could not write to {self.db_path}: {err}; check free disk space and "
                                     "permissions — nothing of this call was written") from err
        except BaseException:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            raise

    # ----- reads --------------------------------------------------------------------------------------
    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(texts, metas, found) for an int64 id array of any shape (repeats and -1 allowed): object arrays of text and
        metadata JSON (None where there is none, or where found is False because the store has no such id)."""
        texts, metas, found = self._gather(ids)
        missing = ~found & (ids >= 0)
        if missing.any():
            # The ids are int64 values (ours, or checked by the caller), so inlining them is safe, and about 2x
            # faster than binding hundreds of parameters.
            id_list = ",".join(map(str, np.unique(ids[missing]).tolist()))
            fetched = self._reader().execute(f"SELECT id, text, meta FROM entries WHERE id IN ({id_list})").fetchall()
            if fetched:
                self._remember(np.fromiter((row[0] for row in fetched), np.int64, len(fetched)),
                               object_array([row[1] for row in fetched]), object_array([row[2] for row in fetched]))
                texts, metas, found = self._gather(ids)
        return texts, metas, found

    def _gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mirror = self._mirror
        found = (ids >= 0) & (ids < mirror.known_I.size)
        slots = np.where(found, ids, 0)
        found &= mirror.known_I[slots]
        return np.where(found, mirror.text_I[slots], None), np.where(found, mirror.meta_I[slots], None), found

    def live_ids(self) -> np.ndarray:
        rows = self._writer.execute("SELECT id FROM entries ORDER BY id").fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def last_seq(self) -> int:
        row = self._writer.execute("SELECT seq FROM sqlite_sequence WHERE name = 'wal'").fetchone()
        return int(row[0]) if row else 0

    def log_since(self, seq: int, dim: int) -> Iterator[tuple[int, str, np.ndarray, np.ndarray | None]]:
        """(seq, op, ids_N, vectors_ND or None) for every log record after `seq`, in order (recovery replays them,
        under a progress bar)."""
        total = self._writer.execute("SELECT COUNT(*) FROM wal WHERE seq > ?", (seq,)).fetchone()[0]
        with progress(desc="replaying the memory's write-ahead log", total=int(total), unit="write") as bar:
            for row_seq, op, ids_blob, vectors_blob in self._writer.execute(
                    "SELECT seq, op, ids, vectors FROM wal WHERE seq > ? ORDER BY seq", (seq,)):
                ids_N = np.frombuffer(ids_blob, dtype="<i8").astype(np.int64)
                vectors_ND = None if vectors_blob is None else np.frombuffer(vectors_blob, dtype="<f4").reshape(-1, dim)
                yield row_seq, op, ids_N, vectors_ND
                bar.update()

    def logged_vectors(self, dim: int) -> int:
        """Vectors in the log since the last snapshot (what recovery would replay)."""
        row = self._writer.execute("SELECT COALESCE(SUM(LENGTH(vectors)), 0) FROM wal").fetchone()
        return int(row[0]) // (4 * dim)
