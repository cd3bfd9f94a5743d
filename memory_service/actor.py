"""The shared memory: a LocalMemory inside a named, detached, threaded Ray actor, and a synchronous client.

The actor runs up to `max_concurrency` calls on threads. Searches overlap (FAISS releases the GIL); writes
take LocalMemory's single-writer lock. If the actor process dies, Ray restarts it (`max_restarts`) and its
constructor recovers from the last snapshot plus the write-ahead log, so every acknowledged write survives.
Ray is imported lazily so that `LocalMemory` users never pay for it.
"""

from __future__ import annotations

import os
import time

import faiss
import numpy as np

from memory_service.config import STRUCTURAL_FIELDS, MemoryConfig
from memory_service.errors import MemoryServiceError
from memory_service.local import LocalMemory, PackedHits, SearchHits

DEFAULT_NAMESPACE = "memtrain"


class MemoryActor:
    """Actor body: one LocalMemory in the actor's process (wrapped with ray.remote at creation)."""

    def __init__(self, config: dict) -> None:
        # faiss's Python wrapper installs a Ctrl-C callback that long FAISS calls poll, taking the GIL each time; in
        # a threaded actor every other Python thread (calls being (de)serialized, concurrent writers) then stalls
        # each search by up to a GIL switch interval (measured: a 6 ms IVF search took 340 ms beside one busy
        # thread). Nobody presses Ctrl-C in an actor, so drop the callback for this process.
        faiss.InterruptCallback.clear_instance()
        self._memory = LocalMemory(MemoryConfig.from_dict(config))

    def add(self, vectors_ND: np.ndarray, texts: list[str], metadata: list[dict | None] | None) -> np.ndarray:
        return self._memory.add(vectors_ND, texts, metadata)

    def search_packed(self, queries_QD: np.ndarray, k: int) -> PackedHits:
        return self._memory.search_packed(queries_QD, k)

    def remove(self, ids: np.ndarray) -> int:
        return self._memory.remove(ids)

    def get(self, ids: np.ndarray) -> list[tuple[str, dict | None]]:
        return self._memory.get(ids)

    def stats(self) -> dict:
        return self._memory.stats()

    def snapshot(self) -> dict:
        return self._memory.snapshot()

    def restore(self) -> dict:
        return self._memory.restore()

    def config(self) -> dict:
        return self._memory.config.to_dict()

    def pid(self) -> int:
        """The actor's process id (tests kill it to check crash recovery)."""
        return os.getpid()


class MemoryClient:
    """Synchronous client of a named memory actor, with the methods of LocalMemory.

    It pickles as (name, namespace), so it can be handed to Ray tasks, Train workers and env runners, which
    look the actor up by name on first use. Reads retry while the actor restarts; a write interrupted by a
    crash raises MemoryServiceError, because it may or may not have been applied.
    """

    def __init__(self, name: str, namespace: str = DEFAULT_NAMESPACE, handle=None, call_timeout_s: float = 60.0) -> None:
        self.name = name
        self.namespace = namespace
        self.call_timeout_s = call_timeout_s
        self._actor = handle

    def __reduce__(self):
        return MemoryClient, (self.name, self.namespace, None, self.call_timeout_s)

    def __repr__(self) -> str:
        return f"MemoryClient(name={self.name!r}, namespace={self.namespace!r})"

    def _handle(self):
        if self._actor is None:
            import ray

            try:
                self._actor = ray.get_actor(self.name, namespace=self.namespace)
            except ValueError:
                raise MemoryServiceError(f"no memory named {self.name!r} in Ray namespace {self.namespace!r}; start it with "
                                         "get_or_create_memory(name, MemoryConfig(...)) or `memtrain memory serve`") from None
        return self._actor

    def _call(self, method: str, *args, write: bool = False):
        return self._result(method, args, self._submit(method, args), write)

    def _submit(self, method: str, args: tuple):
        return getattr(self._handle(), method).remote(*args)

    def _result(self, method: str, args: tuple, ref, write: bool = False):
        """The value of a submitted call; reads are resubmitted while the actor restarts, writes are not."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        deadline = time.monotonic() + self.call_timeout_s
        while True:
            try:
                return ray.get(ref)
            except RayTaskError as err:
                if isinstance(err.cause, MemoryServiceError):
                    raise err.cause from None  # the service's own message, without the remote traceback around it
                raise
            except RayActorError as err:
                if write:
                    raise MemoryServiceError(
                        f"{method} on memory {self.name!r} was not acknowledged: the actor died during the call ({err.__class__.__name__}). "
                        "Everything acknowledged before is safe and the actor restarts from snapshot + log; retry the "
                        "call (it may already have been applied)") from err
                if time.monotonic() > deadline:
                    raise MemoryServiceError(f"memory {self.name!r} did not answer {method} within {self.call_timeout_s}s "
                                             f"({err.__class__.__name__}); check `memtrain memory stats --name {self.name}` "
                                             "and the actor's logs") from err
                time.sleep(0.2)
                ref = self._submit(method, args)

    def add(self, vectors_ND: np.ndarray, texts: list[str], metadata: list[dict | None] | None = None) -> np.ndarray:
        """See LocalMemory.add; durable once it returns."""
        return self._call("add", vectors_ND, texts, metadata, write=True)

    def search(self, queries_QD: np.ndarray, k: int = 10) -> SearchHits:
        """See LocalMemory.search. The actor sends the compact PackedHits; they are expanded here."""
        return self._call("search_packed", queries_QD, k).unpack()

    def search_async(self, queries_QD: np.ndarray, k: int = 10) -> PendingSearch:
        """Start a search and return at once; ``.result()`` of the returned PendingSearch gives its SearchHits.

        Keeping two or more searches in flight lets the actor run one while the Ray round trip of another is under
        way: on the 100k IVF benchmark, batches of 64 with two in flight reach 0.8-0.9 of in-process FAISS QPS
        (BENCHMARKS.md). Errors (bad input, a dead actor) surface from ``result()``, as ``search`` raises them.

        Example::

            >>> pending = [mem.search_async(q_QD, k=5) for q_QD in query_batches]   # doctest: +SKIP
            >>> hits = [p.result() for p in pending]                                 # doctest: +SKIP
        """
        args = (queries_QD, k)
        return PendingSearch(self, args, self._submit("search_packed", args))

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """See LocalMemory.remove."""
        return self._call("remove", np.asarray(ids), write=True)

    def get(self, ids: np.ndarray | list[int]) -> list[tuple[str, dict | None]]:
        """See LocalMemory.get."""
        return self._call("get", np.asarray(ids))

    def stats(self) -> dict:
        """See LocalMemory.stats."""
        return self._call("stats")

    def snapshot(self) -> dict:
        """See LocalMemory.snapshot."""
        return self._call("snapshot", write=True)

    def restore(self) -> dict:
        """See LocalMemory.restore."""
        return self._call("restore", write=True)

    def config(self) -> MemoryConfig:
        return MemoryConfig.from_dict(self._call("config"))

    def pid(self) -> int:
        return self._call("pid")

    def shutdown(self, snapshot: bool = True) -> None:
        """Stop the detached actor for good (after a final snapshot unless snapshot=False); its data stays on disk."""
        import ray

        if snapshot:
            self.snapshot()
        ray.kill(self._handle(), no_restart=True)
        self._actor = None


class PendingSearch:
    """A search started by ``MemoryClient.search_async``; ``result()`` waits for it and returns its SearchHits."""

    def __init__(self, client: MemoryClient, args: tuple, ref) -> None:
        self._client, self._args, self._ref = client, args, ref

    def result(self) -> SearchHits:
        return self._client._result("search_packed", self._args, self._ref).unpack()


def get_or_create_memory(name: str, config: MemoryConfig | None = None, namespace: str = DEFAULT_NAMESPACE) -> MemoryClient:
    """Attach to the named memory actor, creating it from `config` if it does not exist yet.

    With config=None it only attaches. An existing actor must agree with `config` on dim, index, metric and path.
    Needs `ray.init(...)` first (in Ray workers it already ran).

    Example::

        >>> import numpy as np, ray, tempfile                           # doctest: +SKIP
        >>> ray.init()                                                    # doctest: +SKIP
        >>> mem = get_or_create_memory("semantic", MemoryConfig(dim=8, path=tempfile.mkdtemp()))  # doctest: +SKIP
        >>> ids = mem.add(np.ones((2, 8), np.float32), ["x", "y"])        # doctest: +SKIP
        >>> mem.search(np.ones((1, 8), np.float32), k=1).texts            # doctest: +SKIP
        [['x']]
    """
    import ray
    from ray.exceptions import RayActorError

    if not ray.is_initialized():
        raise MemoryServiceError("Ray is not initialised in this process; call ray.init(address='auto') to join a "
                                 "cluster, or ray.init() for a local one, before get_or_create_memory")
    if config is None:
        client = MemoryClient(name, namespace)
        client._handle()
        return client
    if config.path is None:
        raise MemoryServiceError("the shared memory actor needs MemoryConfig.path (a directory on the actor's node) so it "
                                 "can recover after a restart; use LocalMemory for an ephemeral memory")
    config = MemoryConfig.from_dict({**config.to_dict(), "path": os.path.abspath(config.path)})
    actor_class = ray.remote(MemoryActor)
    handle = actor_class.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=config.max_restarts, max_task_retries=0,  # writes must not be silently re-applied
        max_concurrency=config.max_concurrency, num_cpus=config.num_cpus,
    ).remote(config.to_dict())
    client = MemoryClient(name, namespace, handle, config.call_timeout_s)
    try:
        existing = ray.get(handle.config.remote())
    except RayActorError as err:
        ray.kill(handle, no_restart=True)  # free the name so a corrected config can be tried
        raise MemoryServiceError(f"memory actor {name!r} failed to start: {err}") from err
    differing = [f"{f}: running={existing[f]!r} requested={getattr(config, f)!r}"
                 for f in (*STRUCTURAL_FIELDS, "path") if existing[f] != getattr(config, f)]
    if differing:
        raise MemoryServiceError(f"memory {name!r} in namespace {namespace!r} already runs with a different config ("
                                 + "; ".join(differing) + "); attach with config=None, or pick another name")
    return client
