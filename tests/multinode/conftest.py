"""Fixtures for tests on a real multi-node Ray cluster on this machine (see cluster.py).

Run them in a pytest process of their own::

    python -m pytest -q -p no:cacheprovider tests/multinode -m multinode

The default test command deselects them (pyproject's ``-m 'not slow and not multinode'``): they start a cluster of
their own (about 10 s), and one test process can be connected to one Ray cluster only (tests/conftest.py's
``ray_session`` starts another).
"""

from __future__ import annotations

import sys

import pytest

from .cluster import MultiNodeCluster

_summary: list[str] = []  # printed at the end of the run (timings of the session cluster)


def pytest_terminal_summary(terminalreporter):
    for line in _summary:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def cluster():
    """The session's :class:`MultiNodeCluster`: an S3 server, a 0-CPU head and two 2-CPU worker nodes.

    Tests that kill nodes must leave as many live worker nodes as they found (``add_worker_node``).
    """
    c = MultiNodeCluster().up()
    _summary.append(f"multinode cluster: up in {c.timings['up']:.1f} s ({c.describe_timings()}), base {c.base}")
    yield c
    c.shutdown()
    _summary.append(f"multinode cluster: shut down in {c.timings['shutdown']:.1f} s")


@pytest.fixture(scope="module")
def ray_client(cluster):
    """This test process as a Ray driver on the cluster's head (``ray.init(address=...)``), for one test module.

    The process gets the nodes' S3 credentials and State API address while connected, like a user on the head
    (so Ray Train with ``storage_path=cluster.s3_uri(...)`` works from the test itself).
    """
    import ray

    if ray.is_initialized():
        pytest.fail("this process is already connected to another Ray cluster: run tests/multinode on its own")
    # Tasks, actors and train loops defined in these test modules travel by value: the nodes cannot import them
    # (this package is importable as `multinode` only with tests/ on sys.path, as pytest sets it in this process).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__package__])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**cluster.s3_env, "RAY_AUTH_MODE": "disabled",
                           "RAY_API_SERVER_ADDRESS": cluster.dashboard_url}.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(address=cluster.address, namespace="memtrain-multinode", log_to_driver=False,
                 configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()
