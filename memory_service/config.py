"""Typed configuration of one semantic memory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memory_service.errors import MemoryServiceError

INDEX_KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "ip", "l2")
EVICTION_POLICIES = ("oldest", "lru")
GPU_MODES = ("auto", "never", "always")

# Fields that shape the files on disk: a memory reopened from `path` must agree on these.
STRUCTURAL_FIELDS = ("dim", "index", "metric", "hnsw_m")


@dataclass
class MemoryConfig:
    """Everything one memory needs; validated on construction.

    Example::

        >>> from memory_service import MemoryConfig
        >>> MemoryConfig(dim=64, index="ivf", metric="cosine", capacity=10_000).nprobe
        16
    """

    dim: int = 128
    """Vector dimension; every vector added or searched must have exactly this many float32 values."""
    index: str = "flat"
    """Index kind: 'flat' (exact), 'ivf' (IVF-Flat, flat until enough vectors to train) or 'hnsw' (graph, removes become tombstones)."""
    metric: str = "cosine"
    """Similarity: 'cosine' (vectors are L2-normalised, score = cosine), 'ip' (inner product) or 'l2' (score = squared distance, lower is closer)."""
    capacity: int = 0
    """Maximum number of live entries; an add that would exceed it evicts first. 0 means unbounded."""
    eviction: str = "oldest"
    """Which entries make room at capacity: 'oldest' (smallest id first) or 'lru' (least recently retrieved by a search, then oldest)."""
    path: str | None = None
    """Directory holding the store, the write-ahead log and snapshots, on the disk of the node that serves the memory.
    None keeps an ephemeral memory in a private temp dir, deleted by close() (one never closed: when it is
    garbage-collected or the interpreter exits). The shared actor resolves a relative path on its own node, under
    MEMTRAIN_MEMORY_ROOT (default ~/.cache/memtrain/memory), never in the caller's working directory."""
    backup: str = ""
    """Shared storage every acknowledged write also reaches before it is acknowledged, and snapshots are copied to: a
    URI (s3://bucket/memories/semantic, gs://...) or a folder every node mounts. A memory whose path holds no store
    (its node was lost, the actor restarted on another node) restores itself from there. "" = the path's disk only."""
    nlist: int = 0
    """IVF lists. 0 derives it from the size (about sqrt(n), never under 39 training vectors per list) and retrains when the size quadruples."""
    nprobe: int = 16
    """IVF lists scanned per query; higher is slower and more exact."""
    hnsw_m: int = 32
    """HNSW neighbours per node."""
    hnsw_ef_search: int = 64
    """HNSW candidate list size at search time; higher is slower and more exact."""
    hnsw_ef_construction: int = 80
    """HNSW candidate list size while inserting."""
    hnsw_rebuild_fraction: float = 0.25
    """HNSW rebuilds its graph without tombstones once this fraction of the indexed vectors are tombstones."""
    snapshot_every: int = 200_000
    """Take a snapshot automatically once the write-ahead log holds this many vectors since the last one (bounds recovery time). 0 disables."""
    fsync: bool = True
    """fsync every acknowledged write (survives power loss). False still survives a killed process, since the log reaches the OS first."""
    faiss_threads: int = 0
    """OpenMP threads FAISS uses for search and add. 0 keeps the process default (in a Ray actor: num_cpus, at least 1)."""
    gpu: str = "auto"
    """'auto' uses a GPU index when faiss has GPU support and a GPU is present, 'never' stays on CPU, 'always' errors without a GPU."""
    num_cpus: float = 0.0
    """CPUs the Ray actor reserves (when faiss_threads is 0, FAISS uses as many threads, at least 1). 0 lets it live on
    a head node that has no CPUs for training, as the cluster YAMLs' heads."""
    num_gpus: float = 0.0
    """GPUs the Ray actor reserves; with one, gpu='auto' builds a FAISS GPU index (flat and IVF)."""
    resource: str = "memory_host"
    """Custom Ray resource the actor asks for, which places it on the node the cluster reserves for memories (the
    cluster YAMLs give their head memory_host: 1). When no node of the cluster offers it (one machine), the actor is
    placed without it. "" = no custom resource."""
    resource_amount: float = 0.01
    """How much of `resource` each memory actor takes (0.01: a hundred memories fit a node's memory_host: 1)."""
    max_concurrency: int = 8
    """Concurrent calls the Ray actor runs on threads; searches overlap, writes take a single-writer lock."""
    max_restarts: int = -1
    """How many times Ray restarts a crashed actor (it reloads snapshot + log); -1 means without limit."""
    call_timeout_s: float = 60.0
    """How long a client waits for one call, restarts of the actor included, before it gives up with an error (a hung
    actor never blocks a caller for longer)."""
    max_k: int = 1024
    """Largest k a search may ask for (FAISS allocates queries x k results)."""
    max_batch: int = 65_536
    """Most vectors one add, or queries one search, may carry."""
    max_text_bytes: int = 65_536
    """Longest text of one entry, in UTF-8 bytes."""
    max_metadata_bytes: int = 65_536
    """Longest metadata of one entry, as JSON bytes."""

    def __post_init__(self) -> None:
        def refuse(field: str, value: object, fix: str) -> None:
            raise MemoryServiceError(f"MemoryConfig.{field}={value!r} is invalid: {fix}")

        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            refuse("dim", self.dim, "use a positive int, the length of your embedding vectors")
        for field, choices in (("index", INDEX_KINDS), ("metric", METRICS), ("eviction", EVICTION_POLICIES), ("gpu", GPU_MODES)):
            if getattr(self, field) not in choices:
                refuse(field, getattr(self, field), f"choose one of {', '.join(choices)}")
        for field in ("capacity", "nlist", "snapshot_every", "faiss_threads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                refuse(field, value, "use an int >= 0")
        for field in ("nprobe", "hnsw_m", "hnsw_ef_search", "hnsw_ef_construction", "max_concurrency", "max_k",
                      "max_batch", "max_text_bytes", "max_metadata_bytes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                refuse(field, value, "use an int >= 1")
        if not 0.0 < self.hnsw_rebuild_fraction <= 1.0:
            refuse("hnsw_rebuild_fraction", self.hnsw_rebuild_fraction, "use a fraction in (0, 1]")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < -1:
            refuse("max_restarts", self.max_restarts, "use -1 (unlimited) or an int >= 0")
        for field in ("num_cpus", "num_gpus", "resource_amount"):
            if getattr(self, field) < 0:
                refuse(field, getattr(self, field), "use a number >= 0")
        if self.call_timeout_s <= 0:
            refuse("call_timeout_s", self.call_timeout_s, "use a number of seconds > 0")
        if self.backup and self.path is None:
            refuse("backup", self.backup, "a backed-up memory needs a path too (where it works between backups)")
        if self.path is not None and not isinstance(self.path, str):
            self.path = str(self.path)  # accept pathlib.Path; stored as str so the config stays JSON-able

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MemoryConfig:
        """Build from a plain dict, refusing unknown keys with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise MemoryServiceError(f"unknown MemoryConfig field(s) {unknown}; valid fields: {', '.join(sorted(valid))}")
        return cls(**values)
