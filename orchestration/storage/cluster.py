"""Refusing, before any work starts, a run path that other nodes of the Ray cluster cannot see.

A URI always passes. A local path passes when the cluster is this one node and the node can run work itself.
Otherwise a probe file is written under the path and every other alive node is asked, by a task pinned to it,
whether it reads that same file back: a mount every node shares passes, a folder on this node's disk (or a
same-named but separate folder on each node) is refused with the fix named.
"""

from __future__ import annotations

import logging
import uuid

from orchestration.errors import StorageError
from orchestration.storage.location import Location

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0


def _read_probe(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _fix(what: str, location: Location) -> str:
    return (f"give {what} as a URI every node reaches (s3://bucket/..., gs://bucket/..., with the nodes' "
            f"credentials) or a folder on a filesystem every node mounts (NFS, EFS, Filestore, ...), instead of "
            f"{location}")


def require_shared(location: Location, what: str) -> None:
    """Raise StorageError when ``location`` is node-local and the Ray cluster's work may run on other nodes.

    ``what`` names the setting in the message, e.g. ``"output"`` or ``"init_checkpoint"``. Needs Ray initialised.
    """
    if not location.is_local:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    others = [n for n in nodes if n["NodeID"] != here]
    if not others:
        resources = next((n["Resources"] for n in nodes if n["NodeID"] == here), {})
        if resources.get("CPU", 0) > 0 or resources.get("GPU", 0) > 0:
            return
        raise StorageError(f"{what} {location} is a folder on this node's disk, but this node of the Ray cluster "
                           "has no CPUs or GPUs, so the work runs on nodes that join later and cannot see it; "
                           + _fix(what, location))
    if location.is_dir():
        folder = location
    elif location.exists():
        folder = location.parent
    else:
        location.mkdir()
        folder = location
    token = uuid.uuid4().hex
    probe = folder / f".memtrain-probe-{token}"
    probe.write_text(token)
    try:
        check = ray.remote(_read_probe)
        pending = {check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(probe.uri): n for n in others}
        ready, missing = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        blind = [pending[ref]["NodeManagerAddress"] for ref in ready if ray.get(ref) != token]
        if missing:
            log.warning("could not check whether nodes %s see %s (no answer in %.0f s)",
                        ", ".join(pending[ref]["NodeManagerAddress"] for ref in missing), folder, PROBE_TIMEOUT_S)
    finally:
        probe.remove()
    if blind:
        raise StorageError(f"{what} {location} is on this node's disk only: {len(blind)} other node(s) of the Ray "
                           f"cluster ({', '.join(sorted(set(blind)))}) cannot see it, so work placed there would "
                           f"fail or its results would be lost; " + _fix(what, location))
    log.info("%s %s is shared: all %d nodes of the cluster see it", what, location, len(nodes))

