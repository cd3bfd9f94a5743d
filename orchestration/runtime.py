"""Connecting to Ray the same way from the CLI, a ``ray job submit`` job, and tests."""

from __future__ import annotations

import logging
import os
import socket

from orchestration.errors import MemtrainError

log = logging.getLogger(__name__)


def local_dashboard_args() -> dict:
    """``ray.init`` arguments for a local cluster's dashboard, bound to localhost on a free port.

    The dashboard serves the State API that Ray Train's placement-group cleaner queries. Pointing every worker at
    it (RAY_API_SERVER_ADDRESS) keeps that query on our own cluster when other Ray clusters run on the machine
    (otherwise it fails with "Found multiple active Ray instances" and finished trials keep their CPUs).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def ensure_ray(namespace: str = "memtrain") -> None:
    """Join the cluster named by RAY_ADDRESS (``memtrain --address``; set by Ray itself inside a ``ray job submit``
    job; ``auto`` = the cluster ``ray start`` runs on this machine), else start a local cluster of this machine.

    A local cluster gets twice the machine's cores as logical CPUs: Train workers, Tune drivers and the memory
    actor then never starve each other on a small machine (with one logical CPU per core, 2 Train workers take
    both CPUs of a 2-core machine and Ray Data's read tasks wait for a free CPU forever, with no error). It is
    started with ``address="local"``, so a cluster that ``ray start`` left on the machine (even a dead one) is
    neither joined by accident nor in the way.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=True)
        except ConnectionError as exc:
            raise MemtrainError(f"cannot reach the Ray cluster at {address!r} (RAY_ADDRESS or --address): {exc}. "
                                "Check the address (host:port of the head's GCS, or auto for `ray start` on this "
                                "machine), or unset it to start a local cluster") from None
        nodes = [n for n in ray.nodes() if n["Alive"]]
        log.info("connected to the Ray cluster at %s: %d node(s), %g CPUs, %g GPUs", address, len(nodes),
                 sum(n["Resources"].get("CPU", 0) for n in nodes), sum(n["Resources"].get("GPU", 0) for n in nodes))
        return
    cpus = 2 * (os.cpu_count() or 1)
    ray.init(address="local", namespace=namespace, num_cpus=cpus, log_to_driver=True, **local_dashboard_args())
    log.info("started a local Ray cluster with %d logical CPUs (set RAY_ADDRESS or --address to use a running "
             "cluster)", cpus)
