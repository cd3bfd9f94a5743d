"""Ray Train pretraining end to end on a real local cluster: loss falls, resume is exact, a dead worker recovers."""

import json
import re

import pytest

from orchestration.training.checkpoint import find_checkpoint, load_training_checkpoint
from orchestration.cli import main
from orchestration.config import load_config
from orchestration.errors import CheckpointError, ConfigError, MemtrainError
from orchestration.training.pretrain import PretrainConfig, pretrain
from orchestration.storage import read_metrics

WORKERS, BATCH, SEQ = 2, 8, 32
SAMPLES_PER_STEP = WORKERS * BATCH


@pytest.fixture(scope="module")
def shard_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shards"))


def small(output, shard_cache, *extra):
    return load_config(PretrainConfig, overrides=[
        f"output={output}", f"data.cache_dir={shard_cache}", "data.vocab_size=512", f"data.seq_len={SEQ}",
        "data.max_documents=600", "model_overrides.n_layers=2", "model_overrides.d_model=64",
        "model_overrides.d_ff=128", f"workers={WORKERS}", f"batch_size={BATCH}", "eval_every=10",
        "eval_batches=4", "checkpoint_every=10", "log_every=5", "warmup_steps=5", *extra])


def trainer_state(run_dir):
    return json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory, shard_cache):
    out = tmp_path_factory.mktemp("full")
    return out, pretrain(small(out, shard_cache, "max_steps=30"))


def test_two_workers_loss_falls_and_outputs_are_written(uninterrupted):
    out, summary = uninterrupted
    assert summary["step"] == 30 and summary["final_eval_loss"] < summary["first_eval_loss"] - 0.5
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = read_metrics(out)
    assert {"loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[-1])
    assert (out / "config.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert trainer_state(out)["samples"] == 30 * SAMPLES_PER_STEP
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_resumed_run_continues_from_saved_step_and_data_position(uninterrupted, tmp_path, shard_cache):
    _, reference = uninterrupted
    tokens_at_20 = 20 * SAMPLES_PER_STEP * SEQ
    first = pretrain(small(tmp_path, shard_cache, "max_steps=30", f"max_tokens={tokens_at_20}"))
    assert first["step"] == 20 and trainer_state(tmp_path)["samples"] == 20 * SAMPLES_PER_STEP
    second = pretrain(small(tmp_path, shard_cache, "max_steps=30"))
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # nothing re-done after the resume
    assert trainer_state(tmp_path)["samples"] == 30 * SAMPLES_PER_STEP
    # same data, optimizer state and schedule: the resumed run ends where the uninterrupted one did
    assert second["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], abs=1e-4)


def test_new_run_from_init_checkpoint_continues_its_step_optimizer_and_data(uninterrupted, tmp_path, shard_cache):
    out, reference = uninterrupted
    summary = pretrain(small(tmp_path, shard_cache, "max_steps=30", f"init_checkpoint={out}/checkpoints/step_000020"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [25, 30]  # the step counter went on from 20
    assert trainer_state(tmp_path)["samples"] == 30 * SAMPLES_PER_STEP
    # weights, optimizer state, data position and schedule all carried over: the uninterrupted run's result
    assert summary["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], abs=1e-4)
    assert load_config(PretrainConfig, tmp_path / "config.yaml").init_checkpoint == str(
        out / "checkpoints" / "step_000020")


def test_init_checkpoint_mismatches_are_refused_before_training(uninterrupted, tmp_path, shard_cache):
    out, _ = uninterrupted
    with pytest.raises(CheckpointError, match=r"holds a different model \(tgsmn-dense-tiny: n_layers 2 there, 3 here\)"):
        pretrain(small(tmp_path / "a", shard_cache, "max_steps=40", f"init_checkpoint={out}", "model_overrides.n_layers=3"))
    with pytest.raises(CheckpointError, match=r"another tokenizer .* data.tokenizer=.*tokenizer.json"):
        pretrain(small(tmp_path / "b", shard_cache, "max_steps=40", f"init_checkpoint={out}", "data.max_documents=500"))
    with pytest.raises(ConfigError, match=r"at step 30 .* max_steps=30 leaves nothing to train"):
        pretrain(small(tmp_path / "c", shard_cache, "max_steps=30", f"init_checkpoint={out}"))
    with pytest.raises(CheckpointError, match=r"init_checkpoint: no checkpoint found"):
        pretrain(small(tmp_path / "d", shard_cache, f"init_checkpoint={tmp_path / 'missing'}"))


def test_dead_worker_recovers_from_last_checkpoint(ray_session, tmp_path, shard_cache):
    summary = pretrain(small(tmp_path, shard_cache, "max_steps=20", "fail_at_step=15", "max_failures=1"))
    assert (tmp_path / ".drill_failed").exists()
    assert summary["step"] == 20 and trainer_state(tmp_path)["samples"] == 20 * SAMPLES_PER_STEP
    assert read_metrics(tmp_path)[-1]["step"] == 20


def test_generate_from_a_run(uninterrupted, capsys):
    out, _ = uninterrupted
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_bad_inputs_give_clear_errors(uninterrupted, tmp_path, shard_cache, capsys):
    out, _ = uninterrupted

    def error_of(*argv):
        assert main(list(argv)) == 1
        return capsys.readouterr().err

    assert "no such file or folder" in error_of("pretrain", "--data", str(tmp_path / "missing.txt"),
                                                "--output", str(tmp_path / "r1"))
    assert "unknown model 'nope'" in error_of("pretrain", "--model", "nope", "--output", str(tmp_path / "r2"),
                                              f"data.cache_dir={shard_cache}", "data.max_documents=50")
    assert "unknown config key 'lr_max'" in error_of("pretrain", "lr_max=1")
    # resuming a run directory with another architecture is refused and says what differs
    with pytest.raises(CheckpointError, match="model_overrides.*same settings, or a new --output"):
        pretrain(small(out, shard_cache, "max_steps=30", "model_overrides.n_layers=3"))
    # a corrupt checkpoint is named as such
    ckpt = find_checkpoint(out).local_path
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    from models.registry import build_model

    with pytest.raises(CheckpointError, match="corrupt"):
        load_training_checkpoint(broken, build_model("tgsmn-dense-tiny", vocab_size=512, n_layers=2, d_model=64,
                                                     d_ff=128))
    assert "corrupt" in error_of("generate", "--checkpoint", str(broken), "--prompt", "x")


def test_a_damaged_newest_checkpoint_is_skipped_on_resume(ray_session, tmp_path, shard_cache):
    first = pretrain(small(tmp_path, shard_cache, "max_steps=20"))
    newest = tmp_path / "checkpoints" / "step_000020" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-100:] = bytes(100)  # same size, other bytes: only the checksum tells
    newest.write_bytes(bytes(data))
    ended = max(r["time"] for r in read_metrics(tmp_path))
    summary = pretrain(small(tmp_path, shard_cache, "max_steps=30"))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20, 25, 30] and summary["step"] == 30
    # it went on from step 10, the newest intact checkpoint: steps 15 and 20 were trained again
    assert min(r["time"] for r in rows if r["step"] > 10) > ended >= max(r["time"] for r in rows if r["step"] <= 10)
    assert trainer_state(tmp_path)["samples"] == 30 * SAMPLES_PER_STEP and first["step"] == 20


@pytest.mark.parametrize("override, message", [
    ("lr=0", "lr must be > 0"), ("weight_decay=-0.1", "weight_decay must be >= 0"),
    ("beta2=1.0", r"beta2 must be in \[0, 1\)"), ("max_tokens=-5", "max_tokens must be >= 0"),
    ("early_stop_patience=-1", "early_stop_patience must be >= 0"), ("grad_clip=-1", "grad_clip must be >= 0"),
    ("gpus_per_worker=-1", "gpus_per_worker must be >= 0"), ("data.max_documents=-3", "max_documents must be >= 0"),
])
def test_bad_numbers_are_refused_before_anything_starts(tmp_path, capsys, override, message):
    assert main(["pretrain", "--output", str(tmp_path / "run"), override]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_drills_need_the_drills_switch(monkeypatch):
    monkeypatch.delenv("MEMTRAIN_DRILLS", raising=False)
    with pytest.raises(ConfigError, match=r"fail_at_step=5 is a reliability drill .* MEMTRAIN_DRILLS=1"):
        load_config(PretrainConfig, overrides=["fail_at_step=5"])


def test_workers_that_can_never_start_fail_with_a_clear_error(ray_session, tmp_path, shard_cache, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")  # Ray Train passes it on to its controller
    with pytest.raises(MemtrainError, match=r"training workers could not start \(2 worker\(s\) x 1 CPU \+ 1 GPU\).*"
                                            r"no room for them"):
        pretrain(small(tmp_path, shard_cache, "max_steps=5", "gpus_per_worker=1"))  # this machine has no GPU


@pytest.mark.parametrize("max_norm", [0.05, 0.0])
def test_clipped_step_updates_like_clip_grad_norm_then_step(max_norm):
    import copy

    import torch

    from orchestration.training.pretrain import clipped_step, param_groups

    torch.manual_seed(0)
    folded = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    reference = copy.deepcopy(folded)
    opt_f = torch.optim.AdamW(param_groups(folded, 0.1), lr=1e-2, fused=True)
    opt_r = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2, fused=True)
    for _ in range(3):
        x_BD = torch.randn(64, 16) * 10
        for model in (folded, reference):
            model(x_BD).square().mean().backward()
        norm_r = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm if max_norm else float("inf"))
        opt_r.step()
        norm_f = clipped_step(opt_f, max_norm)
        assert float(norm_f) == pytest.approx(float(norm_r), rel=1e-6) and (max_norm == 0 or norm_r > max_norm)
        for opt in (opt_f, opt_r):
            opt.zero_grad(set_to_none=True)
        for a, b in zip(folded.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not hasattr(opt_f, "grad_scale") or opt_f.grad_scale is None  # the next plain step is not scaled
