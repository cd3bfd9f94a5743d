"""Shared semantic memory: a FAISS index with a durable text/metadata store, in-process or as a named Ray actor.

Example::

    >>> import numpy as np, tempfile
    >>> from memory_service import LocalMemory, MemoryConfig
    >>> with tempfile.TemporaryDirectory() as path, LocalMemory(MemoryConfig(dim=8, path=path)) as mem:
    ...     ids = mem.add(np.random.rand(3, 8).astype(np.float32), ["a", "b", "c"])
    ...     mem.stats()["count"]
    3

For the shared service, ``get_or_create_memory("semantic", MemoryConfig(dim=..., path=...))`` returns a client
with the same methods (see memory_service.actor).
"""

try:
    import faiss  # noqa: F401
except ImportError as exc:  # the base install brings no FAISS: its CPU and GPU wheels exclude each other
    raise ImportError("memtrain's semantic memory needs FAISS: pip install -e '.[cpu]' (or '.[gpu]' on a GPU "
                      "machine, after a CUDA build of torch)") from exc

from memory_service.actor import MemoryClient, PendingSearch, get_or_create_memory
from memory_service.config import MemoryConfig
from memory_service.errors import MemoryServiceError
from memory_service.local import Hit, LocalMemory, SearchHits

__all__ = ["Hit", "LocalMemory", "MemoryClient", "MemoryConfig", "MemoryServiceError", "PendingSearch", "SearchHits",
           "get_or_create_memory"]
