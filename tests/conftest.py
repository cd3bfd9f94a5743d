"""One local Ray session for the whole test run (each ray.init costs seconds), plus small shared fixtures."""

from __future__ import annotations

import os

import pytest

# Quiet, deterministic Ray for tests: no dashboard, no token prompt, a short worker-start timeout.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (4 logical CPUs on 2 cores, see ray-notes §7)."""
    import ray

    from orchestration.ray_utils import local_dashboard_args

    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=0, object_store_memory=300 * 1024**2, log_to_driver=False,
                 configure_logging=False, namespace="memtrain-tests", **local_dashboard_args())
    yield ray
    ray.shutdown()
