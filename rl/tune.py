"""``memtrain rl tune``: PPO hyperparameters (learning rate, entropy coefficient, train batch size) swept with
Ray Tune over RLlib's PPO algorithm class, every trial a full PPO run on the env.

Example::

    memtrain rl tune thermo --iterations 5 lr=[1e-4,3e-4,1e-3] entropy_coeff=[0.0,0.01]

The output folder (a local path, a folder every node mounts, or a URI) holds Tune's experiment (``tune/``, one
trial folder with RLlib checkpoints each),
``results.csv`` and ``results.md`` (trials ranked by mean episode return) and ``best.yaml`` (the winning
hyperparameters as ``memtrain rl train`` overrides). Re-running the same command restores an interrupted sweep.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field

import yaml

from orchestration.config import to_yaml
from orchestration.errors import ConfigError
from orchestration.report import markdown_table
from orchestration.storage import Location, ray_storage, require_shared
from rl.train import RLTrainConfig, build_ppo_config

log = logging.getLogger(__name__)

METRIC = "env_runners/episode_return_mean"


@dataclass
class PPOTuneConfig:
    base: RLTrainConfig = field(default_factory=RLTrainConfig)
    """The PPO run every trial starts from (env, env_config, model, other PPO settings)."""
    output: str = "runs/rl-tune"
    """Sweep folder: a local path, a folder every node mounts, or a URI."""
    iterations: int = 5
    """PPO iterations per trial."""
    lr: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    """Learning rates to try (grid)."""
    entropy_coeff: list[float] = field(default_factory=lambda: [0.0, 0.01])
    """Entropy coefficients to try (grid)."""
    train_batch_size: list[int] = field(default_factory=list)
    """Train batch sizes to try (grid; empty = base.ppo.train_batch_size only)."""
    max_concurrent_trials: int = 2
    """Trials at once (each takes 1 CPU plus one per remote env runner)."""
    trust_checkpoint: bool = False
    """Restore an interrupted sweep from the output folder's Tune state, which holds pickles (they run whatever code
    they name): only for sweep folders you wrote."""

    def __post_init__(self):
        if self.iterations < 1 or self.max_concurrent_trials < 1:
            raise ConfigError("iterations and max_concurrent_trials must be >= 1")
        if not self.lr or not self.entropy_coeff:
            raise ConfigError("lr and entropy_coeff need at least one value each")
        if self.train_batch_size and min(self.train_batch_size) < self.base.ppo.minibatch_size:
            raise ConfigError(f"every train_batch_size must be >= base.ppo.minibatch_size "
                              f"({self.base.ppo.minibatch_size})")


def tune_ppo(cfg: PPOTuneConfig) -> list[dict]:
    """Run (or restore) the sweep; returns the trials ranked best first (also in results.csv/.md)."""
    from ray import tune

    from orchestration.ray_utils import ensure_ray

    out = Location(cfg.output)
    ensure_ray()
    require_shared(out, "output")  # trials on every node write their checkpoints there
    (out / "sweep.yaml").write_text(to_yaml(cfg))
    ppo = build_ppo_config(cfg.base).training(
        lr=tune.grid_search(cfg.lr), entropy_coeff=tune.grid_search(cfg.entropy_coeff),
        train_batch_size_per_learner=tune.grid_search(cfg.train_batch_size or [cfg.base.ppo.train_batch_size]))
    experiment = out / "tune"
    if (experiment / "tuner.pkl").is_file():
        if not cfg.trust_checkpoint:
            raise ConfigError(f"{out} holds an interrupted sweep; restoring it loads Tune's pickles, which run whatever "
                              "code they name. If you wrote this folder, resume with trust_checkpoint=true; otherwise "
                              "use a new --output")
        log.info("restoring the interrupted sweep in %s", experiment)
        where = ray_storage(experiment)
        tuner = tune.Tuner.restore(where["storage_path"], trainable=ppo.algo_class, resume_errored=True,
                                   storage_filesystem=where.get("storage_filesystem"))
    else:
        tuner = tune.Tuner(
            ppo.algo_class, param_space=ppo,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(name="tune", **ray_storage(out), stop={"training_iteration": cfg.iterations},
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True)))
    grid = tuner.fit()
    rows = []
    for result in grid:
        config = result.config or {}
        rows.append({"trial": os.path.basename(result.path), "lr": config.get("lr"),
                     "entropy_coeff": config.get("entropy_coeff"),
                     "train_batch_size": config.get("train_batch_size_per_learner"),
                     "return_mean": (result.metrics or {}).get("env_runners", {}).get("episode_return_mean"),
                     "iterations": (result.metrics or {}).get("training_iteration"),
                     "error": type(result.error).__name__ if result.error else None})
    rows.sort(key=lambda r: -(r["return_mean"] if r["return_mean"] is not None else float("-inf")))
    columns = ["trial", "lr", "entropy_coeff", "train_batch_size", "return_mean", "iterations", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buf.getvalue())
    (out / "results.md").write_text(f"# PPO sweep on {cfg.base.env}\n\n{markdown_table(rows, columns)}\n")
    best = rows[0]
    (out / "best.yaml").write_text(yaml.safe_dump({"ppo": {"lr": best["lr"], "entropy_coeff": best["entropy_coeff"],
                                                           "train_batch_size": best["train_batch_size"]}}))
    return rows
