"""The shared memory and the RL controllers on a real multi-node cluster: the memory actor is placed on the node
that offers the reserved resource and keeps every acknowledged write through kill -9 there; with a backup in the
bucket it comes back whole on another node after its node is lost, and without one it refuses to serve an empty
memory; a PPO meta-controller trains with a remote env runner on a worker node, its memory actor on the head and
its model checkpoint and its own checkpoints in the bucket, and resumes from there."""

from __future__ import annotations

import os
import signal
import uuid

import numpy as np
import pytest

from memory_service import MemoryConfig, MemoryServiceError, get_or_create_memory
from orchestration.storage import Location, latest_checkpoint, read_metrics

pytestmark = pytest.mark.multinode

NAMESPACE = "memtrain-multinode"
DIM = 16


def add_acknowledged(mem, batches: int, seed: int, start: int = 0) -> dict[int, np.ndarray]:
    """Add ``batches`` batches of 20 vectors; returns id -> vector of every add that returned (acknowledged)."""
    rng = np.random.default_rng(seed)
    acked = {}
    for b in range(start, start + batches):
        vectors_ND = rng.standard_normal((20, DIM)).astype(np.float32)
        ids = mem.add(vectors_ND, [f"b{b}-{j}" for j in range(20)])
        acked.update(zip(ids.tolist(), vectors_ND))
    return acked


def assert_all_found(mem, acked: dict[int, np.ndarray]) -> None:
    """Every acknowledged vector is its own nearest neighbour, with its text."""
    ids_N = np.array(sorted(acked))
    hits = mem.search(np.stack([acked[i] for i in ids_N]), k=1)
    assert hits.ids_QK[:, 0].tolist() == ids_N.tolist()
    assert mem.stats()["count"] == len(acked)


def spare_node(cluster):
    """A worker node offering the resource the test memories ask for (so the memory lands on a node we may kill)."""
    return cluster.add_worker_node(num_cpus=1, resources={"memory_spare": 1})


def test_the_memory_lives_on_the_reserved_node_and_keeps_acknowledged_writes_through_kill9(cluster, ray_client):
    name = f"head-{uuid.uuid4().hex[:6]}"
    path = cluster.head_dir / "memories" / name
    mem = get_or_create_memory(name, MemoryConfig(dim=DIM, metric="l2", path=str(path), snapshot_every=100),
                               namespace=NAMESPACE)
    try:
        assert mem.stats()["node_id"] == cluster.head.node_id  # the head offers memory_host, as in the YAMLs
        assert (path / "store.sqlite").is_file()  # its store is on the head's own disk
        acked = add_acknowledged(mem, 10, seed=0)
        old = mem.pid()
        os.kill(old, signal.SIGKILL)
        assert_all_found(mem, acked)  # the client waits for Ray's restart; the store replays snapshot + log
        assert mem.pid() != old and mem.stats()["node_id"] == cluster.head.node_id
    finally:
        mem.shutdown(snapshot=False)


def test_a_memory_backed_up_to_the_bucket_comes_back_whole_on_another_node(cluster, ray_client):
    name = f"spare-{uuid.uuid4().hex[:6]}"
    node = spare_node(cluster)
    config = MemoryConfig(dim=DIM, metric="l2", path=name, backup=cluster.s3_uri(f"memories/{name}"),
                          resource="memory_spare", resource_amount=1.0, call_timeout_s=120)
    mem = get_or_create_memory(name, config, namespace=NAMESPACE)
    replacement = None
    try:
        assert mem.stats()["node_id"] == node.node_id
        acked = add_acknowledged(mem, 5, seed=1)
        mem.snapshot()  # the bucket gets a snapshot, then more log records after it
        acked.update(add_acknowledged(mem, 5, seed=2, start=5))
        cluster.kill_node(node)  # the machine and its disk are gone
        replacement = spare_node(cluster)
        assert_all_found(mem, acked)  # Ray restarted the actor there; it rebuilt its store from the bucket
        stats = mem.stats()
        assert stats["node_id"] == replacement.node_id and stats["restored_from_backup"]["snapshot_seq"] > 0
        assert mem.add(np.ones((1, DIM), np.float32), ["after"]).tolist() == [len(acked)]  # and serves on
    finally:
        mem.shutdown(snapshot=False)
        if replacement is not None:
            cluster.kill_node(replacement)


def test_a_memory_without_backup_refuses_to_serve_after_losing_its_node(cluster, ray_client):
    name = f"lost-{uuid.uuid4().hex[:6]}"
    node = spare_node(cluster)
    mem = get_or_create_memory(name, MemoryConfig(dim=DIM, metric="l2", path=name, resource="memory_spare",
                                                  resource_amount=1.0, call_timeout_s=120), namespace=NAMESPACE)
    replacement = None
    try:
        add_acknowledged(mem, 2, seed=3)
        cluster.kill_node(node)
        replacement = spare_node(cluster)
        with pytest.raises(MemoryServiceError, match=r"does not hold its store .* has no backup"):
            mem.stats()  # never an empty memory in place of the lost one
    finally:
        mem.shutdown(snapshot=False)
        if replacement is not None:
            cluster.kill_node(replacement)


def test_the_meta_controller_trains_with_a_remote_env_runner_and_resumes_from_the_bucket(cluster, ray_client):
    from models.hmst.facts import FactConfig, FactWorld

    with pytest.MonkeyPatch.context() as mp:
        for key, value in cluster.s3_env.items():
            mp.setenv(key, value)
        model = cluster.s3_uri("runs/hmst-micro")
        cluster.run("pretrain", "--model", "hmst-micro", "--data", "builtin", "--workers", "1", "--max-steps", "5",
                    "--output", model, "data.vocab_size=512", "data.seq_len=64", "batch_size=4", "eval_batches=1",
                    "log_every=5", "warmup_steps=1")
        run = cluster.s3_uri("runs/rl-meta")
        common = ["--env-runners", "1", "--output", run, f"env_config.checkpoint={model}",
                  "env_config.memory_name=meta-multinode", f"env_config.memory_backup={cluster.s3_uri('memories/meta')}",
                  "env_config.queries=3", "env_config.n_entities=12", "ppo.train_batch_size=12",
                  "ppo.minibatch_size=6", "ppo.num_epochs=1", "checkpoint_every=1"]
        first = cluster.run("rl", "train", "meta", "--iterations", "2", *common, timeout=600)
        assert "done: 2 iterations" in first.stdout
        # the env runner (on a worker node: the head has no CPUs) loaded the model from the bucket and filled the
        # memory actor, which lives on the head, once
        memory = get_or_create_memory("meta-multinode", namespace="memtrain")
        facts = FactWorld(FactConfig(n_entities=12)).by_placement("semantic")
        assert memory.stats()["count"] == len(facts) and memory.stats()["node_id"] == cluster.head.node_id
        assert latest_checkpoint(Location(run), "iter_").step == 2 and (Location(run) / "policy" / "policy.json").is_file()
        second = cluster.run("rl", "train", "meta", "--iterations", "3", "--trust-checkpoint", *common, timeout=600)
        assert "resumed PPO from" in second.stdout and "iter_0002" in second.stdout
        assert [r["iteration"] for r in read_metrics(run)] == [1, 2, 3]
        memory.shutdown(snapshot=False)


def test_oversize_requests_are_refused_and_a_retried_add_is_applied_once(cluster, ray_client):
    name = f"limits-{uuid.uuid4().hex[:6]}"
    mem = get_or_create_memory(name, MemoryConfig(dim=DIM, metric="l2", path=name, max_k=100), namespace=NAMESPACE)
    try:
        query_ND = np.ones((1, DIM), np.float32)
        with pytest.raises(MemoryServiceError, match=r"k=1000000000 is more neighbours .*max_k=100"):
            mem.search(query_ND, k=10**9)  # refused before FAISS allocates anything; the actor lives on
        ids = mem.add(query_ND, ["once"], key="retry-me")
        assert mem.add(query_ND, ["once"], key="retry-me").tolist() == ids.tolist()
        assert mem.stats()["count"] == 1
    finally:
        mem.shutdown(snapshot=False)
