"""The multi-node test cluster behaves like a real cluster: separate node-local disks, shared S3 storage, DDP
across nodes, node failure and replacement, and memtrain commands run from the head."""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .cluster import MultiNodeCluster, process_tree, processes_in_mount_namespace

pytestmark = pytest.mark.multinode


def on_node(node_id: str) -> dict:
    """Task options that run it on exactly this node (no fallback) without taking a CPU."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False), "num_cpus": 0}


@ray.remote
def look(paths: list[str]) -> dict:
    """Where the task runs, and which of ``paths`` it can read (the exception's name where it cannot)."""
    seen = {}
    for p in paths:
        try:
            Path(p).read_text()
            seen[p] = "ok"
        except OSError as e:
            seen[p] = type(e).__name__
    return {"node_id": ray.get_runtime_context().get_node_id(), "seen": seen}


@ray.remote
def write_s3(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` with pyarrow, using the node's own S3 environment (its 'instance credentials')."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return ray.get_runtime_context().get_node_id()


@ray.remote(max_retries=0)
def sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_nodes_and_resources(cluster, ray_client):
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 3, alive
    head = alive[cluster.head.node_id]
    assert head["Resources"].get("CPU", 0) == 0 and head["Resources"]["memory_host"] == 1
    assert len(cluster.worker_nodes) == 2
    for node in cluster.worker_nodes:
        assert alive[node.node_id]["Resources"]["CPU"] == node.num_cpus == 2
        assert "memory_host" not in alive[node.node_id]["Resources"]
    assert ray.cluster_resources()["CPU"] == 4


def test_head_local_folders_are_hidden_from_worker_nodes(cluster, ray_client):
    name = f"probe-{uuid.uuid4().hex[:8]}.txt"
    head_file, cache_file, shared_file = (d / name for d in (cluster.head_dir, cluster.cache_dir,
                                                              cluster.shared_dir))
    for f in (head_file, cache_file, shared_file):
        f.write_text("made on the head")
    paths = [str(head_file), str(cache_file), str(shared_file)]
    try:
        on_head = ray.get(look.options(**on_node(cluster.head.node_id)).remote(paths))
        assert on_head["seen"] == dict.fromkeys(paths, "ok")  # the probe itself works
        for node in cluster.worker_nodes:
            res = ray.get(look.options(**on_node(node.node_id)).remote(paths))
            assert res["node_id"] == node.node_id
            assert res["seen"] == {str(head_file): "FileNotFoundError", str(cache_file): "FileNotFoundError",
                                   str(shared_file): "ok"}, node
    finally:
        cache_file.unlink()  # the host's real ~/.cache/memtrain


def test_s3_bucket_from_driver_and_worker_nodes(cluster, ray_client):
    import pyarrow.fs

    prefix = f"harness/{uuid.uuid4().hex[:8]}"
    fs, path = pyarrow.fs.FileSystem.from_uri(cluster.s3_uri(f"{prefix}/driver.txt"))
    with fs.open_output_stream(path) as f:
        f.write(b"from the driver")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"from the driver"

    # 12 MiB from each worker node: a multipart upload (pyarrow's parts are 10 MiB; moto 5.2.1 broke these)
    big = os.urandom(12 * 1024**2)
    refs = {node.node_id: write_s3.options(**on_node(node.node_id)).remote(cluster.s3_uri(f"{prefix}/{node.name}"),
                                                                            big)
            for node in cluster.worker_nodes}
    assert {k: ray.get(r) for k, r in refs.items()} == {k: k for k in refs}
    for node in cluster.worker_nodes:
        with fs.open_input_stream(f"{cluster.bucket}/{prefix}/{node.name}") as f:
            assert f.read() == big

    listed = fs.get_file_info(pyarrow.fs.FileSelector(f"{cluster.bucket}/{prefix}"))
    assert sorted(Path(i.path).name for i in listed) == sorted(["driver.txt", *(n.name for n in cluster.worker_nodes)])


def _ddp_loop(config):
    """Each rank all-reduces rank+1 over gloo and gathers the node ids; rank 0 checkpoints them to storage."""
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    total = torch.tensor([float(ctx.get_world_rank() + 1)])
    dist.all_reduce(total)
    nodes = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            Path(d, "nodes.json").write_text(json.dumps(nodes))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        # under Ray Train v2, Result.metrics are those of the latest checkpoint (None without one): report them with one
        ray.train.report({"sum": total.item(), "nodes": ",".join(nodes), "backend": dist.get_backend(),
                          "local_world_size": ctx.get_local_world_size()}, checkpoint=checkpoint)


def test_ddp_across_two_nodes_with_storage_on_s3(cluster, ray_client):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ddp_loop,
        # 1.5 CPUs each: two workers cannot share one 2-CPU node, so the process group spans two nodes
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1.5}),
        run_config=RunConfig(name=f"ddp-{uuid.uuid4().hex[:8]}", storage_path=cluster.s3_uri("train")))
    result = trainer.fit()
    assert result.metrics["sum"] == 3.0 and result.metrics["backend"] == "gloo"
    nodes = result.metrics["nodes"].split(",")
    assert len(set(nodes)) == 2 and set(nodes) <= {n.node_id for n in cluster.worker_nodes}, nodes
    assert result.metrics["local_world_size"] == 1  # Ray Train groups workers into nodes by IP
    assert result.checkpoint.path.startswith(f"{cluster.bucket}/train/")  # pyarrow's S3 paths: bucket/key
    with result.checkpoint.as_directory() as d:
        assert json.loads(Path(d, "nodes.json").read_text()) == nodes


def test_run_memtrain_from_the_head(cluster):
    out = cluster.run("models", timeout=120)
    assert "tgsmn-dense-tiny" in out.stdout
    with pytest.raises(AssertionError, match=r"(?s)memtrain no-such-command` exited with 2 .*invalid choice"):
        cluster.run("no-such-command", timeout=120)
    failed = cluster.wait(cluster.start("no-such-command"), timeout=120, check=False)
    assert failed.returncode == 2 and "invalid choice" in failed.stdout


def test_second_cluster_is_isolated_and_leaves_nothing_behind(cluster, ray_client):
    """Another cluster on the same machine (as when test sessions overlap) gets its own ports and folders, and
    its shutdown kills exactly its own processes."""
    other = MultiNodeCluster(num_workers=1, cpus_per_worker=1, bucket="other").up()
    try:
        assert other.address != cluster.address and other.base != cluster.base
        assert len(other.alive_nodes()) == 2
        procs = list(other.processes())
        assert len(procs) > 10  # moto, head (GCS, raylet, dashboard, ...), worker node
        session = (other.head.temp_dir / "session_latest").resolve().name
    finally:
        other.shutdown()
    assert not [p for p in procs if p.is_running() and p.status() != "zombie"]
    assert not other.base.exists()
    # nothing of it in the default temp dir, where `ray.init(address="auto")` of other sessions would look
    assert not Path("/tmp/ray", session).exists()
    default_address = Path("/tmp/ray/ray_current_cluster")
    gcs_port = other.address.rsplit(":", 1)[1]
    assert not (default_address.exists() and default_address.read_text().strip().endswith(f":{gcs_port}"))
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3  # ours is untouched


def test_kill_node_then_add_a_fresh_one(cluster, ray_client):
    victim = cluster.worker_nodes[0]
    pids = [p.pid for p in process_tree(victim.pid)]
    assert len(pids) >= 2  # `ray start --block` and its raylet, at least
    running = sleep.options(**on_node(victim.node_id)).remote(600)
    time.sleep(1)  # let it start on the victim

    t0 = time.monotonic()
    cluster.kill_node(victim)
    assert not processes_in_mount_namespace(victim.mount_ns)
    assert victim not in cluster.worker_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    with pytest.raises(ray.exceptions.RayError):  # the task died with its node
        ray.get(running, timeout=30)

    fresh = cluster.add_worker_node(num_cpus=2)
    print(f"kill_node + add_worker_node: {time.monotonic() - t0:.1f} s")
    assert fresh.node_id != victim.node_id and fresh in cluster.worker_nodes and len(cluster.worker_nodes) == 2
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    marker = cluster.head_dir / f"probe-{uuid.uuid4().hex[:8]}.txt"
    marker.write_text("made on the head")
    res = ray.get(look.options(**on_node(fresh.node_id)).remote([str(marker)]))
    assert res == {"node_id": fresh.node_id, "seen": {str(marker): "FileNotFoundError"}}
