"""Continual-learning runner: task streams, replay, EWC, controller protocol, metrics, outputs, exact resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from orchestration.cli import main
from orchestration.config import load_config
from orchestration.continual.runner import ContinualConfig, ContinualRunner, run_continual
from orchestration.continual.control import OBSERVATION_FIELDS, FixedController, Knobs, Signals, resolve_controller
from orchestration.continual.replay import EWC, ReplayBuffer, mix
from orchestration.continual.metrics import cl_metrics
from orchestration.continual.tasks import (StreamConfig, build_stream, domain_schedule, make_permutations,
                                           task_documents)
from orchestration.data.sources import DataConfig
from orchestration.errors import ConfigError, DataError
from orchestration.data.tokenizers import load_tokenizer

torch.set_num_threads(1)

# a model small enough that a whole run takes a second or two
TINY = ["model_overrides.d_model=32", "model_overrides.n_heads=2", "model_overrides.n_layers=2",
        "model_overrides.n_experts=16", "model_overrides.group_size=8", "model_overrides.expert_rank=4",
        "data.tokenizer=bytes", "data.seq_len=16", "batch_size=4", "eval_windows=4", "probe_rows=2"]


def _corpus(path, n_docs: int, tag: str = "doc", duplicates: int = 0):
    """A .txt corpus of n_docs distinct paragraphs (plus some exact duplicates) separated by blank lines."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]
    docs = [f"{tag} {i}: " + " ".join(words[(i * j) % 7] for j in range(12)) for i in range(n_docs)]
    docs += docs[:duplicates]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _cfg(tmp_path, *overrides, corpus=None):
    corpus = corpus or _corpus(tmp_path / "corpus.txt", 60)
    return load_config(ContinualConfig, overrides=[*TINY, f"data.source={corpus}", f"data.cache_dir={tmp_path}/cache",
                                                   f"output={tmp_path}/run", *overrides])


# --- task streams -----------------------------------------------------------------------------------------------

def test_a_cached_stream_is_found_without_reading_the_corpus(tmp_path, monkeypatch):
    import os

    import orchestration.continual.tasks as tasks

    corpus = _corpus(tmp_path / "c.txt", 30)
    stream_cfg = StreamConfig(benchmark="permuted", n_tasks=2)
    data = DataConfig(source=str(corpus), tokenizer="bytes", seq_len=16, cache_dir=str(tmp_path / "cache"))
    first = build_stream(stream_cfg, data)
    reads = []
    read_documents = tasks.task_documents
    monkeypatch.setattr(tasks, "task_documents", lambda *args: reads.append(1) or read_documents(*args))
    assert build_stream(stream_cfg, data).folder == first.folder and reads == []  # found by size and mtime
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again, same contents
    assert build_stream(stream_cfg, data).folder == first.folder and len(reads) == 1
    assert build_stream(stream_cfg, data).folder == first.folder and len(reads) == 1
    rebuilt = build_stream(stream_cfg, dataclasses.replace(data, rebuild=True))  # read and tokenized again
    assert len(reads) == 2 and np.array_equal(np.load(rebuilt.tasks[0].shards["train"]),
                                              np.load(first.tasks[0].shards["train"]))
    _corpus(corpus, 30, tag="changed")  # new text: a new stream
    assert build_stream(stream_cfg, data).folder != first.folder and len(reads) == 3


def test_permuted_stream_splits_are_disjoint_and_permutations_are_bijections(tmp_path):
    corpus = _corpus(tmp_path / "c.txt", 45, duplicates=10)
    stream_cfg = StreamConfig(benchmark="permuted", n_tasks=3)
    data = DataConfig(source=str(corpus), tokenizer="bytes", seq_len=16, cache_dir=str(tmp_path / "cache"))
    parts = task_documents(stream_cfg, data)
    seen: dict[str, tuple] = {}
    for t, (_, splits) in enumerate(parts):
        for split, docs in splits.items():
            assert docs, f"task {t} has an empty {split} split"
            for doc in docs:  # no text in two places: not across splits, not across tasks (duplicates dropped)
                assert doc not in seen, f"{doc!r} is in {seen[doc]} and in {(t, split)}"
                seen[doc] = (t, split)
    assert len(seen) == 45

    stream = build_stream(stream_cfg, data)
    tok = load_tokenizer(stream.tokenizer_path)
    V = stream.vocab_size
    for t, task in enumerate(stream.tasks):
        perm = stream.permutations[task.permutation]
        assert sorted(perm.tolist()) == list(range(V)) and perm[stream.eos_id] == stream.eos_id
        inverse = np.argsort(perm)
        tokens = np.load(task.shards["train"]).astype(np.int64)
        text = tok.decode(inverse[tokens].tolist())  # undoing the permutation gives back the task's own text
        assert text == "".join(parts[t][1]["train"])
    assert len({p.tobytes() for p in stream.permutations}) == 3


def test_permutation_modes():
    cfg = StreamConfig(n_tasks=5, perm_mode="repeat", repeat_k=2)
    perms, of_task = make_permutations(cfg, 300, eos_id=299)
    assert of_task == [0, 1, 0, 1, 0] and len(perms) == 2
    cfg = StreamConfig(n_tasks=3, perm_mode="drift", drift_swaps=20)
    perms, of_task = make_permutations(cfg, 300, eos_id=7)
    for a, b in zip(perms[:-1], perms[1:]):
        assert (a != b).sum() == 40 and sorted(b.tolist()) == list(range(300)) and b[7] == 7


def test_multidomain_schedules_and_no_document_recurs(tmp_path):
    a = _corpus(tmp_path / "a.txt", 30, tag="apple")
    b = _corpus(tmp_path / "b.txt", 30, tag="berry")
    cfg = StreamConfig(benchmark="multidomain", n_tasks=4, domains=[str(a), str(b)])
    assert domain_schedule(cfg) == [0, 1, 0, 1]
    assert domain_schedule(StreamConfig(benchmark="multidomain", n_tasks=4, domains=["x", "y"],
                                        schedule="block")) == [0, 0, 1, 1]
    parts = task_documents(cfg, DataConfig(tokenizer="bytes"))
    assert [domain for domain, _ in parts] == ["a.txt", "b.txt", "a.txt", "b.txt"]
    all_docs = [doc for _, splits in parts for docs in splits.values() for doc in docs]
    assert len(all_docs) == len(set(all_docs)) == 60
    assert all(doc.startswith("berry") for doc in parts[1][1]["train"])


# --- replay and EWC ---------------------------------------------------------------------------------------------

def test_reservoir_keeps_a_uniform_sample():
    capacity, n_rows, trials = 10, 100, 400
    counts = np.zeros(n_rows)
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        buf = ReplayBuffer(capacity, row_len=1)
        for start in range(0, n_rows, 7):  # batches of 7: collisions inside one call are resolved in order
            buf.add(torch.arange(start, min(start + 7, n_rows))[:, None], rng)
        kept = buf.rows_CL[:, 0].numpy()
        assert len(set(kept.tolist())) == capacity  # every slot holds a distinct row
        counts[kept] += 1
    freq = counts / trials  # each row should be kept with probability capacity / n_rows = 0.1
    assert abs(freq.mean() - 0.1) < 1e-9
    assert abs(freq[:50].mean() - freq[50:].mean()) < 0.02  # old rows are not pushed out by recent ones
    assert np.abs(freq - 0.1).max() < 0.07


def test_replay_ratio_is_a_share_of_rows():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(64, row_len=5)
    assert buf.replay_rows(16, 0.5, rng) == 0  # nothing to replay yet
    buf.add(torch.full((64, 5), 7), rng)
    n = np.array([buf.replay_rows(16, 0.1, rng) for _ in range(4000)])
    assert abs(n.mean() / 16 - 0.1) < 0.005 and set(n.tolist()) <= {1, 2}
    assert buf.replay_rows(16, 0.99, rng) == 15  # a batch always keeps new data
    online = torch.zeros(12, 5, dtype=torch.long)
    batch = mix(online, buf.sample(4, rng))
    assert batch.shape == (16, 5) and (batch[:12] == 0).all() and (batch[12:] == 7).all()


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model("tgsmn-dense-tiny", vocab_size=64, d_model=32, n_heads=2, n_layers=1, d_ff=64)
    ewc = EWC(model, lam=10.0)
    assert not ewc.active and ewc.penalty().item() == 0.0
    ewc.consolidate(torch.randint(0, 64, (6, 9)))
    assert ewc.penalty().item() == 0.0
    with torch.no_grad():
        direction = [torch.randn_like(p) for p in model.parameters()]
        for p, d in zip(model.parameters(), direction):
            p.add_(1e-2 * d)
        one = ewc.penalty().item()
        for p, d in zip(model.parameters(), direction):
            p.add_(1e-2 * d)
        two = ewc.penalty().item()
    assert one > 0 and two == pytest.approx(4 * one, rel=1e-3)  # quadratic in the distance from the anchor
    penalty = ewc.penalty()
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- controller, metrics ----------------------------------------------------------------------------------------

class RecordingController(FixedController):
    def __init__(self, knobs):
        super().__init__(knobs)
        self.seen: list[Signals] = []

    def act(self, signals):
        self.seen.append(signals)
        return super().act(signals)


def test_fixed_controller_is_called_every_interval_with_the_signals(tmp_path):
    cfg = _cfg(tmp_path, "stream.n_tasks=2", "max_steps_per_task=7", "control_interval=3")
    ctrl = RecordingController(Knobs(k=1, replay_ratio=0.25, router_noise=0.2, router_temperature=0.9))
    run_continual(cfg, controller=ctrl)
    # intervals never span tasks: 3 + 3 + 1 steps per task; the first call sees the untrained model
    assert [s.step for s in ctrl.seen] == [0, 3, 6, 7, 10, 13]
    assert [s.task for s in ctrl.seen] == [0, 0, 0, 0, 1, 1]
    later = ctrl.seen[1:]
    for s in later:
        assert all(math.isfinite(getattr(s, f)) for f in OBSERVATION_FIELDS)
        assert s.loss > 0 and s.loss_std > 0 and s.grad_norm > 0 and s.stat_distance > 0
        assert 0 < s.expert_utilization <= 1 and s.routing_entropy > 0
        assert (s.k, s.replay_ratio, s.router_noise, s.router_temperature) == (1, 0.25, 0.2, 0.9)
    assert ctrl.seen[2].task_progress == pytest.approx(6 / 7)
    assert any(s.replay_loss > 0 for s in later)  # replayed rows were scored separately
    assert ctrl.seen[0].as_array().shape == (len(OBSERVATION_FIELDS),)


def test_metrics_on_a_hand_made_matrix():
    R = np.array([[1.0, 4.0, 5.0],
                  [2.0, 1.5, 4.5],
                  [3.0, 1.0, 2.0]])
    m = cl_metrics(R, baseline=np.array([5.0, 5.0, 5.0]))
    assert m["avg_final_loss"] == pytest.approx(2.0)
    assert m["avg_final_perplexity"] == pytest.approx(np.exp([3.0, 1.0, 2.0]).mean())
    # task 0: best 1.0, final 3.0; task 1: best 1.5, final 1.0 (it improved: no forgetting, -0.5)
    assert m["forgetting"] == pytest.approx(((3.0 - 1.0) + (1.0 - 1.5)) / 2)
    assert m["backward_transfer"] == pytest.approx(((1.0 - 3.0) + (1.5 - 1.0)) / 2)
    assert m["forward_transfer"] == pytest.approx(((5.0 - 4.0) + (5.0 - 4.5)) / 2)
    assert m["avg_learned_loss"] == pytest.approx((1.0 + 1.5 + 2.0) / 3)
    single = cl_metrics(np.array([[2.0]]))
    assert single["forgetting"] is None and single["backward_transfer"] is None


# --- whole runs -------------------------------------------------------------------------------------------------

def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_tiny_run_on_builtin_writes_every_output(tmp_path):
    cfg = load_config(ContinualConfig, overrides=[*TINY, "data.source=builtin", f"data.cache_dir={tmp_path}/cache",
                                                  f"output={tmp_path}/run", "stream.n_tasks=3",
                                                  "stream.max_docs_per_task=40", "max_steps_per_task=4",
                                                  "control_interval=2", "ewc_lambda=5"])
    summary = run_continual(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "eval_matrix.csv", "summary.json", "tokenizer.json",
                 "eval_matrix.png", "knobs.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "model.json", "state.pt", "runner.json"}
    assert _strict(run / "summary.json") == summary
    assert summary["steps"] == 12 and len(summary["final_test_losses"]) == 3
    assert summary["train_flops"] > 0 and summary["tokens"] == 12 * 4 * 16
    lines = (run / "eval_matrix.csv").read_text().splitlines()
    assert lines[0] == "after,permuted-0,permuted-1,permuted-2" and lines[1].startswith("init,") and len(lines) == 5
    # the summary's metrics are those of the evaluation matrix the run wrote (init row = untrained baseline)
    table = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    assert summary["final_test_losses"] == pytest.approx(table[-1].tolist(), abs=1e-5)
    expected = cl_metrics(table[1:], baseline=table[0])
    for key in ("avg_final_loss", "avg_final_perplexity", "forgetting", "backward_transfer", "forward_transfer"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-4), key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "interval" for r in rows) == 6 and sum(r["kind"] == "eval" for r in rows) == 3
    assert run_continual(cfg) == summary  # a finished run is not redone
    assert main(["generate", "--checkpoint", str(run), "--prompt", "The", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("stop_at", [5, 9])
def test_interrupted_run_resumes_to_the_same_summary(tmp_path, stop_at):
    common = ["stream.n_tasks=2", "max_steps_per_task=6", "control_interval=2", "checkpoint_every=2",
              "ewc_lambda=20", "controller=fixed-replay30"]
    full = run_continual(_cfg(tmp_path, *common, f"output={tmp_path}/full"))
    first = run_continual(_cfg(tmp_path, *common, f"output={tmp_path}/cut", f"interrupt_at_step={stop_at}"))
    assert first["status"] == "interrupted"
    resumed = run_continual(_cfg(tmp_path, *common, f"output={tmp_path}/cut"))
    strip = lambda s: {k: v for k, v in s.items() if k not in ("time", "files")}  # noqa: E731
    assert strip(resumed) == strip(full)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "interval"] == [2, 4, 6, 8, 10, 12]  # redone rows not doubled


def test_resume_with_other_settings_is_refused(tmp_path):
    run_continual(_cfg(tmp_path, "stream.n_tasks=2", "max_steps_per_task=2", "control_interval=1",
                       "interrupt_at_step=2", "checkpoint_every=1"))
    from orchestration.errors import CheckpointError

    with pytest.raises(CheckpointError, match="lr: 0.001 -> 0.01"):
        run_continual(_cfg(tmp_path, "stream.n_tasks=2", "max_steps_per_task=2", "lr=0.01"))


def test_runner_stepping_api(tmp_path):
    runner = ContinualRunner(_cfg(tmp_path, "stream.n_tasks=2", "max_steps_per_task=4", "control_interval=4"))
    obs = runner.reset()
    assert obs.step == 0 and obs.loss > 0
    result = runner.run_interval(Knobs())
    assert result.finished_task == 0 and not result.done and result.steps == 4 and result.flops > 0
    assert runner.evaluate_seen() > 0
    result = runner.run_interval(Knobs(k=1, replay_ratio=0.5))
    assert result.done and runner.done
    with pytest.raises(ConfigError, match="finished"):
        runner.run_interval(Knobs())
    assert runner.reset(seed=3).step == 0 and not runner.done


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused_with_a_fix(tmp_path):
    with pytest.raises(ConfigError, match="unknown benchmark 'rotated'.*permuted, multidomain"):
        load_config(ContinualConfig, overrides=["stream.benchmark=rotated"])
    with pytest.raises(ConfigError, match="unknown controller 'greedy'.*fixed-noreplay"):
        resolve_controller("greedy")
    with pytest.raises(ConfigError, match="replay_ratio must be in"):
        load_config(ContinualConfig, overrides=["fixed_knobs.replay_ratio=1.5"])
    small = _corpus(tmp_path / "small.txt", 10)
    with pytest.raises(DataError, match="10 distinct documents cannot make 5 tasks.*fewer tasks"):
        ContinualRunner(_cfg(tmp_path, "stream.n_tasks=5", corpus=small))
    with pytest.raises(ConfigError, match="unknown config key 'replay'"):
        load_config(ContinualConfig, overrides=["replay=0.5"])


def test_cli_maps_data_to_the_benchmark(tmp_path):
    import argparse

    from orchestration.cli.continual import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["continual", "--benchmark", "multidomain", "--data", "builtin,ptb", "--tasks", "4",
                              "--controller", "fixed-k1", "seed=3"])
    cfg = config_from_args(args)
    assert cfg.stream.domains == ["builtin", "ptb"] and cfg.stream.n_tasks == 4 and cfg.seed == 3
    args = parser.parse_args(["continual", "--data", "builtin", "--max-steps-per-task", "9"])
    cfg = config_from_args(args)
    assert cfg.data.source == "builtin" and cfg.max_steps_per_task == 9


@pytest.mark.slow  # Ray worker start-up dominates (~15 s on 2 busy cores)
def test_grid_runs_as_ray_tasks_and_skips_finished_runs(tmp_path, ray_session):
    from orchestration.continual.grid import GridConfig, run_grid

    corpus = _corpus(tmp_path / "corpus.txt", 40)
    base = [f"base.{o}" for o in TINY] + [f"base.data.source={corpus}", f"base.data.cache_dir={tmp_path}/cache",
                                          "base.stream.n_tasks=2", "base.max_steps_per_task=2"]
    grid = load_config(GridConfig, overrides=[*base, f"output={tmp_path}/grid", "seeds=[0,1]",
                                              "controllers=[fixed,fixed-noreplay]"])
    rows = run_grid(grid)
    assert len(rows) == 4 and all(r["status"] == "ran" for r in rows), rows
    assert (tmp_path / "grid" / "results.csv").is_file() and "±" in (tmp_path / "grid" / "results.md").read_text()
    again = run_grid(grid)
    assert all(r["status"] == "skipped" for r in again)
    assert [r["avg_final_loss"] for r in again] == [r["avg_final_loss"] for r in rows]
