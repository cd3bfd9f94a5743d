"""Pretraining any registry model on Ray Train: DDP workers, checkpoints, automatic resume, worker-failure recovery.

Example::

    memtrain pretrain --model tgsmn-dense-tiny --data builtin --workers 2 --max-steps 200 --output runs/x

or from Python::

    >>> cfg = load_config(PretrainConfig, overrides=["max_steps=20", "output=runs/doc"])   # doctest: +SKIP
    >>> summary = pretrain(cfg)                                                           # doctest: +SKIP

``output`` is a local folder (one-node clusters), a folder every node mounts, or a URI (``s3://bucket/runs/x``);
Ray Train writes the checkpoints there, and on a cluster of several nodes a folder only this node sees is refused
before anything starts. Re-running with the same ``output`` resumes from its newest checkpoint (same data
position, optimizer and schedule), so raising ``max_steps`` continues a finished run. ``init_checkpoint=runs/x``
starts a new run from another run's checkpoint with this config's hyperparameters (PBT sweeps hand checkpoints
over between trials this way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from orchestration.allocator import keep_freed_memory
from orchestration.training.checkpoint import (CHECKPOINT_PREFIX, TRAINER_STATE_FILE, TrainerState, checkpoint_name,
                                      config_differences, find_checkpoint, load_optimizer_state,
                                      load_training_checkpoint, save_training_checkpoint)
from orchestration.config import ConfigError, to_yaml
from orchestration.data.sources import (DataConfig, PreparedData, TokenWindows, WindowOrder, check_source, count_windows,
                                        prepare_data)
from orchestration.errors import CheckpointError, DataError, MemtrainError, check_drill
from orchestration.training.flops import measure_matmul_peak
from orchestration.storage import (CHECKPOINTS, METRICS_FILE, Location, MetricsLog, TensorBoardLog, latest_checkpoint,
                                   newest_intact_checkpoint, ray_storage, read_metrics, require_shared)

log = logging.getLogger(__name__)

# settings a resumed run must share with the run it continues (the rest, like max_steps or lr, may change)
RESUME_KEYS = ["model", "model_overrides", "data.source", "data.tokenizer", "data.vocab_size", "data.seq_len",
               "data.val_fraction", "data.max_documents", "data.text_column", "seed", "workers", "batch_size",
               "grad_accum"]


@dataclass
class PretrainConfig:
    model: str = "tgsmn-dense-tiny"
    """Registry preset to train (``memtrain models`` lists them)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields to change, e.g. model_overrides.n_layers=2 (vocab_size comes from the tokenizer)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and sequence length."""
    output: str = "runs/pretrain"
    """Run folder (a local path, a folder every node mounts, or a URI such as s3://bucket/runs/x): config.yaml,
    metrics.jsonl, summary.json, tokenizer.json, tensorboard/, data/ (the published token shards) and
    checkpoints/."""
    seed: int = 0
    """Seed of model init, data order and dropout."""
    workers: int = 2
    """Ray Train workers (DDP ranks)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (fractions allowed); on CPU it also sets each worker's torch thread count."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; > 0 trains on GPU with NCCL (gloo on CPU)."""
    batch_size: int = 16
    """Sequences per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step (global batch = workers x grad_accum x batch_size)."""
    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr x min_lr_ratio at max_steps."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (matrices only; norms, biases and embeddings are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    max_steps: int = 200
    """Stop after this many optimizer steps (the cosine schedule spans them)."""
    max_tokens: int = 0
    """Also stop once this many training tokens were consumed (0 = no limit)."""
    eval_every: int = 50
    """Evaluate on the held-out split every N steps (and at the end)."""
    eval_batches: int = 8
    """Held-out batches per evaluation (split across workers)."""
    early_stop_patience: int = 0
    """Stop when the held-out loss has not improved for this many evaluations (0 = off)."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints to keep."""
    log_every: int = 10
    """Report metrics every N steps."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; about 4x the matmul throughput on CPUs with AMX/AVX512-BF16, and on GPUs)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may do after a worker dies (each restarts from the newest checkpoint)."""
    fail_at_step: int = 0
    """Reliability drill (needs MEMTRAIN_DRILLS=1): the last worker's process exits at this step, once per run
    folder (0 = never)."""
    init_checkpoint: str = ""
    """Start a new run from this checkpoint (a checkpoint folder, or a run folder for its newest one; local,
    shared or a URI): its
    weights, optimizer state (if loadable) and trainer state (step counter, data position) carry over, while this
    config's hyperparameters (lr, weight_decay, betas, max_steps, ...) apply from there on. The model and
    tokenizer must match it. Ignored once the run directory holds checkpoints of its own (a resume). "" = none."""

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("workers", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens", "warmup_steps", "early_stop_patience", "max_failures", "weight_decay", "grad_clip",
                     "gpus_per_worker"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0 or self.lr <= 0:
            raise ConfigError(f"cpus_per_worker and lr must be > 0, got {self.cpus_per_worker} and {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1) (AdamW's moment decay), got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_drill("fail_at_step", self.fail_at_step)
        check_model_overrides(self.model, self.model_overrides)


def check_model_overrides(model: str, overrides: dict) -> None:
    """The preset exists and its config class accepts ``overrides`` (known fields, values of their types, its own
    checks), so a bad model_overrides key is refused when the config is loaded, before data or Ray."""
    from models.common.errors import ModelError
    from models.registry import check_overrides

    try:
        check_overrides(model, overrides)
    except ModelError as exc:
        raise ConfigError(f"model_overrides: {exc}") from None


# --- the worker loop --------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to lr x min_lr_ratio at max_steps (a pure function of step: resume-exact)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only; norms, biases and embeddings (and a head tied to them) are not decayed."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clipped_step(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """``optimizer.step()`` on the gradients clipped to the global norm ``max_norm`` (0 = no clipping); returns the
    norm before clipping. The same update as ``clip_grad_norm_`` then ``step``.

    The clip is folded into the fused AdamW pass: the fused kernel divides each gradient by ``grad_scale`` as it
    reads it, which saves clip_grad_norm_'s own pass over every gradient (2% of an hmst-source-tiny bf16 step,
    ``python bench/bench_clip_fold.py``). Needs a fused optimizer (``fused=True``), as memtrain's trainers make.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s coefficient
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = None
    return norm


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: PretrainConfig) -> None:
    """Loaded optimizer state brings the saved run's betas and weight decay; this run's config decides them."""
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = cfg.weight_decay, 0.0
    for group in optimizer.param_groups:
        group["betas"] = (cfg.beta1, cfg.beta2)


class _Reducer:
    """Sums small float vectors across ranks (a no-op with one worker)."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


@torch.no_grad()
def evaluate(model, windows: TokenWindows, cfg: PretrainConfig, rank: int, world: int, device, autocast,
             reducer: _Reducer) -> float:
    """Token-weighted mean cross-entropy over the first eval_batches x batch_size held-out windows."""
    model.eval()
    n = min(windows.n_windows, cfg.eval_batches * cfg.batch_size)
    ids = np.arange(n)[rank::world]
    loss_sum, count = 0.0, 0
    for i in range(0, len(ids), cfg.batch_size):
        x_BT, y_BT = (t.to(device) for t in windows.batch(ids[i:i + cfg.batch_size]))
        with autocast():
            logits_BTV = model(x_BT).logits
        loss_sum += F.cross_entropy(logits_BTV.flatten(0, 1).float(), y_BT.flatten(), reduction="sum").item()
        count += y_BT.numel()
    model.train()
    loss_sum, count = reducer.sum([loss_sum, float(count)])
    return loss_sum / max(count, 1)


def _starting_checkpoint(cfg: PretrainConfig, rank: int, world: int) -> tuple[str, bool]:
    """(URI of the checkpoint to start from, whether it is the run's own), or ("", False) for a fresh start.

    The run's own newest intact checkpoint in storage comes first (a resume, a restart after a lost worker; a
    damaged newer one is skipped with a warning naming it), then ``init_checkpoint``. Storage is the record rather
    than Ray Train's own: a node that dies after uploading a checkpoint but before Ray Train registered it leaves a
    complete checkpoint only storage knows about. Rank 0 decides and the others follow, so every rank starts from
    the same one.
    """
    choice = [("", False)]
    if rank == 0:
        own = newest_intact_checkpoint(Location(cfg.output), CHECKPOINT_PREFIX)
        choice = [(own.location.uri, True) if own else (cfg.init_checkpoint, False)]
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]


def _load_starting_point(cfg: PretrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         rank: int, world: int) -> TrainerState:
    """Load the checkpoint ``_starting_checkpoint`` picks into model and optimizer; returns the trainer state to
    continue from."""
    import ray.train

    uri, own = _starting_checkpoint(cfg, rank, world)
    if not uri:
        return TrainerState()
    where = Location(uri)
    # Ray Train's Checkpoint downloads a remote one once per node (the node's ranks share the copy)
    with ray.train.Checkpoint(path=where.fs_path, filesystem=where.fs).as_directory() as start_dir:
        state = load_training_checkpoint(start_dir, model)
        try:
            load_optimizer_state(start_dir, optimizer)
        except CheckpointError:
            if own:
                raise
            if rank == 0:
                print(f"the optimizer state in {uri} cannot be loaded; the optimizer starts fresh", flush=True)
        apply_hyperparameters(optimizer, cfg)
    if rank == 0:
        origin = f"resumed from step {state.step} ({uri}" if own else f"initialised from {uri} at step {state.step} ("
        print(f"{origin}, data position {state.samples:,} windows)", flush=True)
    return state


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: DDP training with periodic eval, checkpoints and reports."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from models.registry import build_model

    from orchestration.ray_private import quiet_train_report_logs

    quiet_train_report_logs()
    cfg: PretrainConfig = loop_config["cfg"]
    data: PreparedData = loop_config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    keep_freed_memory()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    shards = data.shard_paths(cfg.data.cache_dir)  # this node's copy, fetched once per node
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg.model, **{**cfg.model_overrides, "vocab_size": data.vocab_size})
    raw_model = model
    # fused: one kernel per parameter group; at 82M parameters a step takes 32 ms on 2 CPU cores against 190 ms
    # for the foreach implementation
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=True)
    state = _load_starting_point(cfg, raw_model, optimizer, rank, world)
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    resumed_from = state.step

    train = TokenWindows(shards["train"], cfg.data.seq_len)
    val = TokenWindows(shards["validation"], cfg.data.seq_len)
    order = WindowOrder(train.n_windows, cfg.seed)
    reducer = _Reducer(world, device)
    use_bf16 = cfg.precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    per_rank = cfg.grad_accum * cfg.batch_size
    tokens_per_step = world * per_rank * cfg.data.seq_len
    flops_per_token = raw_model.flops_per_token(cfg.data.seq_len)
    peak = reducer.sum([measure_matmul_peak(str(device), torch.bfloat16 if use_bf16 else torch.float32)])[0]
    if rank == 0:
        print(f"training {cfg.model}: {raw_model.num_params():,} parameters, {world} worker(s) on {device.type}, "
              f"{tokens_per_step:,} tokens/step; MFU is against the measured {cfg.precision} matmul peak of "
              f"{peak / 1e9:,.0f} GFLOP/s summed over workers", flush=True)

    tokenizer_json = data.tokenizer_json(cfg.data.cache_dir)  # every checkpoint carries the tokenizer

    def report(metrics: dict, checkpoint=None, name: str | None = None) -> None:
        nonlocal resumed_from
        if resumed_from is not None:  # the first report of this (re)start: the metrics sink drops later rows
            metrics["resumed_from"], resumed_from = resumed_from, None
        metrics["time"] = round(time.time(), 3)  # wall clock of the report on the workers (before its upload)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def done() -> bool:
        return state.step >= cfg.max_steps or (cfg.max_tokens and state.tokens >= cfg.max_tokens)

    if done():  # a finished run re-launched with the same budget: report where it stands
        report({"step": state.step, "tokens": state.tokens, "done": True})
        return
    if state.step == 0:  # the starting point of the eval curve
        eval_loss = evaluate(model, val, cfg, rank, world, device, autocast, reducer)
        report({"step": 0, "tokens": 0, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    window_ce = torch.zeros((), device=device)
    window_stats: dict[str, torch.Tensor] = {}
    stop_early = False
    while not done() and not stop_early:
        if cfg.fail_at_step and state.step == cfg.fail_at_step and rank == world - 1:
            marker = Location(cfg.output) / ".drill_failed"
            if not marker.exists():
                marker.write_text("")
                print(f"drill: worker {rank} exits at step {state.step}", flush=True)
                os._exit(1)
        torch.manual_seed(cfg.seed * 1_000_003 + state.step * world + rank)  # dropout noise: resume-exact
        lr = lr_at(state.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        base = state.samples + rank * per_rank
        for micro in range(cfg.grad_accum):
            x_BT, y_BT = (t.to(device, non_blocking=True)
                          for t in train.batch(order.take(base + micro * cfg.batch_size, cfg.batch_size)))
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                out = model(x_BT, y_BT)
            (out.loss / cfg.grad_accum).backward()
            window_loss += out.loss.detach().float() / cfg.grad_accum
            window_ce += out.lm_loss.detach().float() / cfg.grad_accum
            for key, value in out.stats.items():  # routing/memory diagnostics, averaged over the log window
                value = torch.as_tensor(value).detach().float() / cfg.grad_accum
                window_stats[key] = window_stats.get(key, 0.0) + value
        grad_norm = clipped_step(optimizer, cfg.grad_clip)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples += world * per_rank
        state.tokens += tokens_per_step
        window_steps += 1

        metrics: dict[str, Any] = {}
        if state.step % cfg.log_every == 0 or done():
            elapsed = time.perf_counter() - window_start
            loss_sum, ce_sum = reducer.sum([window_loss.item() / window_steps, window_ce.item() / window_steps])
            loss_mean, ce_mean = loss_sum / world, ce_sum / world
            tokens_per_s = window_steps * tokens_per_step / elapsed
            # loss: what is backpropagated (cross-entropy + the model's auxiliary terms); train_ce: the cross-entropy
            # alone, the quantity eval_loss measures on held-out data
            metrics.update(loss=loss_mean, train_ce=ce_mean, aux_loss=loss_mean - ce_mean,
                           perplexity=math.exp(min(ce_mean, 50)), lr=lr,
                           grad_norm=float(grad_norm), tokens_per_s=tokens_per_s,
                           mfu=tokens_per_s * flops_per_token / peak)
            metrics.update({key: float(value) / window_steps for key, value in window_stats.items()})
            window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
            window_ce = torch.zeros((), device=device)
            window_stats = {}
        if state.step % cfg.eval_every == 0 or done():
            eval_loss = evaluate(model, val, cfg, rank, world, device, autocast, reducer)
            metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
            if eval_loss < state.best_eval_loss - 1e-4:
                state.best_eval_loss, state.evals_since_best = eval_loss, 0
            else:
                state.evals_since_best += 1
            stop_early = bool(cfg.early_stop_patience) and state.evals_since_best >= cfg.early_stop_patience
            metrics["early_stopped"] = stop_early
            window_start = time.perf_counter()  # evaluation time is not training throughput
        write_checkpoint = state.step % cfg.checkpoint_every == 0 or done() or stop_early
        if not metrics and not write_checkpoint:
            continue
        metrics.update(step=state.step, tokens=state.tokens, samples=state.samples, done=bool(done() or stop_early))
        with tempfile.TemporaryDirectory(prefix="memtrain-ckpt-") as tmp:
            ckpt = None
            if write_checkpoint and rank == 0:
                save_training_checkpoint(tmp, raw_model, cfg.model, optimizer, state, tokenizer_json, to_yaml(cfg))
                ckpt = Checkpoint.from_directory(tmp)
            report(metrics, checkpoint=ckpt, name=checkpoint_name(state.step) if write_checkpoint else None)
            if ckpt is not None:  # Ray Train copied it to the run's storage; on a disk, make that copy durable
                (Location(cfg.output) / CHECKPOINTS / checkpoint_name(state.step)).fsync()
            if write_checkpoint:
                window_start = time.perf_counter()


# --- the driver -------------------------------------------------------------------------------------------------

def _make_metrics_sink(run: Location):
    """A Ray Train callback (runs in the Train controller) that appends each report to metrics.jsonl and
    TensorBoard in the run's storage, and prints one log line."""
    import ray.train

    class MetricsSink(ray.train.UserCallback):
        def __init__(self):
            self.run = run
            self.log = MetricsLog(run / METRICS_FILE)
            self.tb = None

        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0])
            resumed_from = row.pop("resumed_from", None)
            if resumed_from is not None:
                # a (re)start from the checkpoint at this step: rows written after it are trained again, so they
                # go (a start from scratch keeps none)
                rows = self.log.rows()
                if any(r["step"] > resumed_from or not resumed_from for r in rows):
                    self.log.keep(lambda r: resumed_from and r["step"] <= resumed_from)
            if checkpoint is not None:
                row["checkpoint"] = (self.run / CHECKPOINTS / Path(checkpoint.path).name).uri
            self.log.append(row)
            if self.tb is None:
                self.tb = TensorBoardLog(self.run / "tensorboard")
            self.tb.scalars({k: v for k, v in row.items() if k not in ("step", "time")}, row["step"], "pretrain")
            self.tb.flush(upload=checkpoint is not None or bool(row.get("done")))
            parts = [f"step {row['step']}"]
            if "loss" in row:
                parts += [f"loss {row['loss']:.4f} (cross-entropy {row['train_ce']:.4f})", f"lr {row['lr']:.2e}", f"grad {row['grad_norm']:.2f}",
                          f"{row['tokens_per_s']:,.0f} tok/s", f"MFU {100 * row['mfu']:.1f}%"]
            if "eval_loss" in row:
                parts.append(f"eval {row['eval_loss']:.4f} (ppl {row['eval_perplexity']:.1f})")
            if checkpoint is not None:
                parts.append(f"checkpoint {Path(checkpoint.path).name}")
            print("[memtrain] " + " | ".join(parts), flush=True)

    return MetricsSink()


def has_checkpoints(run: Location) -> bool:
    """Whether the run folder holds complete checkpoints of its own (then a run resumes from them)."""
    return latest_checkpoint(run, CHECKPOINT_PREFIX) is not None


def resolve_init_checkpoint(cfg: PretrainConfig, data: PreparedData) -> tuple[str, int]:
    """The checkpoint that ``cfg.init_checkpoint`` names (its location) and its step, checked against this run's
    model and tokenizer."""
    from models.io import CONFIG_FILE
    from models.registry import model_config
    from orchestration.data.tokenizers import TOKENIZER_FILE

    try:
        ckpt = find_checkpoint(cfg.init_checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"init_checkpoint: {exc}") from None
    if not (ckpt / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"init_checkpoint {ckpt} has no {TRAINER_STATE_FILE}, so it is not a training "
                              "checkpoint; point at a run folder or checkpoints/step_* of memtrain pretrain")
    spec = (ckpt / CONFIG_FILE).read_json()
    wanted = json.loads(json.dumps(dataclasses.asdict(
        model_config(cfg.model, **{**cfg.model_overrides, "vocab_size": data.vocab_size}))))
    diffs = [f"{k} {spec['config'].get(k)!r} there, {v!r} here" for k, v in wanted.items()
             if spec["config"].get(k) != v]
    if diffs:
        raise CheckpointError(f"init_checkpoint {ckpt} holds a different model ({spec['name']}: {'; '.join(diffs)}); "
                              "set model and model_overrides to match it")
    saved_tokenizer = ckpt / TOKENIZER_FILE
    if saved_tokenizer.is_file() and saved_tokenizer.read_text() != data.tokenizer_json(cfg.data.cache_dir):
        raise CheckpointError(f"init_checkpoint {ckpt} was trained with another tokenizer than this run's; reuse it "
                              f"with data.tokenizer={saved_tokenizer}")
    return ckpt.uri, int((ckpt / TRAINER_STATE_FILE).read_json()["step"])


def _check_resume_compatible(run: Location, cfg: PretrainConfig) -> None:
    saved = run / "config.yaml"
    if not saved.is_file() or not has_checkpoints(run):
        return
    diffs = config_differences(saved.read_yaml() or {}, dataclasses.asdict(cfg), RESUME_KEYS)
    if diffs:
        raise CheckpointError(f"{run} holds a run with different settings, so it cannot be resumed: "
                              f"{'; '.join(diffs)}. Use the same settings, or a new --output")


def make_trainer(cfg: PretrainConfig, data: PreparedData, run: Location, callbacks: list,
                 controller_failure_limit: int = 2):
    """The TorchTrainer of one pretraining run: ``train_worker`` on ``cfg.workers`` workers (NCCL on GPUs, gloo on
    CPUs), Train's storage in the run folder (``<output>/checkpoints``, so a re-run resumes from its newest
    checkpoint), and ``callbacks`` receiving the workers' reports. ``controller_failure_limit`` bounds how often a
    worker group that cannot start (no room for it within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) is retried."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    # A worker's report waits until the Train controller has taken the previous one, and the controller looks
    # every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s): reports closer together than that stall
    # training. Ray Train passes the driver's value on to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "data": data},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=CHECKPOINTS, **ray_storage(run),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures,
                                         controller_failure_limit=controller_failure_limit),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # the metrics sink prints one line per report
        ),
    )


def check_enough_windows(cfg: PretrainConfig, data: PreparedData) -> None:
    """Refuse a corpus too small for one optimizer step or one held-out window, before any worker starts."""
    needed = cfg.workers * cfg.grad_accum * cfg.batch_size
    n_train = count_windows(data.n_tokens["train"], cfg.data.seq_len)
    if n_train < needed:
        raise DataError(f"the training split has {n_train} windows of {cfg.data.seq_len} tokens but one step needs "
                        f"{needed} (workers x grad_accum x batch_size); use more text, a shorter data.seq_len or a "
                        "smaller batch")
    if count_windows(data.n_tokens["validation"], cfg.data.seq_len) < 1:
        raise DataError(f"the validation split has fewer than {cfg.data.seq_len + 1} tokens; lower data.seq_len or "
                        "raise data.val_fraction")


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) a pretraining job on the current Ray cluster; returns the summary also written to summary.json."""
    from orchestration.runtime import ensure_ray

    from models.registry import model_config

    model_config(cfg.model, **cfg.model_overrides)  # a bad preset or field fails here, not in every worker
    check_source(cfg.data.source)
    run = Location(cfg.output)
    cfg = dataclasses.replace(cfg, output=run.uri)
    _check_resume_compatible(run, cfg)
    ensure_ray()
    # every node's workers write checkpoints there and read the data and init_checkpoint from there
    require_shared(run, "output")
    for what, where in (("init_checkpoint", cfg.init_checkpoint), ("data.store", cfg.data.store)):
        if where:
            require_shared(Location(where), what)
    started = time.time()
    data = prepare_data(cfg.data, run)
    check_enough_windows(cfg, data)
    if cfg.init_checkpoint and has_checkpoints(run):
        log.info("%s holds checkpoints, so the run resumes from them and init_checkpoint is not used", run)
    elif cfg.init_checkpoint:
        path, step = resolve_init_checkpoint(cfg, data)
        if step >= cfg.max_steps:
            raise ConfigError(f"init_checkpoint {path} is at step {step} and the step counter continues from it, so "
                              f"max_steps={cfg.max_steps} leaves nothing to train; raise max_steps")
        cfg = dataclasses.replace(cfg, init_checkpoint=path)
    (run / "config.yaml").write_text(to_yaml(cfg))
    result = fit(make_trainer(cfg, data, run, [_make_metrics_sink(run)]), cfg)
    checkpoint = (run / CHECKPOINTS / Path(result.checkpoint.path).name).uri if result.checkpoint else None
    summary = summarize(run, checkpoint, time.time() - started)
    print(f"[memtrain] done: final eval loss {summary.get('final_eval_loss')}, checkpoint {summary['checkpoint']}, "
          f"summary {run / 'summary.json'}", flush=True)
    return summary


def fit(trainer, cfg: PretrainConfig):
    """``trainer.fit()``, with a worker group that never got its resources reported as what it is."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.ControllerError as exc:
        asked = f"{cfg.workers} worker(s) x {cfg.cpus_per_worker:g} CPU" + (
            f" + {cfg.gpus_per_worker:g} GPU" if cfg.gpus_per_worker else "")
        raise MemtrainError(f"the training workers could not start ({asked}): {str(exc).splitlines()[0][:300]}. The "
                            "cluster has no room for them (a GPU asked for where there is none?), or its autoscaler "
                            "added no node within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; lower workers, "
                            "cpus_per_worker or gpus_per_worker, or give the cluster the nodes") from None


def summarize(run: Location, checkpoint: str | None, wall_s: float) -> dict:
    """Final figures of a run from its metrics.jsonl, written to summary.json (strict JSON, last file written)."""
    from orchestration.report import run_figures

    rows = read_metrics(run)
    summary = {**run_figures(rows), "early_stopped": bool(rows and rows[-1].get("early_stopped")),
               "checkpoint": checkpoint, "wall_s": round(wall_s, 1)}
    (run / "summary.json").write_json(summary)
    return summary
