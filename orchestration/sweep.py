"""Hyperparameter sweeps with Ray Tune over pretraining runs (``memtrain sweep FILE.yaml``).

Each trial is a real Ray Train pretraining run: a light Tune function (0.01 CPU) builds and fits a
``TorchTrainer`` running :func:`orchestration.training.pretrain.train_worker`, and a Train callback hands the workers'
evaluations to the Tune function, which reports them to Tune (under Ray Train v2, ``Tuner(TorchTrainer)`` does
not work: a Tune function builds and fits the ``TorchTrainer`` itself). Every trial folder is an ordinary
pretraining run folder (config.yaml, metrics.jsonl, tensorboard/, checkpoints/), so ``memtrain report`` and
``memtrain pretrain --output`` work on it. The sweep's ``output`` may be a local path, a folder every node mounts
or a URI; Tune's experiment state, the trials and the token shards (tokenized once, in ``data/``) all live there,
and trials start on whatever nodes the cluster (or its autoscaler) has for them.

Schedulers: ASHA stops the worse trials early, FIFO runs them all, and PBT (population based training) makes the
worse trials continue from the better trials' checkpoints with perturbed hyperparameters. For PBT each trial
reports, at every perturbation point, its newest Train checkpoint as a Tune checkpoint (Tune copies it into the
trial's directory under ``tune/``, so it outlives Ray Train's ``keep_checkpoints``); a trial that PBT restarts with
another trial's checkpoint drops its own checkpoints and continues from that one (``init_checkpoint``) at its step,
with the mutated hyperparameters. Tune logs every exploit in ``tune/pbt_global.txt``.

Example::

    memtrain sweep configs/sweeps/pretrain-lr.yaml
    memtrain sweep configs/sweeps/pretrain-lr.yaml num_samples=8 pretrain.max_steps=400 output=runs/lr2

or from Python::

    >>> cfg = load_config(SweepConfig, "configs/sweeps/pretrain-lr.yaml")   # doctest: +SKIP
    >>> rows = sweep(cfg)                                                    # doctest: +SKIP
    >>> rows[0]["trial_id"], rows[0]["eval_loss"]                            # the best trial  # doctest: +SKIP

The sweep folder holds ``results.csv`` and ``results.md`` (trials ranked by the metric), ``best_config.yaml``
(a pretraining config: ``memtrain pretrain --config .../best_config.yaml``), ``sweep.yaml`` (the resolved sweep
config), ``trials/<trial_id>/`` and Tune's experiment state in ``tune/``. Re-running the same command on a sweep
folder that holds an unfinished experiment (Ctrl+C, a crash, ``interrupt_after_trials``) restores it with
``Tuner.restore``: finished trials are kept, interrupted ones resume from their newest Train checkpoint, pending
ones start. ``memtrain sweep`` exits with an error when a trial failed or the sweep did not finish.

Adding another kind of trial (continual learning, PPO) means one more entry in ``TRIAL_KINDS``: its config
section, how a trial runs, and its time attribute for the schedulers.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import yaml

from orchestration.training.checkpoint import TRAINER_STATE_FILE
from orchestration.config import _valid_keys, from_dict, load_config, nest_dotted, to_yaml
from orchestration.errors import ConfigError, MemtrainError, check_drill
from orchestration.training.pretrain import RESUME_KEYS, PretrainConfig, check_enough_windows, has_checkpoints
from orchestration.storage import CHECKPOINTS, METRICS_FILE, Location, MetricsLog, ray_storage, read_metrics
from orchestration.data.tokenizers import TOKENIZER_FILE

log = logging.getLogger(__name__)
T = TypeVar("T")

TUNE_DIR = "tune"            # Tune experiment: <output>/tune/{tuner.pkl, experiment_state-*.json, <trial dirs>}
TRIALS_DIR = "trials"        # one pretraining run folder per trial: <output>/trials/<trial_id>/
INTERRUPT_MARKER = ".drill_interrupted"
SEARCH_TYPES = ("choice", "grid", "uniform", "loguniform")


@dataclass
class SchedulerConfig:
    name: str = "asha"
    """asha (stop the worse trials at step milestones; ASHA of Li et al.), fifo (run every trial to the end) or
    pbt (population based training of Jaderberg et al.: the worse trials continue from the better trials'
    checkpoints with perturbed hyperparameters)."""
    grace_period: int = 0
    """ASHA: steps every trial runs before it can be stopped (0 = the pretraining eval_every)."""
    reduction_factor: float = 2.0
    """ASHA: only the best 1/reduction_factor of the trials at a milestone go on to the next one."""
    brackets: int = 1
    """ASHA: number of brackets (different grace periods); 1 is the usual choice."""
    perturbation_interval: int = 0
    """PBT: steps between a trial's exploit/explore decisions, a multiple of pretrain.eval_every and
    pretrain.checkpoint_every (0 = their least common multiple). At each one the trial's checkpoint is copied into
    the Tune directory (every copy is kept, so that any of them can be handed to another trial)."""
    quantile_fraction: float = 0.25
    """PBT: at a decision, a trial in the worst quantile_fraction of the population continues from the checkpoint
    of one in the best quantile_fraction (at most 0.5; with 2 trials, one copies the other)."""
    resample_probability: float = 0.25
    """PBT: chance that an explored hyperparameter is drawn afresh from the search space instead of perturbed
    (x0.8 or x1.2 for a range; the neighbouring value for choice and grid)."""
    synch: bool = False
    """PBT: decide for all trials at once, when every one has reached the perturbation point (trials that are
    ahead pause and wait). The default decides for each trial as it arrives, comparing it with the others' latest
    evaluations, so trials that do not overlap in time (one finished before another started) never exchange."""

    def __post_init__(self):
        if self.name not in ("asha", "fifo", "pbt"):
            raise ConfigError(f"scheduler.name must be asha, fifo or pbt, got {self.name!r}")
        if self.grace_period < 0 or self.reduction_factor <= 1 or self.brackets < 1:
            raise ConfigError("scheduler needs grace_period >= 0, reduction_factor > 1 and brackets >= 1, got "
                              f"{self.grace_period}, {self.reduction_factor}, {self.brackets}")
        if self.perturbation_interval < 0 or not 0 < self.quantile_fraction <= 0.5 \
                or not 0 <= self.resample_probability <= 1:
            raise ConfigError("scheduler needs perturbation_interval >= 0, 0 < quantile_fraction <= 0.5 and "
                              f"0 <= resample_probability <= 1, got {self.perturbation_interval}, "
                              f"{self.quantile_fraction}, {self.resample_probability}")


@dataclass
class SweepConfig:
    kind: str = "pretrain"
    """What a trial runs: pretrain (a Ray Train pretraining run configured by the ``pretrain`` section)."""
    output: str = "runs/sweep"
    """Sweep folder (a local path, a folder every node mounts, or a URI): results.csv/.md, best_config.yaml,
    sweep.yaml, trials/<id>/, data/ (the token shards) and the Tune state in tune/."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The pretraining config every trial starts from; the search space replaces some of its fields."""
    search: dict[str, Any] = field(default_factory=dict)
    """Search space: a key of the trial config (dots for nested keys: lr, data.seq_len, model_overrides.d_model)
    mapped to one of {choice: [values]}, {grid: [values]}, {uniform: [low, high]}, {loguniform: [low, high]}."""
    metric: str = "eval_loss"
    """Reported metric that ranks trials (and drives ASHA): eval_loss, eval_perplexity, loss, ..."""
    mode: str = "min"
    """min or max: whether a smaller or a larger metric is better."""
    num_samples: int = 1
    """Samples of the search space; every grid combination is run num_samples times."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Trial scheduler and its parameters."""
    max_concurrent_trials: int = 0
    """Trials running at once (0 = as many as the cluster's CPUs/GPUs hold now, at least 1; an autoscaling cluster
    that has no node for a trial yet starts one for it)."""
    driver_cpus: float = 0.01
    """CPUs reserved by each trial's driver, which only builds and waits on its TorchTrainer (must be > 0: Tune
    refuses an empty reservation). A trial reserves this plus pretrain.workers x pretrain.cpus_per_worker."""
    trial_start_retries: int = 2
    """Times a trial's Ray Train controller may retry starting its worker group (for example when it cannot get
    resources) before the trial errors, instead of waiting forever."""
    seed: int = 0
    """Seed of the search-space sampling (each trial's training seed is pretrain.seed unless searched)."""
    interrupt_after_trials: int = 0
    """Reliability drill (needs MEMTRAIN_DRILLS=1): interrupt the sweep like Ctrl+C once this many trials
    finished, once per sweep folder (0 = never); re-running the command resumes it."""
    trust_checkpoint: bool = False
    """Restore an unfinished sweep from the output folder's Tune state. It holds pickles, and loading a pickle runs
    whatever code it names: set this only for sweep folders you wrote, never for one you were handed."""

    def __post_init__(self):
        if self.kind not in TRIAL_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(TRIAL_KINDS)}, got {self.kind!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be min or max, got {self.mode!r}")
        if self.num_samples < 1 or self.max_concurrent_trials < 0 or self.trial_start_retries < 0:
            raise ConfigError("num_samples must be >= 1, max_concurrent_trials and trial_start_retries >= 0")
        check_drill("interrupt_after_trials", self.interrupt_after_trials)
        if self.driver_cpus <= 0:
            raise ConfigError(f"driver_cpus must be > 0 (Tune cannot reserve nothing), got {self.driver_cpus}; "
                              "0.01 is plenty")
        if not self.search:
            raise ConfigError("the search space is empty; add e.g. search: {lr: {loguniform: [1.0e-4, 1.0e-2]}}")
        self.search = flat_search(self.search)
        if self.scheduler.name == "pbt":
            _check_pbt(self)
        kind = TRIAL_KINDS[self.kind]
        if self.scheduler.name == "asha" and kind.grace(self) > kind.max_t(self):
            raise ConfigError(f"scheduler.grace_period={kind.grace(self)} is beyond the {kind.max_t(self)} steps the "
                              "trials train; lower it (ASHA stops trials only after it) or raise pretrain.max_steps")


# settings every PBT trial must share: a checkpoint carries over only to the same model, data and batch layout,
# and the evaluation and checkpoint steps fix where PBT decides
_PBT_FIXED = {*RESUME_KEYS, "init_checkpoint", "eval_every", "checkpoint_every"}


def _pbt_interval(cfg: SweepConfig) -> int:
    p = cfg.pretrain
    return cfg.scheduler.perturbation_interval or math.lcm(p.eval_every, p.checkpoint_every)


def _check_pbt(cfg: SweepConfig) -> None:
    for key in cfg.search:
        if key in _PBT_FIXED or key.startswith(("model_overrides.", "data.")):
            raise ConfigError(f"search key {key!r} cannot be searched with scheduler.name=pbt: PBT hands a trial's "
                              f"checkpoint to trials with other values, so {key} must be the same in every trial; "
                              "set it in the pretrain section (or use scheduler.name=asha or fifo)")
    p, interval = cfg.pretrain, _pbt_interval(cfg)
    if interval % p.eval_every or interval % p.checkpoint_every:
        raise ConfigError(f"scheduler.perturbation_interval={interval} must be a multiple of pretrain.eval_every "
                          f"({p.eval_every}) and pretrain.checkpoint_every ({p.checkpoint_every}): PBT decides at "
                          "evaluations and hands over checkpoints; use a common multiple, or 0 for the least one")


def _check_spec(key: str, spec) -> None:
    example = "e.g. lr: {loguniform: [1.0e-4, 1.0e-2]} or data.seq_len: {choice: [64, 128]}"
    if isinstance(spec, dict) and len(spec) > 1:  # an override of a key the YAML file searches merges into it
        raise ConfigError(f"search.{key} has several kinds ({', '.join(spec)}); give exactly one, e.g. edit the "
                          f"YAML file instead of overriding search.{key} with a different kind")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_TYPES:
        raise ConfigError(f"search.{key} must be one of {{{'|'.join(SEARCH_TYPES)}: ...}} ({example}), got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search.{key}.{kind} needs a non-empty list ({example}), got {values!r}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise ConfigError(f"search.{key}.{kind} needs [low, high] numbers with low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"search.{key}.loguniform needs low > 0, got {values[0]}")


def flat_search(search: dict) -> dict:
    """The search space with dotted keys, every spec checked. Nested keys, as a command-line override makes them
    (search.data.seq_len.choice=[64,128] gives {"data": {"seq_len": {"choice": [64, 128]}}}), are joined with dots,
    so they mean what ``data.seq_len: {choice: [64, 128]}`` means in a YAML file (the later of the two wins).

    >>> flat_search({"lr": {"grid": [1, 2]}, "data": {"seq_len": {"choice": [64, 128]}}})
    {'lr': {'grid': [1, 2]}, 'data.seq_len': {'choice': [64, 128]}}
    """
    flat: dict = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            nested = isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values())
            if nested and not set(value) & set(SEARCH_TYPES):  # a level of keys, not a spec
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(search, "")
    for key, spec in flat.items():
        _check_spec(key, spec)
    return flat


# --- search space -----------------------------------------------------------------------------------------------

def trial_config(base: T, params: dict) -> T:
    """The base config (a pretraining config, or any other: ``memtrain rl tune`` passes a PPO run's) with the
    sampled ``params`` (dotted keys) put in, checked like any config.

    >>> trial_config(PretrainConfig(), {"lr": 1e-3, "model_overrides.d_model": 64}).model_overrides
    {'d_model': 64}
    """
    return load_config(type(base), **nest_dotted(params, into=dataclasses.asdict(base)))


def corner_params(search: dict) -> list[dict]:
    """Every choice/grid value and both ends of every range, combined: what the trials can be, checked up front."""
    options = {k: next(iter(s.values())) for k, s in search.items()}
    keys = list(options)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(options[k] for k in keys))]


def _check_search_keys(cfg: SweepConfig) -> None:
    """Search keys must name fields of the trial config; every corner of the space must make a valid config."""
    from models.registry import model_config

    valid = _valid_keys(PretrainConfig)
    for key in cfg.search:
        if key not in valid and not key.startswith("model_overrides."):
            raise ConfigError(f"search key {key!r} is not a field of the {cfg.kind} config; valid keys: "
                              f"{', '.join(valid)} (model_overrides.<model field> too)")
        if key == "output":
            raise ConfigError("search key 'output' is not allowed: every trial writes to <sweep output>/trials/<id>")
    for params in corner_params(cfg.search):
        try:
            trial = trial_config(cfg.pretrain, params)
            model_config(trial.model, **trial.model_overrides)
        except MemtrainError as exc:
            raise ConfigError(f"the search space makes an invalid trial config at {params}: {exc}") from None
        except (TypeError, ValueError) as exc:  # the model family's own checks
            raise ConfigError(f"the search space makes an invalid model at {params}: {exc}") from None


def tune_space(search: dict) -> dict:
    """Tune's param_space from our search spec.

    >>> sorted(tune_space({"lr": {"loguniform": [1e-4, 1e-2]}, "seed": {"grid": [0, 1]}}))
    ['lr', 'seed']
    """
    from ray import tune

    make: dict[str, Callable] = {"choice": tune.choice, "grid": tune.grid_search,
                                 "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, spec in search.items() for kind, values in spec.items()}


def planned_trials(cfg: SweepConfig) -> int:
    grids = [len(v) for s in cfg.search.values() for k, v in s.items() if k == "grid"]
    return cfg.num_samples * math.prod(grids)


# --- one trial: a Ray Train pretraining run inside a Tune function ----------------------------------------------

_TRAIN_CHECKPOINT = "train_checkpoint"  # forwarded row key: a Train checkpoint to report as a Tune checkpoint


def _make_tune_forwarder(metric: str, earlier: dict, channel, checkpoint_every: int, run: Location):
    """A Ray Train callback (it runs in the Train controller) that puts the reports holding the metric
    (evaluations) and the final one on ``channel`` for the trial's Tune function, merged with the newest figures of
    the run (``earlier``: what a resumed run reported before): Tune then always sees the metric it ranks on, once
    per evaluation, and learns that a resumed run had already finished. Reports at multiples of
    ``checkpoint_every`` steps (0 = none) before the end carry their Train checkpoint (its URI in the run folder)
    for PBT."""
    import ray.train

    class ForwardEvaluations(ray.train.UserCallback):
        def __init__(self):
            self.latest = dict(earlier)

        def after_report(self, run_context, metrics, checkpoint):
            report = {k: v for k, v in metrics[0].items() if k != "resumed_from"}
            self.latest.update(report)
            if metric in report or report.get("done"):
                row = dict(self.latest)
                # the worker's "done" flag would end the Tune trial while Ray Train is still saving its last state
                row["finished"] = bool(row.pop("done", False))
                if checkpoint and checkpoint_every and row["step"] % checkpoint_every == 0 and not row["finished"]:
                    row[_TRAIN_CHECKPOINT] = (run / CHECKPOINTS / os.path.basename(checkpoint.path)).uri
                channel.put(row)

    return ForwardEvaluations()


def _fit_and_report(trainer, channel) -> None:
    """Fit the trainer in a thread and report the forwarded rows to Tune from this thread, the trial's, where
    ``tune.report`` can attach a checkpoint (Ray's TuneReportCallback forwards metrics only)."""
    from ray import tune
    from ray.util.queue import Empty

    failure: list[BaseException] = []

    def fit():
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread, where Tune sees it
            failure.append(exc)

    thread = threading.Thread(target=fit, name="memtrain-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not channel.empty():
        try:
            row = channel.get(timeout=1.0)
        except Empty:
            continue
        uri = row.pop(_TRAIN_CHECKPOINT, None)
        checkpoint = None
        if uri:  # Tune copies it (storage to storage) into the trial's Tune folder
            where = Location(uri)
            checkpoint = tune.Checkpoint(path=where.fs_path, filesystem=where.fs)
        tune.report(row, checkpoint=checkpoint)
    if failure:
        raise failure[0]


def _continue_from_tune_checkpoint(run: Location, sweep: Location, trial: PretrainConfig,
                                   params: dict) -> PretrainConfig:
    """Where a trial starts when Tune restarts it with a Tune checkpoint (only PBT sweeps report them). Its own
    checkpoint (PBT paused it), or one it already continues from (the sweep was restored): Ray Train resumes from
    the trial's newest checkpoint. Another trial's (PBT's exploit): the trial drops its own checkpoints and later
    metrics and continues from that checkpoint, at its step, with the mutated hyperparameters."""
    from ray import tune

    handed = tune.get_checkpoint()
    if handed is None:
        return trial
    # Tune keeps its checkpoints in the sweep's storage: the same filesystem, so the path maps to a URI
    if not handed.path.startswith(sweep.fs_path):
        raise MemtrainError(f"Tune handed over a checkpoint outside the sweep's storage: {handed.path}")
    source = Location(sweep.uri + handed.path[len(sweep.fs_path):])
    saved = (run / "config.yaml").read_yaml() if (run / "config.yaml").is_file() else {}
    own = (source / "config.yaml").read_yaml().get("output") == run.uri
    if has_checkpoints(run) and (own or saved.get("init_checkpoint") == source.uri):
        return dataclasses.replace(trial, init_checkpoint=saved.get("init_checkpoint", ""))
    step = (source / TRAINER_STATE_FILE).read_json()["step"]
    (run / CHECKPOINTS).remove()
    MetricsLog(run / METRICS_FILE).keep(lambda row: row["step"] <= step)
    print(f"[memtrain] trial {run.name} continues from {source} (step {step}) with {params}", flush=True)
    return dataclasses.replace(trial, init_checkpoint=source.uri)


# settings of the data section that change the token shards (seq_len only changes how they are cut into windows)
_SHARD_KEYS = [f.name for f in dataclasses.fields(PretrainConfig().data) if f.name != "seq_len"]


def _prepare_trial_data(trial: PretrainConfig, run: Location, shared, base: PretrainConfig):
    """Reuse the sweep's tokenizer and shards unless the trial searched a setting that changes them."""
    from orchestration.data.sources import prepare_data

    if all(getattr(trial.data, k) == getattr(base.data, k) for k in _SHARD_KEYS):
        if not (run / TOKENIZER_FILE).is_file():
            (run / TOKENIZER_FILE).write_text(shared.tokenizer_json(trial.data.cache_dir))
        return shared
    return prepare_data(trial.data, run)


def run_pretrain_trial(params: dict, *, sweep: SweepConfig, shared_data) -> None:
    """The Tune function trainable of ``kind: pretrain``: fit one TorchTrainer with the sampled params."""
    from ray import tune
    from ray.util.queue import Queue

    from orchestration.training.pretrain import _make_metrics_sink, make_trainer, resolve_init_checkpoint

    cfg = sweep
    trial_id = tune.get_context().get_trial_id()
    sweep_root = Location(cfg.output)
    run = sweep_root / TRIALS_DIR / trial_id
    trial = dataclasses.replace(trial_config(cfg.pretrain, params), output=run.uri)
    data = _prepare_trial_data(trial, run, shared_data, cfg.pretrain)
    check_enough_windows(trial, data)
    trial = _continue_from_tune_checkpoint(run, sweep_root, trial, params)
    if trial.init_checkpoint and not has_checkpoints(run):
        trial = dataclasses.replace(trial, init_checkpoint=resolve_init_checkpoint(trial, data)[0])
    (run / "config.yaml").write_text(to_yaml(trial))
    earlier = {k: v for row in read_metrics(run) for k, v in row.items() if k != "checkpoint"}
    channel = Queue(maxsize=1, actor_options={"num_cpus": 0})
    tune_checkpoint_every = _pbt_interval(cfg) if cfg.scheduler.name == "pbt" else 0
    # The same Train run as `memtrain pretrain` (a restored trial resumes from its newest checkpoint), with a
    # bounded controller_failure_limit: a worker group that cannot start fails the trial, not hangs it
    trainer = make_trainer(trial, data, run,
                           [_make_metrics_sink(run),
                            _make_tune_forwarder(cfg.metric, earlier, channel, tune_checkpoint_every, run)],
                           controller_failure_limit=cfg.trial_start_retries)
    _fit_and_report(trainer, channel)


@dataclass(frozen=True)
class TrialKind:
    """How a sweep of one kind runs: its trial function and the result key that counts its progress."""
    run: Callable
    time_attr: str
    max_t: Callable[[SweepConfig], int]
    grace: Callable[[SweepConfig], int]


TRIAL_KINDS: dict[str, TrialKind] = {
    "pretrain": TrialKind(
        run=run_pretrain_trial, time_attr="step",
        max_t=lambda c: max([c.pretrain.max_steps, *c.search.get("max_steps", {}).get("grid", []),
                             *c.search.get("max_steps", {}).get("choice", [])]),
        grace=lambda c: c.scheduler.grace_period or c.pretrain.eval_every),
}


# --- the sweep --------------------------------------------------------------------------------------------------

def _scheduler(cfg: SweepConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if cfg.scheduler.name == "fifo":
        return FIFOScheduler()
    kind = TRIAL_KINDS[cfg.kind]
    if cfg.scheduler.name == "pbt":
        # PBT explores the search space itself: lists for choice and grid, distributions for ranges
        explore = {"choice": list, "grid": list, "uniform": lambda v: tune.uniform(*v),
                   "loguniform": lambda v: tune.loguniform(*v)}
        mutations = {key: explore[dist](values) for key, spec in cfg.search.items() for dist, values in spec.items()}
        return PopulationBasedTraining(time_attr=kind.time_attr, perturbation_interval=_pbt_interval(cfg),
                                       hyperparam_mutations=mutations,
                                       quantile_fraction=cfg.scheduler.quantile_fraction,
                                       resample_probability=cfg.scheduler.resample_probability,
                                       synch=cfg.scheduler.synch)
    return ASHAScheduler(time_attr=kind.time_attr, max_t=kind.max_t(cfg), grace_period=kind.grace(cfg),
                         reduction_factor=cfg.scheduler.reduction_factor, brackets=cfg.scheduler.brackets)


def _interrupt_callback(sweep_dir: Location, after: int):
    """A Tune callback that interrupts the sweep the way Ctrl+C does (Tune saves its state and returns) once
    ``after`` trials finished, once per sweep directory (a marker file remembers it across the restore)."""
    from ray import tune

    class InterruptAfterTrials(tune.Callback):
        def __init__(self):
            self.finished = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            marker = sweep_dir / INTERRUPT_MARKER
            if self.finished >= after and not marker.exists():
                marker.write_text("")
                log.warning("drill: interrupting the sweep after %d finished trial(s)", self.finished)
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own interrupt handler (same path as Ctrl+C)

    return InterruptAfterTrials()


def _trial_resources(cfg: SweepConfig) -> dict:
    p = cfg.pretrain
    return {"CPU": cfg.driver_cpus + p.workers * p.cpus_per_worker, "GPU": p.workers * p.gpus_per_worker}


def _concurrency(cfg: SweepConfig) -> int:
    """Trials that run at once: max_concurrent_trials, or as many as the cluster's resources hold now (at least
    one). Tune only sees the drivers' reservations (Train workers reserve their own), so it must be told, or extra
    trials wait for workers until their start-up times out. A cluster with no node for a trial yet (an autoscaling
    cluster whose GPU workers are all released) is not refused: the trial's workers ask the autoscaler for one."""
    import ray

    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    total = ray.cluster_resources()
    need = _trial_resources(cfg)
    fits = min(int(total.get(k, 0) // v) for k, v in need.items() if v > 0)
    if fits < 1:
        log.warning("one trial needs %g CPUs and %g GPUs but the Ray cluster has %g and %g now: trials run one at a "
                    "time, each waiting for the autoscaler to add a node (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S "
                    "bounds the wait; pretrain.workers or pretrain.cpus_per_worker ask for less)", need["CPU"],
                    need["GPU"], total.get("CPU", 0), total.get("GPU", 0))
    return max(1, fits)


def _resolved_sweep(cfg: SweepConfig) -> dict:
    """The settings that define the experiment (a restore must match them); output and the drill may differ."""
    values = dataclasses.asdict(cfg)
    for key in ("output", "interrupt_after_trials", "max_concurrent_trials", "trust_checkpoint"):
        values.pop(key)
    values["pretrain"].pop("output")
    return values


def _check_restorable(sweep_dir: Location, cfg: SweepConfig) -> None:
    saved_path = sweep_dir / "sweep.yaml"
    if not saved_path.is_file():
        return
    saved = _resolved_sweep(from_dict(SweepConfig, saved_path.read_yaml()))
    now = _resolved_sweep(cfg)
    diffs = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"{sweep_dir} holds a sweep with different {', '.join(diffs)}, so it cannot be resumed; "
                          "use the same settings, or a new output folder")


def unfinished_experiment(output: Location, trusted: bool) -> bool:
    """True when ``output`` holds an interrupted Tune experiment (``<output>/tune``) to restore. Restoring loads
    Tune's pickles, which run whatever code they name: refused unless ``trusted`` (trust_checkpoint=true)."""
    if not (output / TUNE_DIR / "tuner.pkl").is_file():
        return False
    if not trusted:
        raise ConfigError(f"{output} holds an unfinished sweep; restoring it loads Tune's pickles, which run whatever "
                          "code they name. If you wrote this folder, resume with trust_checkpoint=true; otherwise "
                          "use a new output")
    return True


def sweep(cfg: SweepConfig) -> list[dict]:
    """Run (or resume) a sweep; returns the trials ranked best first (also written to results.csv/.md)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestration.data.sources import check_source, prepare_data
    from orchestration.runtime import ensure_ray
    from orchestration.storage import require_shared

    _check_search_keys(cfg)
    check_source(cfg.pretrain.data.source)
    sweep_dir = Location(cfg.output)
    cfg = dataclasses.replace(cfg, output=sweep_dir.uri)
    experiment = sweep_dir / TUNE_DIR
    restoring = unfinished_experiment(sweep_dir, cfg.trust_checkpoint)
    if restoring:
        _check_restorable(sweep_dir, cfg)
    ensure_ray()
    require_shared(sweep_dir, "output")  # trials on every node write their runs there
    (sweep_dir / "sweep.yaml").write_text(to_yaml(cfg))
    # tokenize once for the whole sweep: trials share the tokenizer and the published token shards
    shared = prepare_data(cfg.pretrain.data, sweep_dir)
    concurrency = _concurrency(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(TRIAL_KINDS[cfg.kind].run, sweep=cfg, shared_data=shared), {"cpu": cfg.driver_cpus})
    if restoring:
        log.info("restoring the unfinished sweep in %s", experiment)
        where = ray_storage(experiment)
        tuner = tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=where.get("storage_filesystem"))
    else:
        callbacks = [_interrupt_callback(sweep_dir, cfg.interrupt_after_trials)] if cfg.interrupt_after_trials else []
        log.info("sweep of %d trial(s), %d at a time, each reserving %s", planned_trials(cfg), concurrency,
                 _trial_resources(cfg))
        if cfg.scheduler.name == "pbt" and planned_trials(cfg) > concurrency:
            log.warning("PBT compares the trials that run at the same time, but only %d of the %d trials fit at once; "
                        "lower num_samples or the resources per trial", concurrency, planned_trials(cfg))
        tuner = tune.Tuner(
            trainable, param_space=tune_space(cfg.search),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
                                        scheduler=_scheduler(cfg),
                                        # the generator itself limits concurrency (Tune ignores
                                        # max_concurrent_trials when given a generator)
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed,
                                                                         max_concurrent=concurrency)),
            run_config=tune.RunConfig(name=TUNE_DIR, **ray_storage(sweep_dir), callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    results = tuner.fit()
    rows = rank_trials(results, cfg)
    write_results(sweep_dir, rows, cfg)
    finished = sum(r["status"] in ("completed", "stopped early") for r in rows)
    planned = planned_trials(cfg)
    errored = sum(r["status"] == "error" for r in rows)
    if finished < planned:
        print(f"[memtrain] sweep incomplete: {finished} of {planned} trials finished, {errored} errored (see the "
              f"log above); run the same command again to resume it ({sweep_dir})", flush=True)
    elif rows:
        print(f"[memtrain] sweep done: best trial {rows[0]['trial_id']} with {cfg.metric} {rows[0][cfg.metric]:.4f}; "
              f"{sweep_dir / 'results.md'}, {sweep_dir / 'best_config.yaml'}", flush=True)
    return rows


# --- results ----------------------------------------------------------------------------------------------------

def _status(result) -> str:
    metrics = result.metrics or {}
    if result.error is not None:
        return "error"
    if not metrics.get("done"):
        return "interrupted" if metrics else "pending"
    if metrics.get("finished"):
        return "completed"
    return "stopped early"  # by the scheduler


def rank_trials(results, cfg: SweepConfig) -> list[dict]:
    """One row per trial (params, final and best metric, progress, status), best first; failed trials last."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (result.config or {}).get("trial_id") or os.path.basename(result.path)
        history = result.metrics_dataframe
        best = None
        if history is not None and cfg.metric in history:
            series = history[cfg.metric].dropna()
            best = float(series.min() if cfg.mode == "min" else series.max()) if len(series) else None
        rows.append({
            "trial_id": trial_id, "status": _status(result),
            **{k: (result.config or {}).get(k) for k in cfg.search},
            cfg.metric: metrics.get(cfg.metric), f"best_{cfg.metric}": best,
            "step": metrics.get("step"), "tokens": metrics.get("tokens"), "loss": metrics.get("loss"),
            "tokens_per_s": metrics.get("tokens_per_s"),
            "wall_s": round(metrics["time_total_s"], 1) if "time_total_s" in metrics else None,
            "run_dir": (Location(cfg.output) / TRIALS_DIR / trial_id).uri,
        })
    sign = 1 if cfg.mode == "min" else -1
    rows.sort(key=lambda r: (r[cfg.metric] is None or r["status"] == "error",
                             sign * r[cfg.metric] if r[cfg.metric] is not None else 0.0))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def results_columns(cfg: SweepConfig) -> list[str]:
    return ["rank", "trial_id", "status", *cfg.search, cfg.metric, f"best_{cfg.metric}", "step", "tokens", "loss",
            "tokens_per_s", "wall_s", "run_dir"]


def write_results(sweep_dir: Location, rows: list[dict], cfg: SweepConfig) -> None:
    """results.csv, results.md (the ranking) and best_config.yaml (the best trial's pretraining config)."""
    from orchestration.report import markdown_table

    columns = results_columns(cfg)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (sweep_dir / "results.csv").write_text(buf.getvalue())
    shown = [c for c in columns if c != "run_dir"]
    md = [f"# Sweep {sweep_dir.name}: {cfg.kind}, ranked by {cfg.metric} ({cfg.mode})", "",
          markdown_table(rows, shown), ""]
    (sweep_dir / "results.md").write_text("\n".join(md))
    best = rows[0] if rows and rows[0][cfg.metric] is not None and rows[0]["status"] != "error" else None
    if best is None:
        return
    best_cfg = (Location(best["run_dir"]) / "config.yaml").read_yaml()
    best_cfg["output"] = (sweep_dir / "best").uri  # a fresh run folder: e.g. train the winner longer
    header = (f"# best trial {best['trial_id']} of {sweep_dir}: {cfg.metric} {best[cfg.metric]:.6g}\n"
              f"# memtrain pretrain --config {sweep_dir / 'best_config.yaml'} max_steps=...\n")
    (sweep_dir / "best_config.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
