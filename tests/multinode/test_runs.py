"""memtrain on a real multi-node Ray cluster whose worker nodes cannot see the head's disk: pretraining to a bucket
and to a shared mount (resume, generate on the head), a worker node killed mid-run, a sweep and a continual grid
with outputs in the bucket, and a node-local output refused before anything starts.

Every command runs as a user would run it on the head: ``python -m orchestration.cli ...`` from a folder the
worker nodes cannot see, attached to the cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path

import pytest

from orchestration.storage import Location, latest_checkpoint, read_metrics

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]  # the configs/ presets (the driver's cwd is elsewhere)

# small enough for 2 CPU cores, big enough to learn: 2 workers x 8 sequences of 64 tokens per step
SMALL = ["data.vocab_size=512", "data.seq_len=64", "batch_size=8", "eval_batches=2", "log_every=5", "warmup_steps=5",
         "model_overrides.n_layers=2", "model_overrides.d_model=64", "model_overrides.d_ff=128"]


@pytest.fixture(scope="module")
def storage(cluster):
    """This test process reads what the commands wrote, with the cluster's S3 credentials."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in cluster.s3_env.items():
            mp.setenv(key, value)
        yield


def steps_of(run: str) -> list[int]:
    return [r["step"] for r in read_metrics(run)]


def trainer_state(run: str) -> dict:
    return (latest_checkpoint(Location(run), "step_").location / "trainer_state.json").read_json()


def generated(cluster, run: str, checkpoint: str) -> str:
    """The text `memtrain generate` prints for a run, after checking it read the run's newest checkpoint."""
    out = cluster.run("generate", "--checkpoint", run, "--prompt", "The", "--max-new-tokens", "12", "--seed", "0")
    header = f"# tgsmn-dense-tiny from {run}/checkpoints/{checkpoint}\n"
    assert header in out.stdout, out.stdout[-2000:]
    text = out.stdout.split(header, 1)[1]
    assert len(text) > len("The") + 3
    return text


def test_pretrain_to_a_bucket_resumes_and_generates_on_the_head(cluster, storage):
    run = cluster.s3_uri("runs/pretrain")
    first = cluster.run("pretrain", "--model", "tgsmn-dense-tiny", "--data", "builtin", "--workers", "2",
                        "--max-steps", "30", "--output", run)
    assert "done: final eval loss" in first.stdout
    assert trainer_state(run)["step"] == 30 and steps_of(run)[-1] == 30
    # the head's disk holds nothing of the run: it all went to the bucket
    assert not any(cluster.head_dir.rglob("*.safetensors")) and not any(cluster.head_dir.rglob("metrics.jsonl"))
    second = cluster.run("pretrain", "--model", "tgsmn-dense-tiny", "--data", "builtin", "--workers", "2",
                         "--max-steps", "45", "--output", run)
    assert "resumed from step 30" in second.stdout
    steps = steps_of(run)
    assert steps == sorted(set(steps)) and steps[-1] == 45 and trainer_state(run)["step"] == 45
    assert generated(cluster, run, "step_000045").startswith("The")


def test_pretrain_to_a_shared_mount_spreads_workers_over_nodes_and_resumes(cluster):
    run = str(cluster.shared_dir / "runs" / "pretrain")
    # 1.5 CPUs per worker: two workers cannot share a 2-CPU node, so DDP runs across the two worker nodes
    cluster.run("pretrain", "--data", "builtin", "--workers", "2", "--max-steps", "20", "--output", run,
                "cpus_per_worker=1.5", "checkpoint_every=10", *SMALL)
    resumed = cluster.run("pretrain", "--data", "builtin", "--workers", "2", "--max-steps", "30", "--output", run,
                          "cpus_per_worker=1.5", "checkpoint_every=10", *SMALL)
    assert "resumed from step 20" in resumed.stdout
    steps = steps_of(run)
    assert steps == sorted(set(steps)) and steps[-1] == 30
    assert trainer_state(run)["samples"] == 30 * 2 * 8
    assert generated(cluster, run, "step_000030").startswith("The")
    # a damaged newest checkpoint (same size, other bytes) is skipped, with a warning that names it
    weights = cluster.shared_dir / "runs" / "pretrain" / "checkpoints" / "step_000030" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    again = cluster.run("pretrain", "--data", "builtin", "--workers", "2", "--max-steps", "40", "--output", run,
                        "cpus_per_worker=1.5", "checkpoint_every=10", *SMALL)
    assert re.search(r"checkpoint \S*step_000030 is damaged \(model.safetensors", again.stdout), again.stdout[-3000:]
    assert "resumed from step 20" in again.stdout and steps_of(run)[-1] == 40


def test_a_killed_worker_node_is_replaced_and_the_run_resumes_from_the_bucket(cluster, storage):
    run = cluster.s3_uri("runs/node-failure")
    proc = cluster.start("pretrain", "--data", "builtin", "--workers", "2", "--max-steps", "60", "--output", run,
                         "cpus_per_worker=1.5", "checkpoint_every=10", "max_failures=3", *SMALL)
    deadline = time.monotonic() + 300
    while (latest_checkpoint(Location(run), "step_") is None and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.5)
    assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.log_path.read_text()[-3000:]}"
    saved_at = latest_checkpoint(Location(run), "step_").step
    victim = cluster.worker_nodes[0]
    cluster.kill_node(victim)  # the machine and every process on it (one of the two workers) are gone
    cluster.add_worker_node()  # and a fresh machine joins, with an empty disk
    out = cluster.wait(proc, timeout=420)
    assert "done: final eval loss" in out.stdout
    # the new worker group started from the newest checkpoint in the bucket, not from scratch
    resumed = [int(step) for step in re.findall(r"resumed from step (\d+)", out.stdout)]
    assert resumed and resumed[0] >= saved_at, out.stdout[-3000:]
    steps = steps_of(run)
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step recorded twice, none missing at the end
    assert trainer_state(run)["samples"] == 60 * 2 * 8  # the data position went on exactly from the checkpoint


def test_a_sweep_writes_its_trials_to_the_bucket(cluster, storage):
    out = cluster.s3_uri("sweeps/lr")
    cluster.run("sweep", str(REPO / "configs/sweeps/pretrain-lr.yaml"), f"output={out}", "search.lr={grid: [1.0e-3, 1.0e-2]}", "scheduler.name=fifo", "pretrain.max_steps=10",
                "pretrain.eval_every=5", "pretrain.checkpoint_every=10", "pretrain.data.source=builtin",
                "pretrain.workers=1", *[f"pretrain.{o}" for o in SMALL], timeout=600)
    rows = list(csv.DictReader(io.StringIO((Location(out) / "results.csv").read_text())))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for row in rows:
        assert row["run_dir"].startswith(out + "/trials/") and steps_of(row["run_dir"])[-1] == 10
        assert latest_checkpoint(Location(row["run_dir"]), "step_") is not None
    assert (Location(out) / "best_config.yaml").read_yaml()["lr"] == float(rows[0]["lr"])


def test_a_continual_grid_runs_its_cells_on_worker_nodes(cluster, storage):
    out = cluster.s3_uri("grids/permuted")
    grid = cluster.head_dir / "grid.yaml"  # the driver's own file: only the driver reads it
    grid.write_text(
        "base:\n"
        "  model: tgsmn-sparse-tiny\n"
        "  model_overrides: {n_layers: 1, d_model: 64}\n"
        "  data: {source: builtin, vocab_size: 512, seq_len: 32}\n"
        "  stream: {benchmark: permuted, n_tasks: 2, max_docs_per_task: 40}\n"
        "  max_steps_per_task: 4\n"
        "  control_interval: 2\n"
        "  eval_windows: 4\n"
        "controllers: [fixed]\n"
        "seeds: [0, 1]\n"
        "cpus_per_run: 1\n")
    cluster.run("continual-grid", str(grid), f"output={out}", timeout=600)
    rows = list(csv.DictReader(io.StringIO((Location(out) / "results.csv").read_text())))
    assert [r["status"] for r in rows] == ["ran", "ran"], rows
    for row in rows:  # each cell's run folder is complete in the bucket
        assert (Location(row["dir"]) / "summary.json").read_json()["status"] == "finished"
    assert (Location(out) / "data").listdir()  # the stream the driver published for the worker nodes


def test_a_node_local_output_is_refused_before_anything_starts(cluster):
    local = cluster.head_dir / "runs" / "local"
    result = cluster.run("pretrain", "--data", "builtin", "--workers", "2", "--max-steps", "10", "--output",
                         str(local), *SMALL, check=False, timeout=120)
    assert result.returncode == 1  # refused (a usage error would be 2)
    assert "is on this node's disk only" in result.stdout and "s3://" in result.stdout
    assert not (local / "config.yaml").exists() and not (local / "data").exists()  # nothing was started
