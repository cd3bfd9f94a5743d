"""`memtrain memory serve|stats|snapshot|search|stop`: run and inspect a named memory on the current Ray cluster.

Wire it into a CLI with ``register(parser.add_subparsers())``; every subcommand sets ``func(args) -> int``.

Example (shell)::

    ray start --head                                   # a cluster that outlives the command
    memtrain memory serve --name semantic path=semantic dim=128 index=ivf metric=cosine backup=s3://bucket/memories/semantic
    memtrain memory stats --name semantic
    memtrain memory search --name semantic --queries q.npy --k 5
    memtrain memory snapshot --name semantic
    memtrain memory stop --name semantic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from memory_service.actor import DEFAULT_NAMESPACE, get_or_create_memory
from memory_service.config import MemoryConfig
from memory_service.errors import MemoryServiceError


def register(subparsers) -> None:
    """Add the `memory` command and its subcommands to an argparse subparsers object."""
    memory = subparsers.add_parser("memory", help="the shared semantic memory (a FAISS index in a named Ray actor)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = memory.add_subparsers(dest="memory_command", required=True, metavar="{serve,stats,snapshot,search,stop}")

    def add(name: str, help: str, func) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--name", default="semantic", help="actor name of the memory (default: semantic)")
        sub.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"Ray namespace (default: {DEFAULT_NAMESPACE})")
        sub.set_defaults(func=func)
        return sub

    serve = add("serve", "start the named memory, or attach to it if it runs, and print its stats", _serve)
    serve.add_argument("--config", help="YAML file of MemoryConfig fields")
    serve.add_argument("overrides", nargs="*", metavar="key=value",
                       help="MemoryConfig fields, e.g. path=semantic dim=128 index=ivf metric=cosine capacity=1000000 "
                            "backup=s3://bucket/memories/semantic (a relative path is under the memory root of the "
                            "actor's node, MEMTRAIN_MEMORY_ROOT, default ~/.cache/memtrain/memory)")
    add("stats", "print the memory's stats as JSON", _stats)
    add("snapshot", "write a snapshot now (bounds recovery time) and print where it stands", _snapshot)
    search = add("search", "search the memory with query vectors and print the hits as JSON", _search)
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--queries", help=".npy file of float32 queries, shape (Q, dim) or (dim,)")
    queries.add_argument("--vector", help="one query as comma-separated floats")
    search.add_argument("--k", type=int, default=5, help="neighbours per query (default: 5)")
    stop = add("stop", "snapshot and stop the memory actor (its data stays on disk)", _stop)
    stop.add_argument("--no-snapshot", action="store_true", help="stop without a final snapshot (the log is replayed on restart)")


def load_config(config_file: str | None, overrides: list[str]) -> MemoryConfig:
    """MemoryConfig from defaults, then an optional YAML file, then key=value overrides (unknown keys refused)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    valid = ", ".join(f.name for f in dataclasses.fields(MemoryConfig))
    try:
        merged = OmegaConf.structured(MemoryConfig)
        if config_file:
            merged = OmegaConf.merge(merged, OmegaConf.load(config_file))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise MemoryServiceError(f"bad memory config: {str(err).splitlines()[0]}; valid fields: {valid}") from err
    return MemoryConfig.from_dict(OmegaConf.to_container(merged))


def _connect(namespace: str, allow_local: bool) -> bool:
    """Join the running Ray cluster; returns True if a local one had to be started (serve only)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto", namespace=namespace, log_to_driver=False)
        return False
    except ConnectionError:
        if not allow_local:
            raise MemoryServiceError("no Ray cluster is running; start one with `ray start --head`, then "
                                     "`memtrain memory serve`") from None
    ray.init(address="local", namespace=namespace, include_dashboard=False, log_to_driver=False)
    return True


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


def _serve(args) -> int:
    config = load_config(args.config, args.overrides)
    if config.path is None:
        raise MemoryServiceError("serve needs a folder for the memory's data on the actor's node: add path=NAME (under "
                                 "that node's memory root) or path=/absolute/folder")
    local_cluster = _connect(args.namespace, allow_local=True)
    mem = get_or_create_memory(args.name, config, namespace=args.namespace)
    _print({"name": args.name, "namespace": args.namespace, **mem.stats()})
    if local_cluster:
        # A detached actor lives as long as its cluster, and this local cluster ends with this process.
        print(f"no Ray cluster was running, so memory {args.name!r} is served from a local one until Ctrl-C; "
              "run `ray start --head` first to keep it in the background", file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _print(mem.snapshot())
    return 0


def _stats(args) -> int:
    _connect(args.namespace, allow_local=False)
    _print(get_or_create_memory(args.name, namespace=args.namespace).stats())
    return 0


def _snapshot(args) -> int:
    _connect(args.namespace, allow_local=False)
    _print(get_or_create_memory(args.name, namespace=args.namespace).snapshot())
    return 0


def _search(args) -> int:
    if args.queries:
        try:
            queries = np.load(args.queries, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise MemoryServiceError(f"--queries {args.queries!r} cannot be read as a .npy array of float32 queries "
                                     f"({err}); save them with np.save(path, queries.astype(np.float32))") from None
    else:
        try:
            queries = np.array([float(v) for v in args.vector.split(",")], dtype=np.float32)
        except ValueError as err:
            raise MemoryServiceError(f"--vector must be comma-separated numbers ({err})") from None
    queries_QD = queries.reshape(1, -1) if queries.ndim == 1 else queries
    _connect(args.namespace, allow_local=False)
    hits = get_or_create_memory(args.name, namespace=args.namespace).search(queries_QD, args.k)
    _print([[hit._asdict() for hit in hits.query(q)] for q in range(len(hits.texts))])
    return 0


def _stop(args) -> int:
    _connect(args.namespace, allow_local=False)
    get_or_create_memory(args.name, namespace=args.namespace).shutdown(snapshot=not args.no_snapshot)
    print(f"memory {args.name!r} stopped; its data stays on disk, `memtrain memory serve` with the same path reopens it")
    return 0
