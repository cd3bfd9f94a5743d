"""FAISS index wrapper: flat, IVF-Flat (flat until trained, retrained as it grows) and HNSW with tombstones.

The wrapper owns the vectors (they are held once, here) under ids chosen by the service. It is not
thread-safe for mutation; LocalMemory serialises add/remove and lets searches share a read lock.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import faiss
import numpy as np

from memory_service.config import MemoryConfig
from memory_service.errors import MemoryServiceError
from memory_service.progress import progress

# FAISS warns below 39 training points per centroid: k-means is unreliable with fewer.
MIN_POINTS_PER_LIST = 39
# Cap k-means input so retraining a large memory stays a few seconds on a small CPU.
MAX_POINTS_PER_LIST = 64
# Vectors per FAISS add call in a bulk add, so its progress bar moves between calls.
ADD_CHUNK = 16_384


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def derived_nlist(n: int) -> int:
    """IVF lists for n vectors: about sqrt(n), and never fewer than 39 training points per list."""
    return max(1, min(int(math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def _add_in_chunks(index: faiss.Index, ids_N: np.ndarray, vectors_ND: np.ndarray, desc: str) -> None:
    """``index.add_with_ids``; a bulk add goes in chunks under a progress bar (small adds stay one call)."""
    if ids_N.size <= ADD_CHUNK:
        index.add_with_ids(vectors_ND, ids_N)
        return
    with progress(desc=desc, total=int(ids_N.size), unit="vec") as bar:
        for i in range(0, ids_N.size, ADD_CHUNK):
            index.add_with_ids(vectors_ND[i:i + ADD_CHUNK], ids_N[i:i + ADD_CHUNK])
            bar.update(min(ADD_CHUNK, ids_N.size - i))


class VectorIndex:
    """One FAISS index with service-chosen int64 ids.

    Example::

        >>> import numpy as np
        >>> from memory_service.config import MemoryConfig
        >>> index = VectorIndex(MemoryConfig(dim=4, metric="l2"))
        >>> index.add(np.arange(3), np.eye(3, 4, dtype=np.float32))
        >>> index.search(np.eye(1, 4, dtype=np.float32), 1)[1].tolist()
        [[0]]
    """

    def __init__(self, config: MemoryConfig, cpu_index: faiss.Index | None = None) -> None:
        self.config = config
        self._metric = faiss.METRIC_L2 if config.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if config.gpu == "always" and not gpu_available():
            raise MemoryServiceError("MemoryConfig.gpu='always' but faiss has no GPU support or no GPU is visible; "
                                     "install faiss-gpu on a GPU machine or use gpu='auto'")
        # HNSW has no GPU implementation in faiss; flat and IVF move to the GPU when one is present.
        self._use_gpu = config.gpu != "never" and config.index != "hnsw" and gpu_available()
        self._gpu_resources = faiss.StandardGpuResources() if self._use_gpu else None
        # FAISS GPU indexes (and the StandardGpuResources they share) are not safe for concurrent searches: one at a
        # time on the GPU (where each search is short anyway); CPU indexes search in parallel
        self._gpu_lock = threading.Lock() if self._use_gpu else contextlib.nullcontext()
        self._tombstones_T = np.empty(0, dtype=np.int64)  # HNSW only: removed ids still in the graph
        self._tombstone_batch = self._tombstone_selector = None
        self._install(cpu_index if cpu_index is not None else self._empty_base())

    # ----- construction -------------------------------------------------------------------------------
    def _empty_base(self) -> faiss.Index:
        """The index a new memory starts with (an IVF memory starts flat, until it can train)."""
        d = self.config.dim
        if self.config.index == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, self.config.hnsw_m, self._metric)
            hnsw.hnsw.efConstruction = self.config.hnsw_ef_construction
            return faiss.IndexIDMap(hnsw)
        return faiss.IndexIDMap(faiss.IndexFlat(d, self._metric))

    def _install(self, cpu_index: faiss.Index) -> None:
        """Make cpu_index the live index (on the GPU when there is one) with the configured search knobs."""
        host = faiss.downcast_index(cpu_index)
        self._nlist = int(host.nlist) if isinstance(host, faiss.IndexIVF) else 0
        if isinstance(host, faiss.IndexIDMap) and isinstance(faiss.downcast_index(host.index), faiss.IndexHNSW):
            faiss.downcast_index(host.index).hnsw.efSearch = self.config.hnsw_ef_search
        self._index = self._to_device(cpu_index)
        if self._nlist:
            space = faiss.GpuParameterSpace() if self._use_gpu else faiss.ParameterSpace()
            space.set_index_parameter(self._index, "nprobe", self.config.nprobe)

    def _to_device(self, cpu_index: faiss.Index) -> faiss.Index:
        if not self._use_gpu:
            return cpu_index
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)

    def _to_host(self) -> faiss.Index:
        return faiss.index_gpu_to_cpu(self._index) if self._use_gpu else self._index

    # ----- properties --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """'flat', 'hnsw', 'ivf', or 'ivf-untrained' while an IVF memory is still served by a flat index."""
        if self.config.index == "ivf":
            return "ivf" if self.nlist else "ivf-untrained"
        return self.config.index

    @property
    def nlist(self) -> int:
        """IVF lists of the trained index, 0 when not (yet) IVF."""
        return self._nlist

    @property
    def ntotal(self) -> int:
        """Vectors held by FAISS, including HNSW tombstones."""
        return int(self._index.ntotal)

    @property
    def tombstones(self) -> int:
        return int(self._tombstones_T.size)

    @property
    def on_gpu(self) -> bool:
        return self._use_gpu

    # ----- vectors in and out ------------------------------------------------------------------------
    def _prepare(self, vectors_ND: np.ndarray) -> np.ndarray:
        """Cosine is inner product on unit vectors: normalise a copy (inputs may be read-only object-store views)."""
        if self.config.metric != "cosine":
            return np.ascontiguousarray(vectors_ND, dtype=np.float32)
        norms_N1 = np.linalg.norm(vectors_ND, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors_ND / norms_N1, dtype=np.float32)

    def add(self, ids_N: np.ndarray, vectors_ND: np.ndarray) -> None:
        _add_in_chunks(self._index, np.ascontiguousarray(ids_N, dtype=np.int64), self._prepare(vectors_ND),
                       "adding vectors to the FAISS index")
        if self.config.index == "ivf":
            self._maybe_train()

    def remove(self, ids_N: np.ndarray) -> None:
        ids_N = np.ascontiguousarray(ids_N, dtype=np.int64)
        if self.config.index == "hnsw":
            # HNSW graphs cannot delete nodes: remember tombstones that searches skip, rebuild when they pile up.
            self._set_tombstones(np.union1d(self._tombstones_T, ids_N))
            if self.tombstones >= self.config.hnsw_rebuild_fraction * max(1, self.ntotal):
                self._rebuild_without_tombstones()
            return
        if self._use_gpu:
            # GPU flat/IVF indexes do not implement remove_ids: remove on a host copy and move it back.
            host = self._to_host()
            host.remove_ids(ids_N)
            self._install(host)
            return
        self._index.remove_ids(ids_N)

    def search(self, queries_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores_QK float32, ids_QK int64); missing neighbours have id -1."""
        queries_QD = self._prepare(queries_QD)
        if self._tombstone_selector is not None:
            # A fresh params object per call: IndexIDMap rewrites params.sel during a search, so sharing one
            # between concurrent searches would race.
            params = faiss.SearchParametersHNSW(sel=self._tombstone_selector, efSearch=self.config.hnsw_ef_search)
            scores_QK, ids_QK = self._index.search(queries_QD, k, params=params)
        else:
            with self._gpu_lock:
                scores_QK, ids_QK = self._index.search(queries_QD, k)
        return scores_QK, ids_QK

    def ids(self) -> np.ndarray:
        """Every id FAISS holds (including HNSW tombstones), unordered."""
        return self._extract(with_vectors=False)[0]

    def _extract(self, with_vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids_N, vectors_ND) of everything in the index, for retraining and rebuilding."""
        host = faiss.downcast_index(self._to_host())
        if isinstance(host, faiss.IndexIDMap):
            ids_N = faiss.vector_to_array(host.id_map).astype(np.int64)
            vectors_ND = host.index.reconstruct_n(0, host.ntotal) if with_vectors else None
            return ids_N, vectors_ND
        # IVF-Flat: walk the inverted lists; each code is the raw float32 vector.
        invlists = host.invlists
        ids_parts, vector_parts = [], []
        for list_no in range(host.nlist):
            size = invlists.list_size(list_no)
            if size == 0:
                continue
            ids_parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
            if with_vectors:
                codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size).copy()
                vector_parts.append(codes.view(np.float32).reshape(size, self.config.dim))
        if not ids_parts:
            return np.empty(0, np.int64), np.empty((0, self.config.dim), np.float32) if with_vectors else None
        ids_N = np.concatenate(ids_parts).astype(np.int64)
        return ids_N, np.concatenate(vector_parts) if with_vectors else None

    # ----- IVF lifecycle ------------------------------------------------------------------------------
    def _maybe_train(self) -> None:
        """Train IVF once there are 39 points per list; retrain when the derived nlist would double."""
        n, current = self.ntotal, self.nlist
        if self.config.nlist:
            wanted = self.config.nlist if n >= MIN_POINTS_PER_LIST * self.config.nlist else 0
            if current or not wanted:
                return
        else:
            wanted = derived_nlist(n)
            if n < MIN_POINTS_PER_LIST * MIN_POINTS_PER_LIST or (current and wanted < 2 * current):
                return
        self._train(wanted)

    def _train(self, nlist: int) -> None:
        ids_N, vectors_ND = self._extract()  # already normalised for cosine
        # The Python wrapper keeps a reference to the quantizer; read_index'ed copies own theirs.
        ivf = faiss.IndexIVFFlat(faiss.IndexFlat(self.config.dim, self._metric), self.config.dim, nlist, self._metric)
        ivf.cp.max_points_per_centroid = MAX_POINTS_PER_LIST
        ivf.cp.seed = 1234  # deterministic training: a replayed log rebuilds the same lists
        ivf.train(vectors_ND)
        _add_in_chunks(ivf, ids_N, vectors_ND, f"IVF trained ({nlist} lists): adding the vectors")
        self._install(ivf)

    # ----- HNSW tombstones ----------------------------------------------------------------------------
    def _set_tombstones(self, tombstones_T: np.ndarray) -> None:
        self._tombstones_T = tombstones_T.astype(np.int64)
        if tombstones_T.size:
            # IDSelectorNot points at the batch selector without owning it: keep both referenced here.
            self._tombstone_batch = faiss.IDSelectorBatch(self._tombstones_T)
            self._tombstone_selector = faiss.IDSelectorNot(self._tombstone_batch)
        else:
            self._tombstone_batch = self._tombstone_selector = None

    def _rebuild_without_tombstones(self) -> None:
        ids_N, vectors_ND = self._extract()
        keep_N = ~np.isin(ids_N, self._tombstones_T)
        rebuilt = self._empty_base()
        rebuilt.add_with_ids(np.ascontiguousarray(vectors_ND[keep_N]), ids_N[keep_N])
        self._install(rebuilt)
        self._set_tombstones(np.empty(0, np.int64))

    def reconcile(self, live_ids_N: np.ndarray) -> None:
        """After recovery: HNSW ids not live are tombstones; flat/IVF must hold exactly the live ids."""
        held_N = self.ids()
        if self.config.index == "hnsw":
            self._set_tombstones(np.setdiff1d(held_N, live_ids_N))
        elif held_N.size != live_ids_N.size:
            raise MemoryServiceError(f"recovered index holds {held_N.size} vectors but the store has {live_ids_N.size} "
                                     "entries; the memory directory is inconsistent — restore it from a backup")

    # ----- persistence --------------------------------------------------------------------------------
    def save(self, file_path: str) -> None:
        """Write atomically: a temp file, fsync, then rename over the target."""
        tmp = file_path + ".tmp"
        faiss.write_index(self._to_host(), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file_path)

    @classmethod
    def load(cls, config: MemoryConfig, file_path: str) -> VectorIndex:
        return cls(config, faiss.read_index(file_path))
