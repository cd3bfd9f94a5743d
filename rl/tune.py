"""``memtrain rl tune``: a Ray Tune sweep over PPO runs, every trial a full ``memtrain rl train`` run on the env.

The search space is written as for ``memtrain sweep``: a dotted key of the base run's config (``ppo.lr``,
``ppo.train_batch_size``, ``env_config.compute_penalty``, ``seed``, ...) mapped to ``{grid: [...]}``,
``{choice: [...]}``, ``{uniform: [lo, hi]}`` or ``{loguniform: [lo, hi]}``, in a YAML file's ``search:`` section or
as overrides. Every corner of the space is checked as a run config (env_config keys, PPO settings) before Ray
starts. Example::

    memtrain rl tune thermo --base configs/rl/thermo.yaml --iterations 5 "search.ppo.lr.grid=[1e-4,3e-4,1e-3]" \\
        "search.ppo.entropy_coeff.grid=[0.0,0.01]"

The output folder (a local path, a folder every node mounts, or a URI) holds Tune's experiment (``tune/``, one
trial folder with RLlib checkpoints each), ``sweep.yaml`` (the resolved sweep), ``results.csv`` and ``results.md``
(trials ranked by mean episode return) and ``best.yaml`` (the winning trial's run config:
``memtrain rl train ENV --config <output>/best.yaml``). Re-running the same command with trust_checkpoint=true
restores an interrupted sweep.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from orchestration.config import _valid_keys, to_yaml
from orchestration.errors import ConfigError, MemtrainError
from orchestration.report import markdown_table
from orchestration.storage import Location, ray_storage, require_shared
from orchestration.sweep import (TUNE_DIR, corner_params, flat_search, planned_trials, trial_config, tune_space,
                                 unfinished_experiment)
from rl.train import RLTrainConfig, build_ppo_config

log = logging.getLogger(__name__)

METRIC = "env_runners/episode_return_mean"
# run settings a trial does not take from the search space: Tune stops it after `iterations`, keeps its checkpoints
# in its own folder and reserves the base run's resources for it; the env is the sweep's
NOT_SEARCHED = ("env", "output", "iterations", "checkpoint_every", "keep_checkpoints", "trust_checkpoint",
                "num_env_runners", "num_learners", "num_gpus_per_learner")


@dataclass
class PPOTuneConfig:
    base: RLTrainConfig = field(default_factory=RLTrainConfig)
    """The PPO run every trial starts from (env, env_config, PPO settings); the search space replaces some of its
    fields. ``memtrain rl tune --base FILE`` reads it from a ``memtrain rl train`` config such as
    configs/rl/thermo.yaml."""
    output: str = "runs/rl-tune"
    """Sweep folder: a local path, a folder every node mounts, or a URI."""
    iterations: int = 5
    """PPO iterations per trial."""
    search: dict[str, Any] = field(default_factory=dict)
    """Search space: a dotted key of the base config mapped to one of {grid: [values]}, {choice: [values]},
    {uniform: [low, high]}, {loguniform: [low, high]} (the syntax of ``memtrain sweep``; as an override,
    search.ppo.lr.grid=[1e-4,1e-3])."""
    num_samples: int = 1
    """Samples of the search space; every grid combination is run num_samples times."""
    seed: int = 0
    """Seed of the search-space sampling (each trial's PPO seed is base.seed unless searched)."""
    max_concurrent_trials: int = 2
    """Trials at once (each takes 1 CPU plus one per remote env runner)."""
    trust_checkpoint: bool = False
    """Restore an interrupted sweep from the output folder's Tune state, which holds pickles (they run whatever code
    they name): only for sweep folders you wrote."""

    def __post_init__(self):
        if self.iterations < 1 or self.max_concurrent_trials < 1 or self.num_samples < 1:
            raise ConfigError("iterations, num_samples and max_concurrent_trials must be >= 1")
        if not self.search:
            raise ConfigError("the search space is empty; add e.g. search.ppo.lr.grid=[1e-4,1e-3] (or a search: "
                              "section in the --config file)")
        self.search = flat_search(self.search)
        valid = [k for k in _valid_keys(RLTrainConfig) if k not in NOT_SEARCHED]
        for key in self.search:
            if key in NOT_SEARCHED:
                raise ConfigError(f"search key {key!r} cannot be searched: every trial runs the sweep's env for "
                                  "`iterations` in its own folder with the base run's resources; set it in base")
            if key not in valid and not key.startswith("env_config."):
                raise ConfigError(f"search key {key!r} is not a field of the PPO run config; valid keys: "
                                  f"{', '.join(valid)} (env_config.<env field> too)")
        for params in corner_params(self.search):
            try:
                trial_config(self.base, params)
            except MemtrainError as exc:
                raise ConfigError(f"the search space makes an invalid trial config at {params}: {exc}") from None


class PPOTrial(tune.Trainable):
    """One trial: the PPO run of the base config with the trial's searched values (Tune's ``config``, dotted keys)
    put in; Tune checkpoints and restores it through RLlib's own checkpoints."""

    def setup(self, config: dict, base: RLTrainConfig | None = None) -> None:
        self.algo = build_ppo_config(trial_config(base, config)).build_algo()

    def step(self) -> dict:
        return self.algo.train()

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.algo.save(checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.algo.restore(checkpoint_dir)

    def cleanup(self) -> None:
        self.algo.stop()


def tune_ppo(cfg: PPOTuneConfig) -> list[dict]:
    """Run (or restore) the sweep; returns the trials ranked best first (also in results.csv/.md)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestration.runtime import ensure_ray

    out = Location(cfg.output)
    experiment = out / TUNE_DIR
    restoring = unfinished_experiment(out, cfg.trust_checkpoint)
    ensure_ray()
    require_shared(out, "output")  # trials on every node write their checkpoints there
    (out / "sweep.yaml").write_text(to_yaml(cfg))
    ppo = build_ppo_config(cfg.base)
    trainable = tune.with_resources(tune.with_parameters(PPOTrial, base=cfg.base),
                                    ppo.algo_class.default_resource_request(ppo))
    if restoring:
        log.info("restoring the interrupted sweep in %s", experiment)
        where = ray_storage(experiment)
        tuner = tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_errored=True,
                                   storage_filesystem=where.get("storage_filesystem"))
    else:
        log.info("PPO sweep of %d trial(s) on %s, %d at a time", planned_trials(cfg), cfg.base.env,
                 cfg.max_concurrent_trials)
        tuner = tune.Tuner(
            trainable, param_space=tune_space(cfg.search),
            # the sweep's generator, so a search space expands to the same trials as in `memtrain sweep` (Tune
            # ignores max_concurrent_trials when given a generator: the generator limits concurrency)
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=cfg.num_samples,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed,
                                                                         max_concurrent=cfg.max_concurrent_trials)),
            run_config=tune.RunConfig(name="tune", **ray_storage(out), stop={"training_iteration": cfg.iterations},
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True)))
    rows = []
    for result in tuner.fit():
        config, metrics = result.config or {}, result.metrics or {}
        rows.append({"trial": os.path.basename(result.path), **{key: config.get(key) for key in cfg.search},
                     "return_mean": metrics.get("env_runners", {}).get("episode_return_mean"),
                     "iterations": metrics.get("training_iteration"),
                     "error": type(result.error).__name__ if result.error else None})
    rows.sort(key=lambda r: -(r["return_mean"] if r["return_mean"] is not None else float("-inf")))
    _write_results(out, rows, cfg)
    return rows


def _write_results(out: Location, rows: list[dict], cfg: PPOTuneConfig) -> None:
    columns = ["trial", *cfg.search, "return_mean", "iterations", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buf.getvalue())
    (out / "results.md").write_text(f"# PPO sweep on {cfg.base.env}\n\n{markdown_table(rows, columns)}\n")
    if rows and rows[0]["return_mean"] is not None:
        best = trial_config(cfg.base, {key: rows[0][key] for key in cfg.search})
        (out / "best.yaml").write_text(f"# the best trial ({rows[0]['trial']}) of {out}; train it with\n"
                                       f"# memtrain rl train {cfg.base.env} --config {out / 'best.yaml'}\n"
                                       + to_yaml(best))
