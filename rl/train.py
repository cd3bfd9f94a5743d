"""``memtrain rl train``: PPO on RLlib's new API stack against a memtrain env, with checkpoints, resume and metrics.

Example::

    memtrain rl train thermo --iterations 20 --output runs/rl-thermo ppo.lr=3e-4 env_config.continual.stream.n_tasks=3

The run folder (a local path, a folder every node mounts, or a URI) holds ``config.yaml``, ``metrics.jsonl`` (one
row per iteration: episode return, reward parts, action statistics, losses, env steps/s), ``summary.json``,
``checkpoints/iter_NNNN`` (RLlib's own format, for resuming) and ``policy/`` (the latest policy exported as
safetensors + JSON, what ``LearnedPolicy.load`` reads). Re-running into the same output resumes from the newest
checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from orchestration.config import to_yaml
from orchestration.errors import ConfigError
from orchestration.storage import (CHECKPOINTS, METRICS_FILE, Location, MetricsLog, TensorBoardLog, copy_folder,
                                   latest_checkpoint, local_copy, newest_intact_checkpoint, prune_checkpoints, staged)
from rl.envs import make_env
from rl.errors import RLError
from rl.policy import export_policy

CHECKPOINT_PREFIX = "iter_"  # checkpoints/iter_0004: the PPO iteration

log = logging.getLogger(__name__)


@dataclass
class PPOSettings:
    lr: float = 3e-4
    """Learning rate of policy and value networks."""
    gamma: float = 0.99
    """Discount factor."""
    lambda_: float = 0.95
    """GAE lambda."""
    clip_param: float = 0.2
    """PPO ratio clip."""
    entropy_coeff: float = 0.01
    """Entropy bonus weight."""
    vf_loss_coeff: float = 0.5
    """Value-loss weight."""
    train_batch_size: int = 400
    """Env steps collected per iteration."""
    minibatch_size: int = 100
    """SGD minibatch size."""
    num_epochs: int = 4
    """SGD passes over each iteration's batch."""
    fcnet_hiddens: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the MLP encoder."""
    use_lstm: bool = False
    """Recurrent policy: an LSTM after the MLP (the thermodynamic controller uses it)."""
    lstm_cell_size: int = 64
    """LSTM width."""
    max_seq_len: int = 16
    """BPTT length of the LSTM."""

    def __post_init__(self):
        for name in ("lr", "clip_param"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ppo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lambda_"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("entropy_coeff", "vf_loss_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("train_batch_size", "minibatch_size", "num_epochs", "lstm_cell_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.minibatch_size > self.train_batch_size:
            raise ConfigError(f"ppo.minibatch_size ({self.minibatch_size}) must not exceed ppo.train_batch_size "
                              f"({self.train_batch_size})")
        if not self.fcnet_hiddens or min(self.fcnet_hiddens) < 1:
            raise ConfigError(f"ppo.fcnet_hiddens must be a non-empty list of sizes >= 1, got {self.fcnet_hiddens}")


@dataclass
class RLTrainConfig:
    env: str = "thermo"
    """meta (HMST meta-controller), thermo (TG-SMN thermodynamic controller), or a gymnasium id."""
    env_config: dict[str, Any] = field(default_factory=dict)
    """The env's settings, fields of its config class (rl.envs.meta.MetaEnvConfig, rl.envs.thermo.ThermoEnvConfig;
    sections as nested keys, e.g. env_config.continual.stream.n_tasks=2), checked against it when the config is
    loaded. Only the keys set here: the env's defaults fill in the rest. A gymnasium id takes none; the env's seed
    is ``seed``."""
    output: str = "runs/rl"
    """Run folder: a local path, a folder every node mounts, or a URI."""
    iterations: int = 20
    """PPO iterations (training_iteration) to reach; a resumed run continues up to this number."""
    num_env_runners: int = 0
    """Remote env runners (0 samples in the driver process; each runner takes one CPU)."""
    num_learners: int = 0
    """Remote learner workers (0 updates the policy in the driver process)."""
    num_gpus_per_learner: float = 0.0
    """GPUs per learner (with num_learners 0: for the local learner); on the cluster YAMLs' GPU workers, 1."""
    checkpoint_every: int = 5
    """Checkpoint and export the policy every N iterations (and at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints to keep."""
    seed: int = 0
    """Seed of RLlib and the env."""
    ppo: PPOSettings = field(default_factory=PPOSettings)
    """PPO hyperparameters."""
    trust_checkpoint: bool = False
    """Resume from the run folder's RLlib checkpoints. They hold pickles, and loading a pickle runs whatever code it
    names: set this only for run folders you (or the pipeline) wrote, never for one you were handed."""

    def __post_init__(self):
        for name in ("iterations", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_env_runners", "num_learners", "num_gpus_per_learner"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if "seed" in self.env_config:
            raise ConfigError(f"env_config.seed: the env's seed is the run's; set seed={self.env_config['seed']} "
                              "instead")
        self.env_settings()  # unknown env, unknown env_config keys and bad values: refused now, before Ray starts

    def env_settings(self):
        """``env_config`` as the env's typed config (None for a gymnasium id)."""
        from rl.envs import env_settings

        return env_settings(self.env, self.env_config)

    def rllib_env_config(self) -> dict:
        """The dict RLlib hands to the env: every setting of the env's config, and the run's seed."""
        from rl.envs import env_config_dict

        settings = self.env_settings()
        return {} if settings is None else {**env_config_dict(settings), "seed": self.seed}


def build_ppo_config(cfg: RLTrainConfig):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from rl.callbacks import EpisodeMetrics
    from rl.envs import rllib_env_name

    p = cfg.ppo
    return (PPOConfig()
            .environment(rllib_env_name(cfg.env), env_config=cfg.rllib_env_config())
            .env_runners(num_env_runners=cfg.num_env_runners)
            .learners(num_learners=cfg.num_learners, num_gpus_per_learner=cfg.num_gpus_per_learner)
            .training(lr=p.lr, gamma=p.gamma, lambda_=p.lambda_, clip_param=p.clip_param,
                      entropy_coeff=p.entropy_coeff, vf_loss_coeff=p.vf_loss_coeff,
                      train_batch_size_per_learner=p.train_batch_size, minibatch_size=p.minibatch_size,
                      num_epochs=p.num_epochs)
            .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(p.fcnet_hiddens), use_lstm=p.use_lstm,
                                                       lstm_cell_size=p.lstm_cell_size, max_seq_len=p.max_seq_len))
            .callbacks(EpisodeMetrics)
            .debugging(seed=cfg.seed))


def _row(result: dict, wall_s: float) -> dict:
    runners, learner = result.get("env_runners", {}), result.get("learners", {}).get("default_policy", {})
    row = {"iteration": result["training_iteration"],
           "episode_return_mean": runners.get("episode_return_mean"),
           "episode_len_mean": runners.get("episode_len_mean"),
           "env_steps": result.get("num_env_steps_sampled_lifetime"),
           "iteration_s": round(wall_s, 3)}
    row["env_steps_per_s"] = runners.get("num_env_steps_sampled", 0) / wall_s if wall_s else None
    for key in ("total_loss", "policy_loss", "vf_loss", "entropy", "mean_kl_loss"):
        if key in learner:
            row[key] = float(learner[key])
    for key, value in runners.items():  # logged by rl.callbacks.EpisodeMetrics
        if key.startswith(("reward_part/", "action_mean/")):
            row[key] = float(value)
    return {k: v for k, v in row.items() if v is not None}


def train_ppo(cfg: RLTrainConfig) -> dict:
    """Train (or resume) a PPO policy; returns the summary also written to summary.json."""
    from orchestration.runtime import ensure_ray

    run = Location(cfg.output)
    latest = newest_intact_checkpoint(run, CHECKPOINT_PREFIX)
    if latest:
        _check_resumable(run, cfg, latest)
    # the env built once here (the thermo env builds its task stream): a corpus it cannot read is refused before
    # Ray starts and before the run folder exists; RLlib builds its own copies later
    make_env(cfg.env, cfg.rllib_env_config()).close()
    (run / "config.yaml").write_text(to_yaml(cfg))
    ensure_ray()
    algo = build_ppo_config(cfg).build_algo()
    metrics = MetricsLog(run / METRICS_FILE)
    if latest:  # our own checkpoint (RLlib's format holds pickles: only restore run folders you wrote)
        with local_copy(latest.location) as path:
            algo.restore(str(path))
        metrics.keep(lambda row: row["iteration"] <= algo.iteration)  # iterations after it are trained again
        log.info("resumed PPO from %s (iteration %d)", latest.location, algo.iteration)
    else:
        (run / METRICS_FILE).remove()
    started = time.time()
    tensorboard = TensorBoardLog(run / "tensorboard")
    try:
        while algo.iteration < cfg.iterations:
            t0 = time.perf_counter()
            result = algo.train()
            row = _row(result, time.perf_counter() - t0)
            metrics.append(row)
            tensorboard.scalars({k: v for k, v in row.items() if k != "iteration"}, row["iteration"], "rl")
            print(f"[memtrain rl] iter {row['iteration']} | return {row.get('episode_return_mean', float('nan')):.3f}"
                  f" | {row.get('env_steps_per_s', 0):.1f} env steps/s | {row['iteration_s']:.1f} s", flush=True)
            if algo.iteration % cfg.checkpoint_every == 0 or algo.iteration >= cfg.iterations:
                _checkpoint(algo, cfg, run)
                tensorboard.flush(upload=True)
    finally:
        tensorboard.close()
        algo.stop()
    latest = latest_checkpoint(run, CHECKPOINT_PREFIX)
    summary = {"env": cfg.env, "iterations": algo.iteration, "policy": (run / "policy").uri,
               "checkpoint": latest.location.uri if latest else None, "wall_s": round(time.time() - started, 1)}
    returns = [r["episode_return_mean"] for r in metrics.rows() if "episode_return_mean" in r]
    summary.update(first_return=returns[0] if returns else None, final_return=returns[-1] if returns else None)
    (run / "summary.json").write_json(summary)
    return summary


# settings a resumed run may change; the rest must match the run it continues
RESUMABLE_CHANGES = ("output", "iterations", "checkpoint_every", "keep_checkpoints", "num_env_runners", "num_learners",
                     "num_gpus_per_learner", "trust_checkpoint")


def _check_resumable(run: Location, cfg: RLTrainConfig, latest) -> None:
    """Before anything is loaded: the folder's run must have this config (but for RESUMABLE_CHANGES), and its
    pickled checkpoints must be trusted explicitly."""
    from orchestration.training.checkpoint import config_differences

    saved = run / "config.yaml"
    if saved.is_file():
        current = dataclasses.asdict(cfg)
        diffs = config_differences(_resolved_env(saved.read_yaml() or {}), _resolved_env(current),
                                   [k for k in current if k not in RESUMABLE_CHANGES])
        if diffs:
            raise RLError(f"{run} holds a PPO run with other settings, so it cannot be resumed: {'; '.join(diffs)}. "
                          "Use the same settings, or a new --output")
    if not cfg.trust_checkpoint:
        raise RLError(f"{run} holds RLlib checkpoints ({latest.location.name}); resuming loads their pickles, which "
                      "run whatever code they name. If you wrote this run folder, resume with --trust-checkpoint "
                      "(trust_checkpoint=true); otherwise use a new --output")


def _resolved_env(values: dict) -> dict:
    """A run config dict with its env_config as the env sees it (every setting, defaults filled in), so a setting
    spelled out at its default is no difference; an env_config the env no longer accepts is left as it is."""
    from rl.envs import env_config_dict, env_settings

    try:
        settings = env_settings(values.get("env", ""), values.get("env_config") or {})
    except RLError:
        return values
    return values if settings is None else {**values, "env_config": env_config_dict(settings)}


def _checkpoint(algo, cfg: RLTrainConfig, run: Location) -> None:
    """RLlib's checkpoint (complete or absent, see copy_folder), the exported policy, and pruning."""
    with tempfile.TemporaryDirectory(prefix="memtrain-rl-") as tmp:
        algo.save(tmp)
        copy_folder(tmp, run / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{algo.iteration:04d}")
    with staged(run / "policy") as folder:
        export_policy(algo, cfg.env, folder)
    prune_checkpoints(run, CHECKPOINT_PREFIX, cfg.keep_checkpoints)
