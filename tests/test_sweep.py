"""Ray Tune sweeps over pretraining: config checks, a real sweep that is interrupted and then restored, and a PBT
sweep whose worse trial continues from the better trial's checkpoint."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from orchestration.config import load_config
from orchestration.errors import ConfigError
from orchestration.training.pretrain import PretrainConfig
from orchestration.storage import read_metrics
from orchestration.sweep import SweepConfig, _scheduler, planned_trials, sweep, trial_config, tune_space

PRESET = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "pretrain-lr.yaml"
PBT_PRESET = PRESET.with_name("pretrain-pbt.yaml")


def test_preset_loads_and_plans_four_trials():
    cfg = load_config(SweepConfig, PRESET)
    assert cfg.kind == "pretrain" and cfg.pretrain.model == "tgsmn-dense-tiny" and planned_trials(cfg) == 4
    assert set(tune_space(cfg.search)) == {"lr"}
    cfg = load_config(SweepConfig, PRESET, ["num_samples=2", "pretrain.max_steps=400"])
    assert planned_trials(cfg) == 8 and cfg.pretrain.max_steps == 400


def test_pbt_preset_explores_its_search_space_at_checkpoint_steps():
    from ray.tune.schedulers import PopulationBasedTraining

    cfg = load_config(SweepConfig, PBT_PRESET)
    assert planned_trials(cfg) == 4 and cfg.max_concurrent_trials == 4
    pbt = _scheduler(cfg)
    assert isinstance(pbt, PopulationBasedTraining) and pbt._perturbation_interval == 50
    assert pbt._hyperparam_mutations["weight_decay"] == [0.0, 0.05, 0.1, 0.2]
    # 0 = the least common multiple of the evaluation and checkpoint steps
    assert _scheduler(load_config(SweepConfig, PBT_PRESET, ["scheduler.perturbation_interval=0",
                                                            "pretrain.eval_every=20"]))._perturbation_interval == 100


def test_trial_config_puts_nested_params_in_and_checks_them():
    trial = trial_config(PretrainConfig(), {"lr": 1e-3, "data.seq_len": 64, "model_overrides.d_model": 96})
    assert (trial.lr, trial.data.seq_len, trial.model_overrides) == (1e-3, 64, {"d_model": 96})
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        trial_config(PretrainConfig(), {"batch_size": 0})


@pytest.mark.parametrize("overrides, message", [
    (["search.warmup_steps={between: [1, 2]}"], r"search.warmup_steps must be one of \{choice\|grid\|uniform\|loguniform"),
    (["search.weight_decay={loguniform: [0, 1.0e-2]}"], r"search.weight_decay.loguniform needs low > 0"),
    (["search.weight_decay={uniform: [1.0e-2, 1.0e-3]}"], r"low < high"),
    (["search.lr={uniform: [1.0e-4, 1.0e-3]}"], r"search.lr has several kinds \(grid, uniform\); give exactly one"),
    (["search.lr={grid: []}"], r"search.lr.grid needs a non-empty list"),
    (["scheduler.name=hyperband"], r"scheduler.name must be asha, fifo or pbt"),
    (["scheduler.name=pbt", "search.batch_size={grid: [8, 16]}"],
     r"search key 'batch_size' cannot be searched with scheduler.name=pbt: .* set it in the pretrain section"),
    (["scheduler.name=pbt", 'search={"model_overrides.d_model": {grid: [64, 128]}}'], r"'model_overrides.d_model' cannot"),
    (["scheduler.name=pbt", "scheduler.perturbation_interval=30"],
     r"perturbation_interval=30 must be a multiple of pretrain.eval_every \(25\) and pretrain.checkpoint_every \(50\)"),
    (["scheduler.quantile_fraction=0.75"], r"0 < quantile_fraction <= 0.5"),
    (["pretrain.max_steps=20"], r"scheduler.grace_period=50 is beyond the 20 steps the trials train; lower it"),
    (["driver_cpus=0"], r"driver_cpus must be > 0"),
    (["mode=lowest"], r"mode must be min or max"),
    (["kind=ppo"], r"kind must be one of pretrain"),
    (["schedular.name=fifo"], r"unknown config key 'schedular'"),
])
def test_bad_sweep_configs_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SweepConfig, PRESET, overrides)


@pytest.mark.parametrize("search, message", [
    ({"learning_rate": {"grid": [1e-3]}}, r"search key 'learning_rate' is not a field of the pretrain config; valid keys: model, "),
    ({"output": {"grid": ["a"]}}, r"search key 'output' is not allowed"),
    ({"batch_size": {"grid": [8, 0]}}, r"invalid trial config at \{'batch_size': 0\}: batch_size must be >= 1"),
    ({"model_overrides.n_layerz": {"grid": [2]}}, r"invalid .*n_layerz"),
])
def test_bad_search_spaces_fail_before_any_trial(tmp_path, search, message):
    cfg = load_config(SweepConfig, PRESET, [f"output={tmp_path}"])
    cfg.search = search
    with pytest.raises(ConfigError, match=message):
        sweep(cfg)
    assert not (tmp_path / "tune").exists()


def tiny_sweep(output, shard_cache, *extra):
    """Four 20-step trials of a 2-layer model, two at a time, ASHA from step 10 (tens of seconds per wave)."""
    return load_config(SweepConfig, PRESET, [
        f"output={output}", "search.lr={grid: [3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]}", "scheduler.grace_period=10",
        "max_concurrent_trials=2", f"pretrain.data.cache_dir={shard_cache}", "pretrain.data.vocab_size=512",
        "pretrain.data.seq_len=32", "pretrain.data.max_documents=600", "pretrain.model_overrides.n_layers=2",
        "pretrain.model_overrides.d_model=64", "pretrain.model_overrides.d_ff=128", "pretrain.batch_size=8",
        "pretrain.max_steps=20", "pretrain.warmup_steps=5", "pretrain.eval_every=5", "pretrain.eval_batches=2",
        "pretrain.log_every=5", "pretrain.checkpoint_every=5", *extra])


@pytest.mark.slow
def test_interrupted_sweep_restores_and_ranks_every_trial(ray_session, tmp_path):
    out = tmp_path / "sweep"
    cfg = tiny_sweep(out, str(tmp_path / "shards"), "interrupt_after_trials=1")
    first = sweep(cfg)
    statuses = [r["status"] for r in first]
    assert (out / ".drill_interrupted").exists()
    assert sum(s in ("completed", "stopped early") for s in statuses) < 4  # the drill cut it short

    with pytest.raises(ConfigError, match="restoring it loads Tune's pickles"):
        sweep(cfg)  # a sweep folder's pickles are loaded only when trusted
    rows = sweep(dataclasses.replace(cfg, trust_checkpoint=True))  # the same command again: Tuner.restore
    assert len(rows) == 4 and all(r["status"] in ("completed", "stopped early") for r in rows)
    assert sorted(r["lr"] for r in rows) == [3e-4, 1e-3, 3e-3, 1e-2]
    assert any(r["status"] == "completed" and r["step"] == 20 for r in rows)
    own_loss = {}
    for row in rows:  # every trial directory is a pretraining run directory whose steps never go back
        metrics = read_metrics(row["run_dir"])
        steps = [r["step"] for r in metrics]
        # (a trial ASHA stopped may train a little further while Tune tears it down)
        assert steps == sorted(steps) and steps[-1] >= row["step"] and steps.count(0) == 1
        assert load_config(PretrainConfig, Path(row["run_dir"]) / "config.yaml").lr == row["lr"]
        # the trial's eval loss as its workers wrote it: the newest evaluation up to the step Tune last saw
        evals = [r["eval_loss"] for r in metrics if "eval_loss" in r and r["step"] <= row["step"]]
        own_loss[row["trial_id"]] = evals[-1]
        assert row["eval_loss"] == pytest.approx(own_loss[row["trial_id"]])
    # ranked by those losses, lowest first, in the returned rows and in results.csv
    assert [r["trial_id"] for r in rows] == sorted(own_loss, key=own_loss.get)
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(t["rank"], t["trial_id"]) for t in table] == [(str(i), t) for i, t in
                                                           enumerate(sorted(own_loss, key=own_loss.get), 1)]
    assert rows[0]["trial_id"] in (out / "results.md").read_text().splitlines()[4]
    best = load_config(PretrainConfig, out / "best_config.yaml")
    assert best.lr == rows[0]["lr"] and best.output == str(out / "best")


@pytest.mark.slow
def test_two_trial_fifo_sweep_ranks_trials_and_writes_results(ray_session, tmp_path):
    out = tmp_path / "sweep"
    rows = sweep(tiny_sweep(out, str(tmp_path / "shards"), "search.lr={grid: [1.0e-4, 1.0e-2]}",
                            "scheduler.name=fifo", "pretrain.max_steps=10"))
    assert [r["status"] for r in rows] == ["completed", "completed"] and all(r["step"] == 10 for r in rows)
    # every trial directory is a pretraining run directory: metrics, checkpoints, shared tokenizer
    final_loss = {}
    for row in rows:
        run = Path(row["run_dir"])
        metrics = read_metrics(run)
        assert metrics[-1]["step"] == 10 and (run / "checkpoints").is_dir()
        assert (run / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
        assert load_config(PretrainConfig, run / "config.yaml").lr == row["lr"]
        final_loss[row["lr"]] = [r["eval_loss"] for r in metrics if "eval_loss" in r][-1]
        assert row["eval_loss"] == pytest.approx(final_loss[row["lr"]])
    assert final_loss[1e-2] < final_loss[1e-4]  # by the trials' own metrics, 100x the lr learns faster
    assert rows[0]["lr"] == 1e-2 and (out / "results.md").is_file()  # so it is ranked first
    assert load_config(PretrainConfig, out / "best_config.yaml").lr == 1e-2


@pytest.mark.slow
def test_pbt_worse_trial_continues_from_the_better_trials_checkpoint(ray_session, tmp_path):
    """Two 8-step trials at once (0.5 CPU workers), learning rates 100x apart, one synchronous PBT decision at step
    5 (asynchronous PBT might see no overlap: a trial's 8 steps take less time than another's start-up)."""
    out = tmp_path / "pbt"
    cfg = load_config(SweepConfig, PBT_PRESET, [
        f"output={out}", "num_samples=1", "max_concurrent_trials=2", "scheduler.perturbation_interval=5",
        "scheduler.synch=true",
        f"pretrain.data.cache_dir={tmp_path / 'shards'}", "pretrain.data.vocab_size=512", "pretrain.data.seq_len=32",
        "pretrain.data.max_documents=600", "pretrain.model_overrides.n_layers=2",
        "pretrain.model_overrides.d_model=64", "pretrain.model_overrides.d_ff=128", "pretrain.batch_size=8",
        "pretrain.max_steps=8", "pretrain.warmup_steps=5", "pretrain.eval_every=5", "pretrain.eval_batches=2",
        "pretrain.log_every=5", "pretrain.checkpoint_every=5"])
    rows = sweep(dataclasses.replace(cfg, search={"lr": {"grid": [1e-4, 1e-2]}}))
    assert [r["status"] for r in rows] == ["completed", "completed"] and all(r["step"] == 8 for r in rows)
    assert len((out / "tune" / "pbt_global.txt").read_text().splitlines()) == 1  # Tune's log of each exploit
    # the worse trial at step 5 continued from the better one's checkpoint (and may end up ranked first)
    configs = {r["run_dir"]: load_config(PretrainConfig, Path(r["run_dir"]) / "config.yaml") for r in rows}
    [(run, trial)] = [(Path(d), c) for d, c in configs.items() if c.init_checkpoint]
    assert trial.lr == next(r["lr"] for r in rows if r["run_dir"] == str(run))  # PBT's explored lr reached it
    source = Path(trial.init_checkpoint)  # a Tune checkpoint: a copy of the better trial's step-5 checkpoint
    assert out / "tune" in source.parents
    assert load_config(PretrainConfig, source / "config.yaml").output in configs.keys() - {str(run)}
    assert json.loads((source / "trainer_state.json").read_text())["step"] == 5
    # it went on from step 5: its checkpoints and metrics from its own first steps past 5 are gone, and the data
    # position ran on from the better trial's
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000008"]
    assert json.loads((run / "checkpoints" / "step_000008" / "trainer_state.json").read_text())["samples"] == 8 * 8
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 8
