"""Connecting to Ray the same way from the CLI, a ``ray job submit`` job, and tests."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


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
    # the dashboard (bound to localhost) serves the State API that Ray Train needs to clean up placement groups
    ray.init(namespace=namespace, num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=True)
    log.info("started a local Ray cluster with %d logical CPUs", cpus)
