"""The shared memory: a LocalMemory inside a named, detached, threaded Ray actor, and a synchronous client.

The actor runs up to `max_concurrency` calls on threads. Searches overlap (FAISS releases the GIL); writes
take LocalMemory's single-writer lock. If the actor process dies, Ray restarts it (`max_restarts`) and its
constructor recovers from the last snapshot plus the write-ahead log, so every acknowledged write survives.

Placement: the actor asks for `MemoryConfig.resource` (the cluster YAMLs reserve `memory_host` on the head), so it
lives on the node meant for it; on a cluster without that resource (one machine) it is placed without it. Its
`path` is a folder of that node (a relative one is under MEMTRAIN_MEMORY_ROOT, default ~/.cache/memtrain/memory,
of that node). When the node is lost, Ray restarts the actor on another node that offers the resource: with a
`backup` it rebuilds its store from there; without one it finds no store of its own and refuses every call (it
never serves an empty memory in place of a lost one) until it is stopped and served again with a backup.

Ray is imported lazily so that `LocalMemory` users never pay for it.
"""

from __future__ import annotations

import os
import warnings
import time
import uuid

import faiss
import numpy as np

from memory_service.config import STRUCTURAL_FIELDS, MemoryConfig
from memory_service.errors import MemoryServiceError
from memory_service.local import LocalMemory, PackedHits, SearchHits

DEFAULT_NAMESPACE = "memtrain"
ROOT_ENV = "MEMTRAIN_MEMORY_ROOT"  # where the actor puts a relative path, on its own node
INCARNATION_FILE = "ACTOR"  # which actor (by the id get_or_create_memory gave it) owns the store in a path


def memory_root() -> str:
    """The folder a relative MemoryConfig.path is under, on the node that serves the memory."""
    return os.path.expanduser(os.environ.get(ROOT_ENV, "~/.cache/memtrain/memory"))


class MemoryActor:
    """Actor body: one LocalMemory in the actor's process (wrapped with ray.remote at creation).

    ``incarnation`` identifies this actor across Ray's restarts of it: the store it opens records it, so a restart
    that finds no store (its node was lost) or another actor's store is told apart from a first start.
    """

    def __init__(self, config: dict, incarnation: str) -> None:
        import ray

        # faiss's Python wrapper installs a Ctrl-C callback that long FAISS calls poll, taking the GIL each time; in
        # a threaded actor every other Python thread (calls being (de)serialized, concurrent writers) then stalls
        # each search by up to a GIL switch interval (measured: a 6 ms IVF search took 340 ms beside one busy
        # thread). Nobody presses Ctrl-C in an actor, so drop the callback for this process.
        faiss.InterruptCallback.clear_instance()
        self._requested = MemoryConfig.from_dict(config)
        path = os.path.join(memory_root(), self._requested.path)  # an absolute path stays as it is
        local = MemoryConfig.from_dict({**config, "path": path,
                                        "faiss_threads": self._requested.faiss_threads or max(1, int(self._requested.num_cpus))})
        self._memory: LocalMemory | None = None
        self._refusal = ""
        context = ray.get_runtime_context()
        marker = os.path.join(path, INCARNATION_FILE)
        owner = open(marker).read().strip() if os.path.exists(marker) else None
        with warnings.catch_warnings():  # Ray 2.60's own property reads its deprecated actor_id and warns
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = context.was_current_actor_reconstructed
        if restarted and owner != incarnation and not local.backup:
            # Ray restarted this actor, and the store it served is not here (its node was lost, or the path is a
            # different node's folder): opening the path would serve an empty or foreign memory as if it were ours
            self._refusal = (f"memory actor restarted on node {context.get_node_id()[:12]} ({ray.util.get_node_ip_address()}), "
                             f"which does not hold its store ({path} {'holds another memory' if owner else 'is empty'}): "
                             "the node that held it was lost, and the memory has no backup. Nothing is served rather "
                             "than an empty memory. If the old node comes back, stop this actor (`memtrain memory stop "
                             "--no-snapshot`) and serve the memory there again; give memories a backup "
                             "(MemoryConfig.backup=s3://..., memtrain memory serve backup=...) so they survive node loss")
            return
        self._memory = LocalMemory(local)
        with open(marker + ".tmp", "w") as f:
            f.write(incarnation)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)

    def _mem(self) -> LocalMemory:
        if self._memory is None:
            raise MemoryServiceError(self._refusal)
        return self._memory

    def add(self, vectors_ND: np.ndarray, texts: list[str], metadata: list[dict | None] | None,
            key: str | None = None) -> np.ndarray:
        return self._mem().add(vectors_ND, texts, metadata, key)

    def search_packed(self, queries_QD: np.ndarray, k: int) -> PackedHits:
        return self._mem().search_packed(queries_QD, k)

    def remove(self, ids: np.ndarray) -> int:
        return self._mem().remove(ids)

    def get(self, ids: np.ndarray) -> list[tuple[str, dict | None]]:
        return self._mem().get(ids)

    def stats(self) -> dict:
        import ray

        return {**self._mem().stats(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def snapshot(self) -> dict:
        return self._mem().snapshot()

    def restore(self) -> dict:
        return self._mem().restore()

    def config(self) -> dict:
        """The config the memory was created with (its path as given, not as resolved on this node)."""
        return self._requested.to_dict()

    def pid(self) -> int:
        """The actor's process id (tests kill it to check crash recovery); answers even when it refuses to serve."""
        return os.getpid()


class MemoryClient:
    """Synchronous client of a named memory actor, with the methods of LocalMemory.

    It pickles as (name, namespace), so it can be handed to Ray tasks, Train workers and env runners, which
    look the actor up by name on first use. Every call waits at most ``call_timeout_s`` (a hung actor gives an
    error, not a hang). When the actor dies during a call and Ray restarts it: a read is sent again once (a read
    that kills the actor twice is reported, not sent a third time); an add is sent again with the same idempotency
    key, so it is applied exactly once; a remove, snapshot or restore raises, since it may or may not have been
    applied.
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

    def _call(self, method: str, *args, resend: bool = False):
        return self._result(method, args, self._submit(method, args), resend)

    def _submit(self, method: str, args: tuple):
        return getattr(self._handle(), method).remote(*args)

    def _result(self, method: str, args: tuple, ref, resend: bool = False):
        """The value of a submitted call, within call_timeout_s. If the actor dies during it, a call that is safe to
        repeat (``resend``: reads, and adds with their idempotency key) is sent once more when the actor is back."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        deadline = time.monotonic() + self.call_timeout_s
        deaths = 0
        while True:
            try:
                return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except RayTaskError as err:
                if isinstance(err.cause, MemoryServiceError):
                    raise err.cause from None  # the service's own message, without the remote traceback around it
                raise
            except GetTimeoutError:
                raise MemoryServiceError(
                    f"memory {self.name!r} did not answer {method} within {self.call_timeout_s:g} s (MemoryConfig."
                    f"call_timeout_s): the actor is hung or overloaded; check `memtrain memory stats --name "
                    f"{self.name}` and the actor's logs{'; the call may still be applied' if not resend else ''}") from None
            except RayActorError as err:
                deaths += 1
                if not resend:
                    raise MemoryServiceError(
                        f"{method} on memory {self.name!r} was not acknowledged: the actor died during the call "
                        f"({err.__class__.__name__}). Everything acknowledged before is safe and the actor restarts from "
                        "its snapshot and log; check the state (it may already have been applied) before retrying") from err
                if deaths > 1:
                    raise MemoryServiceError(
                        f"memory {self.name!r} died twice while running this {method} ({_describe(args)}); the request "
                        "itself may be what crashes it, so it is not sent again; check the actor's logs") from err
                self._wait_until_back(deadline)
                ref = self._submit(method, args)

    def _wait_until_back(self, deadline: float) -> None:
        """Block until the restarted actor answers (or the call's deadline passes)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        while time.monotonic() < deadline:
            try:
                ray.get(self._handle().pid.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return
            except (RayActorError, GetTimeoutError):
                time.sleep(0.2)
        raise MemoryServiceError(f"memory {self.name!r} did not come back within {self.call_timeout_s:g} s after its "
                                 f"actor died; check `memtrain memory stats --name {self.name}` and the actor's logs")

    def add(self, vectors_ND: np.ndarray, texts: list[str], metadata: list[dict | None] | None = None,
            key: str | None = None) -> np.ndarray:
        """See LocalMemory.add; durable once it returns. Without a ``key`` one is made up for this call, so a send
        again after the actor died mid-call is applied once."""
        return self._call("add", vectors_ND, texts, metadata, uuid.uuid4().hex if key is None else key, resend=True)

    def search(self, queries_QD: np.ndarray, k: int = 10) -> SearchHits:
        """See LocalMemory.search. The actor sends the compact PackedHits; they are expanded here."""
        return self._call("search_packed", queries_QD, k, resend=True).unpack()

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
        return self._call("remove", np.asarray(ids))

    def get(self, ids: np.ndarray | list[int]) -> list[tuple[str, dict | None]]:
        """See LocalMemory.get."""
        return self._call("get", np.asarray(ids), resend=True)

    def stats(self) -> dict:
        """See LocalMemory.stats; also the node serving the memory (node_id, node_ip)."""
        return self._call("stats", resend=True)

    def snapshot(self) -> dict:
        """See LocalMemory.snapshot."""
        return self._call("snapshot")

    def restore(self) -> dict:
        """See LocalMemory.restore."""
        return self._call("restore")

    def config(self) -> MemoryConfig:
        return MemoryConfig.from_dict(self._call("config", resend=True))

    def pid(self) -> int:
        return self._call("pid", resend=True)

    def shutdown(self, snapshot: bool = True) -> None:
        """Stop the detached actor for good (after a final snapshot unless snapshot=False); its data stays on disk."""
        import ray

        if snapshot:
            self.snapshot()
        ray.kill(self._handle(), no_restart=True)
        self._actor = None


def _describe(args: tuple) -> str:
    """A short description of a call's arguments for an error message (shapes, not contents)."""
    return ", ".join(f"array {a.shape}" if isinstance(a, np.ndarray) else repr(a)[:40] for a in args)


class PendingSearch:
    """A search started by ``MemoryClient.search_async``; ``result()`` waits for it and returns its SearchHits."""

    def __init__(self, client: MemoryClient, args: tuple, ref) -> None:
        self._client, self._args, self._ref = client, args, ref

    def result(self) -> SearchHits:
        return self._client._result("search_packed", self._args, self._ref, resend=True).unpack()


def get_or_create_memory(name: str, config: MemoryConfig | None = None, namespace: str = DEFAULT_NAMESPACE) -> MemoryClient:
    """Attach to the named memory actor, creating it from `config` if it does not exist yet.

    With config=None it only attaches. An existing actor must agree with `config` on dim, index, metric and path.
    The actor asks for `config.resource` when a node of the cluster offers it (see the module docstring).
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
    from ray.exceptions import GetTimeoutError, RayActorError

    if not ray.is_initialized():
        raise MemoryServiceError("Ray is not initialised in this process; call ray.init(address='auto') to join a "
                                 "cluster, or ray.init() for a local one, before get_or_create_memory")
    if config is None:
        client = MemoryClient(name, namespace)
        client._handle()
        return client
    if config.path is None:
        raise MemoryServiceError("the shared memory actor needs MemoryConfig.path (a folder on the actor's node, or a "
                                 f"name under {ROOT_ENV} there) so it can recover after a restart; use LocalMemory for an "
                                 "ephemeral memory")
    offered = any(n["Alive"] and n["Resources"].get(config.resource, 0) > 0 for n in ray.nodes()) \
        if config.resource else False
    actor_class = ray.remote(MemoryActor)
    handle = actor_class.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=config.max_restarts, max_task_retries=0,  # writes must not be silently re-applied
        max_concurrency=config.max_concurrency, num_cpus=config.num_cpus, num_gpus=config.num_gpus,
        resources={config.resource: config.resource_amount} if offered else None,
    ).remote(config.to_dict(), uuid.uuid4().hex)
    client = MemoryClient(name, namespace, handle, config.call_timeout_s)
    try:
        existing = ray.get(handle.config.remote(), timeout=config.call_timeout_s)
    except (RayActorError, GetTimeoutError) as err:
        ray.kill(handle, no_restart=True)  # free the name so a corrected config can be tried
        hint = (f"; no node could take it ({config.resource}={config.resource_amount}, num_cpus={config.num_cpus}, "
                f"num_gpus={config.num_gpus})" if isinstance(err, GetTimeoutError) else "")
        raise MemoryServiceError(f"memory actor {name!r} failed to start: {err}{hint}") from None
    differing = [f"{f}: running={existing[f]!r} requested={getattr(config, f)!r}"
                 for f in (*STRUCTURAL_FIELDS, "path", "backup") if existing[f] != getattr(config, f)]
    if differing:
        raise MemoryServiceError(f"memory {name!r} in namespace {namespace!r} already runs with a different config ("
                                 + "; ".join(differing) + "); attach with config=None, or pick another name")
    return client
