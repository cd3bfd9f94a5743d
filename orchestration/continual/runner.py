"""The continual-learning runner: a task stream, a model, replay, EWC and a controller of the routing knobs.

``memtrain continual`` trains a registry model on a stream of tasks (``orchestration.continual.tasks``), with a
reservoir replay buffer and optional EWC (``orchestration.continual.replay``). Every ``control_interval`` steps
a controller (``orchestration.continual.control``) sees the training signals of the interval and returns the
knobs for the next one: k, replay ratio, router noise and router temperature. After each task every task (future
ones included) is evaluated on its test split, which fills the evaluation matrix the metrics come from
(``orchestration.continual.metrics``).

Command line::

    memtrain continual --model tgsmn-sparse-tiny --benchmark permuted --data /path/to/wikitext2 \\
        --controller fixed --tasks 5 --max-steps-per-task 100 --seed 0 --output runs/cl

The stepping API that ``memtrain continual``, the RL env and Tune share::

    >>> cfg = load_config(ContinualConfig, overrides=["data.source=builtin", "stream.n_tasks=2"])  # doctest: +SKIP
    >>> runner = ContinualRunner(cfg)                                                           # doctest: +SKIP
    >>> obs = runner.reset()                     # Signals of the untrained model                # doctest: +SKIP
    >>> while not runner.done:                                                                  # doctest: +SKIP
    ...     result = runner.run_interval(Knobs(k=2, replay_ratio=0.1, router_noise=0.3, router_temperature=1.0))
    ...     obs = result.signals                 # next observation; result.finished_task marks a task boundary
    >>> runner.evaluate_seen()                   # mean held-out loss over the tasks trained so far  # doctest: +SKIP

A run folder (local, a shared mount or a URI) holds ``config.yaml``, ``metrics.jsonl`` (one row per interval and
per task evaluation), ``eval_matrix.csv``, ``summary.json`` (strict JSON, written last), ``tokenizer.json``,
``tensorboard/``, ``eval_matrix.png``, ``knobs.png`` and ``checkpoints/step_NNNNNN/`` (weights, tokenizer,
optimizer, replay buffer, EWC state, controller state and RNG state; ``memtrain generate`` reads them too).
Re-running into the same ``--output`` resumes from the newest checkpoint and ends with the same summary as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from orchestration.allocator import keep_freed_memory
from orchestration.training.checkpoint import CHECKPOINT_PREFIX, checkpoint_name, config_differences
from orchestration.config import to_yaml
from orchestration.continual.control import Controller, ControllerResolver, Knobs, Signals, resolve_controller
from orchestration.continual.replay import EWC, ReplayBuffer, mix
from orchestration.continual.metrics import cl_metrics, finite_or_none, matrix_csv, plot_knobs, plot_matrix
from orchestration.continual.tasks import StreamConfig, TaskStream, build_stream
from orchestration.data.sources import DataConfig, WindowOrder
from orchestration.errors import CheckpointError, ConfigError, StorageError, check_drill
from orchestration.progress import progress
from orchestration.training.pretrain import check_model_overrides, clipped_step, param_groups
from orchestration.storage import (CHECKPOINTS, METRICS_FILE, Location, MetricsLog, TensorBoardLog, copy_folder,
                                   latest_checkpoint, local_copy, newest_intact_checkpoint, prune_checkpoints)
from orchestration.data.tokenizers import TOKENIZER_FILE

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # optimizer, replay buffer, EWC and controller state (tensors; weights_only loading)
RUNNER_FILE = "runner.json"  # counters, EMA, RNG state, evaluation matrix; written last, marks a complete checkpoint
# settings that may change when a run is resumed; every other field must match the run being continued
# Routing signals, from the model's stats: every routed family reports <family>/<stat> with these shared stat
# names (moe/router_entropy for HMST's MoE layers, tgsmn/router_entropy for TG-SMN's sparse layers, ...)
ROUTING_STATS = {"routing_entropy": "router_entropy", "expert_utilization": "experts_used_frac"}
RESUMABLE_CHANGES = ("output", "threads", "interrupt_at_step", "checkpoint_every", "keep_checkpoints")


@dataclass
class ContinualDataConfig(DataConfig):
    """The corpus settings of a continual run (DataConfig with smaller defaults; see orchestration.data.sources)."""
    source: str = "wikitext2"
    """permuted benchmark: the corpus (builtin, wikitext2, ptb, agnews or a local file/folder); multidomain uses
    stream.domains instead."""
    vocab_size: int = 2048
    """Vocabulary size of the BPE tokenizer trained on the tasks' training text."""
    seq_len: int = 64
    """Tokens per training sequence."""


@dataclass
class ContinualConfig:
    model: str = "tgsmn-sparse-tiny"
    """Registry preset (memtrain models lists them); sparse models take k, router noise and temperature."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields to change, e.g. model_overrides.n_layers=2 (vocab_size comes from the tokenizer)."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """The task stream: benchmark, number of tasks, permutation mode or domains and schedule."""
    data: ContinualDataConfig = field(default_factory=ContinualDataConfig)
    """Corpus, tokenizer and sequence length."""
    controller: str = "fixed"
    """fixed (knobs from fixed_knobs), a fixed preset (fixed-noreplay, fixed-replay30, ...) or a learned policy."""
    fixed_knobs: Knobs = field(default_factory=Knobs)
    """Knobs of the fixed controller (default: the original TG-SMN code's k 2, replay 0.10, noise 0.30,
    temperature 1.0)."""
    output: str = "runs/continual"
    """Run folder: a local path, a folder every node mounts, or a URI (re-running into it resumes from its newest
    checkpoint)."""
    seed: int = 0
    """Seed of model init, data order, replay sampling and router noise (tasks are fixed by stream.task_seed)."""
    max_steps_per_task: int = 100
    """Optimizer steps on each task."""
    control_interval: int = 10
    """Training steps between controller calls (an interval never spans two tasks, so the last one of a task
    can be shorter)."""
    batch_size: int = 16
    """Sequences per step, new and replayed together."""
    lr: float = 1e-3
    """AdamW learning rate (constant after warmup: a stream has no known end to decay towards)."""
    warmup_steps: int = 10
    """Linear warmup over the first steps of the run."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay of matrices (0: decay pulls weights to zero, against what EWC keeps)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off; the norm is still measured)."""
    ema_decay: float = 0.98
    """Decay of the EMA loss signal (per step)."""
    probe_rows: int = 4
    """Rows of the last batch of each interval on which the statistical distance of the update is measured."""
    replay_capacity: int = 2048
    """Sequences the reservoir replay buffer holds (0 = no buffer)."""
    ewc_lambda: float = 0.0
    """Strength of the EWC penalty (0 = off)."""
    ewc_gamma: float = 1.0
    """Decay of the accumulated Fisher at each new task (online EWC; 1 = keep every task's Fisher)."""
    ewc_samples: int = 32
    """Sequences of a finished task whose per-sequence gradients estimate its diagonal Fisher."""
    eval_windows: int = 64
    """Held-out windows per task and split in each evaluation (the first ones of the split)."""
    eval_batch_size: int = 32
    """Sequences per evaluation forward pass."""
    eval_k: int = 0
    """k used by every evaluation, whatever the controller last chose (0 = the model's max_k); noise is off and
    the temperature 1, so all controllers are compared under the same evaluation setting."""
    checkpoint_every: int = 5
    """Write a checkpoint every N intervals (and after each task)."""
    keep_checkpoints: int = 2
    """Newest checkpoints to keep."""
    threads: int = 0
    """torch threads for this run (0 = torch's default)."""
    interrupt_at_step: int = 0
    """Reliability drill (needs MEMTRAIN_DRILLS=1): stop the run (without a checkpoint) once this many steps are
    done, as a crash would (0 = never)."""

    def __post_init__(self):
        for name in ("max_steps_per_task", "control_interval", "batch_size", "eval_windows", "eval_batch_size",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "replay_capacity", "ewc_samples", "eval_k", "threads", "probe_rows",
                     "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_drill("interrupt_at_step", self.interrupt_at_step)
        if self.ewc_lambda < 0 or not 0 < self.ema_decay < 1 or self.lr <= 0:
            raise ConfigError(f"need ewc_lambda >= 0, 0 < ema_decay < 1 and lr > 0 (got {self.ewc_lambda}, "
                              f"{self.ema_decay}, {self.lr})")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (the loss fluctuation is a std across rows)")
        check_model_overrides(self.model, self.model_overrides)


@dataclass
class IntervalResult:
    """What ``run_interval`` returns: the next observation and what the interval cost."""
    signals: Signals
    """Training signals of the interval (the controller's next observation)."""
    steps: int
    """Training steps taken (control_interval, or fewer at the end of a task)."""
    tokens: int
    """Training tokens consumed (new and replayed)."""
    flops: float
    """Training FLOPs (forward + backward at the k in effect)."""
    wall_s: float
    """Wall time of the interval, signals included."""
    signal_s: float
    """Wall time spent on the training signals alone (the probe forwards and the reductions)."""
    finished_task: int | None
    """Index of the task this interval finished, else None (the next interval trains the next task)."""
    done: bool
    """True once the last task is finished."""


@dataclass
class _Counters:
    """The runner's position and running totals (JSON in every checkpoint)."""
    step: int = 0
    task: int = 0
    step_in_task: int = 0
    task_samples: int = 0  # new-data windows consumed in the current task: its data position
    intervals: int = 0
    tokens: int = 0
    flops: float = 0.0
    train_s: float = 0.0
    signal_s: float = 0.0
    eval_s: float = 0.0
    ema: float = 0.0


class ContinualRunner:
    """Trains one model through a task stream, an interval at a time (see the module docstring for an example).

    The stream is built (or read from the cache) once; ``reset`` starts training from scratch on it.
    """

    def __init__(self, cfg: ContinualConfig, stream: TaskStream | None = None):
        self.cfg = cfg
        keep_freed_memory()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.stream = stream or build_stream(cfg.stream, cfg.data)
        self.tasks = self.stream.tasks
        T = cfg.data.seq_len
        self.windows = {split: [t.windows(split, T) for t in self.tasks] for split in ("train", "validation", "test")}
        self.model = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> Signals:
        """A fresh model, optimizer, buffer and EWC state at task 0; returns the first observation."""
        from models.registry import build_model

        cfg = self.cfg
        self.seed = cfg.seed if seed is None else int(seed)
        torch.manual_seed(self.seed)
        self.model = build_model(cfg.model, **{**cfg.model_overrides, "vocab_size": self.stream.vocab_size})
        self.model.train()
        self.sparse = hasattr(self.model, "set_routing")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, fused=True)
        self.buffer = ReplayBuffer(cfg.replay_capacity, cfg.data.seq_len + 1)
        self.ewc = EWC(self.model, cfg.ewc_lambda, cfg.ewc_gamma)
        self.rng = np.random.default_rng([self.seed, 1])  # replay decisions, buffer sampling, reservoir slots
        self.state = _Counters()
        self.matrix: list[list[float]] = []
        self.baseline: list[float] | None = None
        # the knobs in effect before a controller speaks: the model's own routing settings, no replay
        routing = getattr(self.model, "routing", None)
        self.knobs = Knobs(routing.k, 0.0, routing.noise, routing.temperature) if routing else Knobs(1, 0.0, 0.0, 1.0)
        with torch.no_grad():
            x_BT, y_BT = self._new_rows(0, self.cfg.batch_size)
            self.state.ema = F.cross_entropy(self.model(x_BT).logits.flatten(0, 1).float(), y_BT.flatten()).item()
        self.signals = Signals(loss=self.state.ema, ema_loss=self.state.ema, **self._knob_fields(self.knobs))
        return self.signals

    @property
    def done(self) -> bool:
        return self.state.task >= len(self.tasks)

    @property
    def step(self) -> int:
        return self.state.step

    # --- training -------------------------------------------------------------------------------------------

    def run_interval(self, knobs: Knobs) -> IntervalResult:
        """Apply ``knobs``, train up to control_interval steps of the current task, return the signals."""
        if self.model is None:
            raise ConfigError("call reset() (or load_checkpoint) before run_interval()")
        if self.done:
            raise ConfigError("the stream is finished (runner.done); call reset() to start again")
        cfg, s = self.cfg, self.state
        self._apply(knobs)
        started = time.perf_counter()
        n_steps = min(cfg.control_interval, cfg.max_steps_per_task - s.step_in_task)
        per_step = [self._train_step(knobs, probe=i == n_steps - 1) for i in range(n_steps)]
        t0 = time.perf_counter()
        signals = self._interval_signals(per_step, knobs)
        signal_s = sum(p["signal_s"] for p in per_step) + time.perf_counter() - t0
        tokens = n_steps * cfg.batch_size * cfg.data.seq_len
        flops = tokens * float(self.model.flops_per_token(cfg.data.seq_len))
        finished = None
        if s.step_in_task >= cfg.max_steps_per_task:
            finished = s.task
            self._finish_task()
        wall = time.perf_counter() - started
        s.intervals += 1
        s.tokens += tokens
        s.flops += flops
        s.train_s += wall
        s.signal_s += signal_s
        self.signals = signals
        return IntervalResult(signals, n_steps, tokens, flops, wall, signal_s, finished, self.done)

    def _apply(self, knobs: Knobs) -> None:
        if self.sparse:
            self.model.set_routing(knobs.k, knobs.router_noise, knobs.router_temperature)
        self.knobs = knobs

    def _order(self, task: int) -> WindowOrder:
        return WindowOrder(self.windows["train"][task].n_windows, self.seed * 1_000 + task)

    def _new_rows(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        task = min(self.state.task, len(self.tasks) - 1)
        return self.windows["train"][task].batch(self._order(task).take(start, count))

    def _train_step(self, knobs: Knobs, probe: bool) -> dict[str, torch.Tensor | float]:
        cfg, s = self.cfg, self.state
        torch.manual_seed(self.seed * 1_000_003 + s.step)  # router noise and dropout: a function of the step
        n_replay = self.buffer.replay_rows(cfg.batch_size, knobs.replay_ratio, self.rng)
        n_new = cfg.batch_size - n_replay
        x_BT, y_BT = self._new_rows(s.task_samples, n_new)
        online_BL = torch.cat([x_BT, y_BT[:, -1:]], dim=1)
        rows_BL = mix(online_BL, self.buffer.sample(n_replay, self.rng) if n_replay else online_BL[:0])
        x_BT, y_BT = rows_BL[:, :-1], rows_BL[:, 1:]
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (s.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

        signal_s = 0.0
        if probe and cfg.probe_rows:
            t0 = time.perf_counter()
            before_PTV = self._probe_logits(x_BT[:cfg.probe_rows])
            signal_s += time.perf_counter() - t0
        out = self.model(x_BT)
        # per-token losses instead of the model's mean: the same cost, and the per-row spread is the fluctuation
        token_loss_BT = F.cross_entropy(out.logits.flatten(0, 1).float(), y_BT.flatten(),
                                        reduction="none").view_as(y_BT)
        row_loss_B = token_loss_BT.mean(dim=1)
        loss = row_loss_B.mean()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        if self.ewc.active:
            loss = loss + self.ewc.penalty()
        loss.backward()
        grad_norm = clipped_step(self.optimizer, cfg.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        self.buffer.add(online_BL, self.rng, task=s.task)

        result: dict[str, torch.Tensor | float] = {"signal_s": signal_s, "grad_norm": grad_norm.detach()}
        row_loss_B = row_loss_B.detach()
        result["loss"] = row_loss_B[:n_new].mean()
        result["loss_std"] = row_loss_B[:n_new].std() if n_new > 1 else torch.zeros(())
        result["replay_loss"] = row_loss_B[n_new:].mean() if n_replay else None
        for signal, stat in ROUTING_STATS.items():
            reported = [value for key, value in out.stats.items() if key.endswith("/" + stat)]
            if reported:
                result[signal] = reported[0]
        if probe and cfg.probe_rows:
            t0 = time.perf_counter()
            after_PTV = self._probe_logits(x_BT[:cfg.probe_rows])
            logp_pre, logp_post = F.log_softmax(before_PTV, -1), F.log_softmax(after_PTV, -1)
            kl = (logp_pre.exp() * (logp_pre - logp_post)).sum(-1).mean()
            result["stat_distance"] = (2 * kl.clamp_min(0)).sqrt()
            result["signal_s"] = signal_s + time.perf_counter() - t0
        s.step += 1
        s.step_in_task += 1
        s.task_samples += n_new
        return result

    @torch.no_grad()
    def _probe_logits(self, x_PT: torch.Tensor) -> torch.Tensor:
        """Deterministic next-token logits (eval mode: no dropout, no router noise), float32."""
        self.model.eval()
        logits_PTV = self.model(x_PT).logits.float()
        self.model.train()
        return logits_PTV

    def _interval_signals(self, per_step: list[dict], knobs: Knobs) -> Signals:
        cfg, s = self.cfg, self.state

        def mean(key: str, default: float) -> float:
            values = [p[key] for p in per_step if p.get(key) is not None]
            return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).mean().item() \
                if values else default

        ema_start = ema = s.ema
        for p in per_step:  # a handful of scalars: the EMA recursion stays a plain loop
            ema = cfg.ema_decay * ema + (1 - cfg.ema_decay) * float(p["loss"])
        s.ema = ema
        improvement = (ema_start - ema) / len(per_step)
        loss_std = mean("loss_std", 0.0)
        distance = float(per_step[-1].get("stat_distance", 0.0))
        return Signals(
            step=s.step, task=s.task, loss=mean("loss", 0.0), ema_loss=ema, ema_improvement=improvement,
            loss_std=loss_std, stat_distance=distance,
            tiur_efficiency=max(improvement, 0.0) / (loss_std * distance + 1e-8),
            grad_norm=mean("grad_norm", 0.0), routing_entropy=mean("routing_entropy", 0.0),
            expert_utilization=mean("expert_utilization", 1.0), replay_loss=mean("replay_loss", 0.0),
            task_progress=s.step_in_task / cfg.max_steps_per_task, **self._knob_fields(knobs))

    @staticmethod
    def _knob_fields(knobs: Knobs) -> dict[str, float]:
        return {"k": float(knobs.k), "replay_ratio": float(knobs.replay_ratio),
                "router_noise": float(knobs.router_noise), "router_temperature": float(knobs.router_temperature)}

    def _finish_task(self) -> None:
        """Consolidate EWC on the finished task's training windows, then move to the next task."""
        cfg, s = self.cfg, self.state
        if cfg.ewc_lambda > 0 and s.task < len(self.tasks) - 1:  # no later task to protect the last one from
            n = min(cfg.ewc_samples, self.windows["train"][s.task].n_windows)
            x_NT, y_NT = self._new_rows(0, n)
            torch.manual_seed(self.seed * 1_000_003 + s.step)
            self.ewc.consolidate(torch.cat([x_NT, y_NT[:, -1:]], dim=1))
        s.task += 1
        s.step_in_task = s.task_samples = 0

    # --- evaluation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_tasks(self, split: str = "test", tasks: list[int] | None = None) -> list[float]:
        """Mean held-out cross-entropy (nats/token) of each task (all by default) on its first eval_windows
        windows of ``split``, with the fixed evaluation knobs (eval_k, no noise, temperature 1)."""
        cfg = self.cfg
        started = time.perf_counter()
        if self.sparse:
            self.model.set_routing(cfg.eval_k or self.model.cfg.max_k, 0.0, 1.0)
        self.model.eval()
        losses = []
        for t in progress(range(len(self.tasks)) if tasks is None else tasks, desc=f"evaluating tasks ({split})",
                          unit="task"):
            windows = self.windows[split][t]
            ids = np.arange(min(windows.n_windows, cfg.eval_windows))
            total, count = 0.0, 0
            for i in range(0, len(ids), cfg.eval_batch_size):
                x_BT, y_BT = windows.batch(ids[i:i + cfg.eval_batch_size])
                logits_BTV = self.model(x_BT).logits
                total += F.cross_entropy(logits_BTV.flatten(0, 1).float(), y_BT.flatten(), reduction="sum").item()
                count += y_BT.numel()
            losses.append(total / count)
        self.model.train()
        self._apply(self.knobs)  # back to the controller's training knobs
        self.state.eval_s += time.perf_counter() - started
        return losses

    def evaluate_seen(self, split: str = "validation") -> float:
        """Mean held-out loss over the tasks trained so far (at least task 0): the RL env's reward signal."""
        s = self.state
        n_seen = max(1, min(len(self.tasks), s.task + (1 if s.step_in_task > 0 else 0)))
        return float(np.mean(self.evaluate_tasks(split, list(range(n_seen)))))

    def record_baseline(self) -> list[float]:
        """Test loss of every task before training (the reference of forward transfer)."""
        self.baseline = self.evaluate_tasks("test")
        return self.baseline

    def record_matrix_row(self) -> list[float]:
        """Test loss of every task now (call after each task): one row of the evaluation matrix."""
        row = self.evaluate_tasks("test")
        self.matrix.append(row)
        return row

    def metrics(self) -> dict[str, float | None]:
        """Continual-learning metrics of the matrix so far (see orchestration.continual.metrics)."""
        if not self.matrix:
            return {}
        m = np.array(self.matrix)
        T = m.shape[0]  # rows so far: metrics over the tasks trained so far
        baseline = np.array(self.baseline[:T]) if self.baseline is not None else None
        return {k: finite_or_none(v) for k, v in cl_metrics(m[:, :T], baseline).items()}

    # --- checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, controller: Controller | None = None) -> Path:
        """Write everything a resumed run needs into the local folder ``directory`` (copy it to the run's storage
        with ``orchestration.storage.copy_folder``, which writes the manifest that marks it complete)."""
        from models.io import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, self.cfg.model, directory)
        shutil.copyfile(self.stream.tokenizer_path, directory / TOKENIZER_FILE)
        torch.save({"optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                    "ewc": self.ewc.state_dict(), "controller": controller.state_dict() if controller else None},
                   directory / STATE_FILE)
        runner = {"seed": self.seed, "counters": dataclasses.asdict(self.state),
                  "rng": self.rng.bit_generator.state, "knobs": dataclasses.asdict(self.knobs),
                  "signals": dataclasses.asdict(self.signals), "matrix": self.matrix, "baseline": self.baseline}
        (directory / RUNNER_FILE).write_text(json.dumps(runner))
        return directory

    def load_checkpoint(self, directory: str | Path, controller: Controller | None = None) -> Signals:
        """Restore a checkpoint written by ``save_checkpoint`` from a local folder; returns the observation to
        continue from."""
        directory = Path(directory)
        try:
            runner = json.loads((directory / RUNNER_FILE).read_text())
            state = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {directory} is incomplete or corrupt ({exc})") from None
        self.reset(runner["seed"])
        from models.io import load_model

        try:
            self.model.load_state_dict(load_model(directory).state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {directory} does not fit this run's model ({exc}); use the same "
                                  "model settings or a new --output") from None
        self.model.train()
        self.buffer.load_state_dict(state["buffer"])
        self.ewc.load_state_dict(state["ewc"])
        if controller is not None and state["controller"] is not None:
            controller.load_state_dict(state["controller"])
        self.state = _Counters(**runner["counters"])
        self.rng.bit_generator.state = runner["rng"]
        self._apply(Knobs(**runner["knobs"]))
        self.signals = Signals(**runner["signals"])
        self.matrix, self.baseline = runner["matrix"], runner["baseline"]
        return self.signals


# --- the driver of one run --------------------------------------------------------------------------------------

def _check_resume_compatible(run: Location, cfg: ContinualConfig) -> None:
    saved = run / "config.yaml"
    if not saved.is_file() or latest_checkpoint(run, CHECKPOINT_PREFIX) is None:
        return
    current = dataclasses.asdict(cfg)
    saved_cfg = saved.read_yaml() or {}
    for values in (saved_cfg, current):  # data.rebuild re-makes the same stream: a resume may set it
        values.get("data", {}).pop("rebuild", None)
    keys = [k for k in current if k not in RESUMABLE_CHANGES]
    diffs = config_differences(saved_cfg, current, keys)
    if diffs:
        raise CheckpointError(f"{run} holds a run with different settings, so it cannot be resumed: "
                              f"{'; '.join(diffs)}. Use the same settings, or a new --output")


def finished_summary(run: Location, cfg: ContinualConfig) -> dict | None:
    """The summary of a finished run of ``cfg`` in this folder, or None; a run with other settings there is refused
    with the differences."""
    _check_resume_compatible(run, cfg)
    try:
        summary = (run / "summary.json").read_json()
    except (FileNotFoundError, StorageError):
        return None
    return summary if summary.get("status") == "finished" else None


def run_continual(cfg: ContinualConfig, controller: Controller | None = None,
                  stream: TaskStream | None = None, learned: ControllerResolver | None = None) -> dict:
    """Run (or resume) one continual-learning run; returns the summary also written to summary.json.

    The controller is ``controller`` when given, else the one ``cfg.controller`` names (``learned`` resolves the
    names that are not fixed settings, e.g. ``rl.envs.thermo.learned_controller_resolver`` for a policy path).

    Example::

        >>> cfg = load_config(ContinualConfig, overrides=["data.source=builtin", "stream.n_tasks=2",
        ...                   "max_steps_per_task=10", "output=runs/doc-cl"])            # doctest: +SKIP
        >>> run_continual(cfg)["forgetting"]                                          # doctest: +SKIP
    """
    run = Location(cfg.output)
    cfg = dataclasses.replace(cfg, output=run.uri)
    controller = controller or resolve_controller(cfg.controller, cfg.fixed_knobs, learned)
    _check_resume_compatible(run, cfg)
    ckpt = newest_intact_checkpoint(run, CHECKPOINT_PREFIX)
    summary = finished_summary(run, cfg) if ckpt is not None else None
    if summary is not None:
        log.info("%s is finished; its summary is %s", run, run / "summary.json")
        return summary
    runner = ContinualRunner(cfg, stream)  # builds the stream: a bad corpus is refused before the run folder exists
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / TOKENIZER_FILE).write_text(Path(runner.stream.tokenizer_path).read_text())
    metrics = MetricsLog(run / METRICS_FILE)
    if ckpt is not None:
        with local_copy(ckpt.location) as path:
            obs = runner.load_checkpoint(path, controller)
        metrics.keep(lambda r: r["step"] <= runner.step)  # rows written after the checkpoint are redone
        log.info("resumed %s from %s (task %d, step %d)", run, ckpt.location.name, runner.state.task, runner.step)
    else:
        obs = runner.reset()
        (run / METRICS_FILE).remove()
        runner.record_baseline()
    tb = TensorBoardLog(run / "tensorboard", purge_step=runner.step + 1 if ckpt else None)
    names = [t.name for t in runner.tasks]
    log.info("continual %s on %s: %d tasks x %d steps, controller %s, %s parameters", cfg.model,
             cfg.stream.benchmark, len(names), cfg.max_steps_per_task, cfg.controller,
             f"{runner.model.num_params():,}")

    while not runner.done:
        knobs = controller.act(obs)
        result = runner.run_interval(knobs)
        obs = result.signals
        row = {"kind": "interval", **dataclasses.asdict(obs), "tokens": runner.state.tokens,
               "flops": runner.state.flops, "wall_s": result.wall_s, "signal_s": result.signal_s}
        metrics.append(row)
        tb.scalars({k: v for k, v in row.items() if k not in ("step", "task")}, obs.step, "continual")
        log.info("task %d step %d | loss %.3f ema %.3f | std %.3f dist %.4f eta %.2f | grad %.2f | k %d replay %.2f "
                 "| %.0f tok/s", obs.task, obs.step, obs.loss, obs.ema_loss, obs.loss_std, obs.stat_distance,
                 obs.tiur_efficiency, obs.grad_norm, knobs.k, knobs.replay_ratio, result.tokens / result.wall_s)
        if result.finished_task is not None:
            losses = runner.record_matrix_row()
            metrics.append({"kind": "eval", "step": runner.step, "after_task": result.finished_task,
                            "test_losses": losses, **runner.metrics()})
            tb.scalars(dict(zip(names, losses)), runner.step, "eval")
            log.info("after task %d: test losses %s", result.finished_task, " ".join(f"{v:.3f}" for v in losses))
        if cfg.interrupt_at_step and runner.step >= cfg.interrupt_at_step and not runner.done:
            tb.close()
            log.warning("drill: stopping at step %d without a checkpoint (interrupt_at_step)", runner.step)
            return {"status": "interrupted", "step": runner.step}
        if result.finished_task is not None or runner.state.intervals % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory(prefix="memtrain-ckpt-") as tmp:
                copy_folder(runner.save_checkpoint(tmp, controller), run / CHECKPOINTS / checkpoint_name(runner.step))
            prune_checkpoints(run, CHECKPOINT_PREFIX, cfg.keep_checkpoints)
            tb.flush(upload=True)
    tb.close()
    return _finish(run, cfg, runner, names)


def _finish(run: Location, cfg: ContinualConfig, runner: ContinualRunner, names: list[str]) -> dict:
    """Matrix CSV, plots and summary.json (last) of a finished run."""
    s = runner.state
    (run / "eval_matrix.csv").write_text(matrix_csv(runner.matrix, names, runner.baseline))
    knobs = cfg.fixed_knobs
    title = (f"fixed knobs: k {knobs.k}, replay {knobs.replay_ratio:g}, noise {knobs.router_noise:g}, temperature "
             f"{knobs.router_temperature:g}" if cfg.controller == "fixed" else f"knobs set by controller {cfg.controller}")
    plot_matrix(runner.matrix, names, runner.baseline, run / "eval_matrix.png", title)
    all_rows = MetricsLog(run / METRICS_FILE).rows()
    rows = [r for r in all_rows if r["kind"] == "interval"]
    switches = [r["step"] for r in all_rows if r["kind"] == "eval"][:-1]
    plot_knobs(rows, switches, run / "knobs.png", title)
    summary = {
        "status": "finished",
        "model": cfg.model, "benchmark": cfg.stream.benchmark, "controller": cfg.controller, "seed": cfg.seed,
        "tasks": names, "steps": s.step, "tokens": s.tokens, "train_flops": s.flops,
        "parameters": runner.model.num_params(),
        **runner.metrics(),
        "final_test_losses": runner.matrix[-1], "baseline_test_losses": runner.baseline,
        "mean_knobs": {key: float(np.mean([r[key] for r in rows]))
                       for key in ("k", "replay_ratio", "router_noise", "router_temperature")},
        # timings differ between runs of the same seed; everything above does not
        "time": {"train_s": round(s.train_s, 2), "eval_s": round(s.eval_s, 2), "signal_s": round(s.signal_s, 3),
                 "signal_fraction": round(s.signal_s / max(s.train_s, 1e-9), 4),
                 "tokens_per_s": round(s.tokens / max(s.train_s, 1e-9), 1)},
        "files": {"checkpoint": latest_checkpoint(run, CHECKPOINT_PREFIX).location.uri,
                  "matrix": (run / "eval_matrix.csv").uri},
    }
    (run / "summary.json").write_json(summary)
    log.info("done: avg final loss %.3f, forgetting %s, BWT %s, FWT %s; summary %s", summary["avg_final_loss"],
             summary["forgetting"], summary["backward_transfer"], summary["forward_transfer"],
             run / "summary.json")
    return summary
