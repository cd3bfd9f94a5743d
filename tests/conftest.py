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
os.environ.setdefault("MEMTRAIN_DRILLS", "1")  # the tests run the reliability drills (fail_at_step, ...)


@pytest.fixture(scope="session", autouse=True)
def hf_datasets_cache(tmp_path_factory):
    """The datasets library's Arrow copies of the tests' corpus files (and those of the commands and Ray workers
    the tests start) go to the session's temp folder, not to ~/.cache/huggingface."""
    import sys

    folder = tmp_path_factory.mktemp("hf-datasets")
    os.environ["HF_DATASETS_CACHE"] = str(folder)
    if "datasets" in sys.modules:  # it read the variable on import
        sys.modules["datasets"].config.HF_DATASETS_CACHE = folder
    return folder


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray cluster shared by every test that needs one: 4 logical CPUs on 2 cores, so Train's 2 workers,
    Ray Data's read tasks and Tune's trial drivers never wait for each other's CPUs forever. It starts after the
    S3 server, so its worker processes inherit the server's environment variables."""
    import ray

    from orchestration.runtime import local_dashboard_args

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=0, object_store_memory=300 * 1024**2, log_to_driver=False,
                 configure_logging=False, namespace="memtrain-tests", **local_dashboard_args())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket; its environment variables go into
    os.environ for the session (pyarrow, boto3 and Ray read them)."""
    from orchestration.storage.testing import LoopbackS3

    with LoopbackS3(log_dir=tmp_path_factory.mktemp("moto")) as s3:
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        yield {**s3.env, "bucket": s3.bucket}
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def thermo_env_config(tmp_path_factory):
    """A thermo env stream small enough for tests: 2 tasks x 6 steps of a 2-layer sparse model on 16-token windows."""
    cache = tmp_path_factory.mktemp("thermo-cache")
    return {"continual": {
        "model_overrides": {"d_model": 32, "n_heads": 2, "n_layers": 2, "n_experts": 16, "group_size": 8,
                            "expert_rank": 4},
        "data": {"seq_len": 16, "max_documents": 200, "cache_dir": str(cache)},
        "stream": {"n_tasks": 2}, "max_steps_per_task": 6, "control_interval": 3, "batch_size": 4,
        "eval_windows": 4}}
