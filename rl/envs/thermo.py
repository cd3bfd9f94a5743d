"""ThermoControllerEnv: the TG-SMN thermodynamic controller's environment, around the continual-learning runner.

One env step trains ``control_interval`` steps of the runner with the knobs the action sets; the observation is
the training signals of that interval (``orchestration.continual.control.Signals``, squashed with a symmetric
log so losses, norms and efficiency ratios share one scale); an episode is one task stream.

Rewards (``reward``):

- ``retention``: minus the change of the mean held-out loss over the tasks seen so far (measured on the same
  tasks before and after the interval, so a new task starting is not a penalty), minus ``compute_penalty`` x
  k / k_max;
- ``tiur``: the original TG-SMN code's TIUR efficiency per unit compute, eta / (k (1 + replay ratio)).

Example::

    >>> env = ThermoControllerEnv({"continual": {"stream": {"n_tasks": 2}}})      # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)                                             # doctest: +SKIP
    >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from orchestration.continual.control import OBSERVATION_FIELDS, Knobs, Signals
from orchestration.continual.runner import ContinualConfig, ContinualDataConfig, ContinualRunner
from orchestration.continual.tasks import StreamConfig
from rl.envs import env_settings
from rl.errors import RLError


def laptop_stream() -> ContinualConfig:
    """The continual run the env steers by default, small enough for RL on a laptop: 3 built-in permuted tasks of
    30 steps of a 2-layer tgsmn-sparse-tiny, 3 env steps per task."""
    return ContinualConfig(model="tgsmn-sparse-tiny", model_overrides={"n_layers": 2},
                           data=ContinualDataConfig(source="builtin", tokenizer="bytes", seq_len=32, max_documents=600),
                           stream=StreamConfig(n_tasks=3), max_steps_per_task=30, control_interval=10, batch_size=8,
                           eval_windows=16, replay_capacity=512, threads=1)


@dataclass
class ThermoEnvConfig:
    """The env's settings (``env_config`` keys); unknown keys are refused."""

    continual: ContinualConfig = field(default_factory=laptop_stream)
    """The continual-learning run the controller steers (default ``laptop_stream()``; set any of its fields, e.g.
    env_config.continual.stream.n_tasks=2). Its stream.task_seed is replaced by task_seeds, episode by episode."""
    reward: str = "retention"
    """retention (held-out loss change minus compute) or tiur (efficiency per unit compute, from the original TG-SMN
    code)."""
    compute_penalty: float = 0.05
    """Retention reward: weight of the compute cost k / k_max per interval."""
    replay_max: float = 0.5
    """Action range of the replay ratio: [0, replay_max]."""
    noise_max: float = 0.5
    """Action range of the router noise: [0, noise_max]."""
    temperature_min: float = 0.7
    """Action range of the router temperature: [temperature_min, temperature_max]."""
    temperature_max: float = 1.3
    """Upper end of the router temperature range."""
    seed: int = 0
    """Seed of the first episode's model (later episodes get the seeds reset() passes, or continue counting)."""
    task_seeds: list[int] = field(default_factory=lambda: [0])
    """``stream.task_seed`` of the episodes' task streams (new permutations, document splits, domain orders), used
    in turn: episode i runs on stream task_seeds[i mod n]. Train on some and evaluate on others to measure a
    controller on streams it never saw."""

    def __post_init__(self):
        if self.reward not in ("retention", "tiur"):
            raise RLError(f"reward must be retention or tiur, got {self.reward!r}")
        if not self.task_seeds:
            raise RLError("task_seeds must name at least one task stream")
        if not 0 < self.replay_max < 1 or self.noise_max < 0 or not 0 < self.temperature_min <= self.temperature_max:
            raise RLError("need 0 < replay_max < 1, noise_max >= 0 and 0 < temperature_min <= temperature_max")


def observation(signals: Signals) -> np.ndarray:
    """Signals as the policy sees them: symlog-squashed and clipped to the observation box."""
    x = signals.as_array().astype(np.float64)
    return np.clip(np.sign(x) * np.log1p(np.abs(x)), -20.0, 20.0).astype(np.float32)


def action_space(k_max: int) -> gym.spaces.Dict:
    return gym.spaces.Dict({"k": gym.spaces.Discrete(k_max),
                            "knobs": gym.spaces.Box(0.0, 1.0, shape=(3,), dtype=np.float32)})


def knobs_from_action(action: dict, cfg: ThermoEnvConfig) -> Knobs:
    """Map an action (k index; replay, noise, temperature in [0, 1]) to the runner's knobs."""
    u = np.clip(np.asarray(action["knobs"], dtype=np.float64), 0.0, 1.0)
    return Knobs(k=int(action["k"]) + 1, replay_ratio=min(float(u[0]) * cfg.replay_max, 0.999),
                 router_noise=float(u[1]) * cfg.noise_max,
                 router_temperature=cfg.temperature_min + float(u[2]) * (cfg.temperature_max - cfg.temperature_min))


def action_from_knobs(knobs: Knobs, cfg: ThermoEnvConfig) -> dict:
    """The inverse of ``knobs_from_action`` (fixed baselines act through the same space)."""
    span = cfg.temperature_max - cfg.temperature_min
    return {"k": knobs.k - 1, "knobs": np.array([knobs.replay_ratio / cfg.replay_max, knobs.router_noise / cfg.noise_max,
                                                 (knobs.router_temperature - cfg.temperature_min) / span if span else 0.0],
                                                dtype=np.float32).clip(0.0, 1.0)}


class ThermoControllerEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, env_config: dict | None = None):
        self.cfg = env_settings("thermo", env_config)
        # one runner per task stream, each built (or read from the cache) once, on the first episode that needs it
        self._runners: dict[int, ContinualRunner] = {}
        self._episode = 0
        self.runner = self._runner(self.cfg.task_seeds[0])
        self.k_max = _k_max(self.cfg.continual)
        self.observation_space = gym.spaces.Box(-20.0, 20.0, shape=(len(OBSERVATION_FIELDS),), dtype=np.float32)
        self.action_space = action_space(self.k_max)
        self._episode_seed = self.cfg.seed

    def _runner(self, task_seed: int) -> ContinualRunner:
        if task_seed not in self._runners:
            continual = self.cfg.continual
            stream = dataclasses.replace(continual.stream, task_seed=int(task_seed))
            self._runners[task_seed] = ContinualRunner(dataclasses.replace(continual, stream=stream))
        return self._runners[task_seed]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._episode_seed = seed
        self.runner = self._runner(self.cfg.task_seeds[self._episode % len(self.cfg.task_seeds)])
        self._episode += 1
        signals = self.runner.reset(self._episode_seed)
        self._episode_seed += 1
        self._seen = (1, self.runner.evaluate_tasks("validation", [0])[0])  # (tasks seen, their mean loss)
        return observation(signals), {"task": 0}

    def _seen_loss(self, n_tasks: int) -> float:
        return float(np.mean(self.runner.evaluate_tasks("validation", list(range(n_tasks)))))

    def step(self, action):
        knobs = knobs_from_action(action, self.cfg)
        n_seen = min(self.runner.state.task + 1, len(self.runner.tasks))
        before = self._seen[1] if self._seen[0] == n_seen else self._seen_loss(n_seen)
        result = self.runner.run_interval(knobs)
        compute = knobs.k / self.k_max
        if self.cfg.reward == "retention":
            after = self._seen_loss(n_seen)
            parts = {"retention": before - after, "compute": -self.cfg.compute_penalty * compute}
            next_seen = min(self.runner.state.task + 1, len(self.runner.tasks))
            self._seen = (n_seen, after) if next_seen == n_seen else (next_seen, self._seen_loss(next_seen))
        else:
            parts = {"tiur": result.signals.tiur_efficiency / (knobs.k * (1.0 + knobs.replay_ratio))}
        info = {"reward_parts": parts, "task": result.signals.task, "finished_task": result.finished_task,
                "k": knobs.k, "replay_ratio": knobs.replay_ratio, "flops": result.flops}
        return observation(result.signals), float(sum(parts.values())), result.done, False, info


class FixedKnobsPolicy:
    """A baseline that always sets the same knobs (through the env's action space)."""

    def __init__(self, knobs: Knobs, cfg: ThermoEnvConfig):
        self.knobs = knobs
        self.action = action_from_knobs(knobs, cfg)

    def reset(self) -> None:
        pass

    def act(self, observation) -> dict:
        return self.action


def _k_max(continual: ContinualConfig) -> int:
    from models.registry import model_config

    return int(getattr(model_config(continual.model, **continual.model_overrides), "max_k", 1))


def baseline_policies(env_config: dict) -> dict[str, FixedKnobsPolicy]:
    """A grid of fixed knob settings, the original TG-SMN code's default first ("source-default": ``Knobs()``, k at
    most the model's), then k x replay with the default noise and temperature."""
    cfg = env_settings("thermo", env_config)
    k_max = _k_max(cfg.continual)
    default = Knobs()
    grid = {"source-default": dataclasses.replace(default, k=min(default.k, k_max))}
    for k in range(1, k_max + 1):
        for replay in (0.0, 0.3):
            grid[f"k{k}-replay{replay:.1f}"] = dataclasses.replace(default, k=k, replay_ratio=replay)
    return {name: FixedKnobsPolicy(knobs, cfg) for name, knobs in grid.items()}


def knob_grid(env_config: dict, replay: tuple[float, ...] = (0.0, 0.25, 0.5), noise: tuple[float, ...] = (0.0, 0.3),
              temperature: tuple[float, ...] = (0.7, 1.0, 1.3)) -> dict[str, FixedKnobsPolicy]:
    """Every fixed setting of a grid over k (1..k_max), replay ratio, router noise and temperature, named like
    "k1-r0.25-n0.3-t1.0": the search space of the best fixed controller a learned one must beat.

    Example::

        >>> grid = knob_grid({}, replay=(0.0, 0.5), noise=(0.3,), temperature=(1.0,))
        >>> sorted(grid)
        ['k1-r0-n0.3-t1', 'k1-r0.5-n0.3-t1', 'k2-r0-n0.3-t1', 'k2-r0.5-n0.3-t1']
    """
    cfg = env_settings("thermo", env_config)
    grid = {}
    for k, r, n, t in itertools.product(range(1, _k_max(cfg.continual) + 1), replay, noise, temperature):
        knobs = Knobs(k, min(r, 0.999), n, t)
        grid[f"k{k}-r{r:g}-n{n:g}-t{t:g}"] = FixedKnobsPolicy(knobs, cfg)
    return grid


class LearnedThermoController:
    """A trained thermo policy as a continual-learning ``Controller`` (same interface as the fixed ones)."""

    def __init__(self, policy, cfg: ThermoEnvConfig):
        self.policy, self.cfg = policy, cfg

    def act(self, signals: Signals) -> Knobs:
        return knobs_from_action(self.policy.act(observation(signals)), self.cfg)

    def state_dict(self) -> dict[str, Any]:
        return {"recurrent_state": self.policy.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.set_state(state["recurrent_state"])


def learned_controller_resolver(spec: str) -> LearnedThermoController | None:
    """``--controller PATH`` of a ``memtrain rl train thermo`` run (or its policy/ directory); else None."""
    from orchestration.storage import Location
    from rl.policy import POLICY_SPEC, LearnedPolicy

    path = Location(spec)
    policy_dir = path / "policy" if (path / "policy" / POLICY_SPEC).is_file() else path
    if not (policy_dir / POLICY_SPEC).is_file():
        return None
    policy = LearnedPolicy.load(policy_dir)
    if policy.env_name != "thermo":
        raise RLError(f"{policy_dir} holds a policy for env {policy.env_name!r}; the continual runner needs a thermo one")
    run_config = policy_dir.parent / "config.yaml"
    env_config = (run_config.read_yaml() or {}).get("env_config", {}) if run_config.is_file() else {}
    return LearnedThermoController(policy, env_settings("thermo", env_config))
