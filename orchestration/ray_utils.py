"""Connecting to Ray the same way from the CLI, a ``ray job submit`` job, and tests."""

from __future__ import annotations

import logging
import os
import socket

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


def ensure_ray(namespace: str = "memtrain", num_cpus: int | None = None) -> None:
    """Join the running cluster (inside a job, or with RAY_ADDRESS set), else start a local one.

    A local cluster gets twice the machine's cores as logical CPUs: Train workers, Tune drivers and the memory
    actor then never starve each other on a small machine (see ray-notes §1, the Ray Data/Train deadlock).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=namespace, log_to_driver=True)
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    cpus = num_cpus or 2 * (os.cpu_count() or 1)
    ray.init(namespace=namespace, num_cpus=cpus, log_to_driver=True, **local_dashboard_args())
    log.info("started a local Ray cluster with %d logical CPUs", cpus)
