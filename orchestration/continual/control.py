"""The controller protocol of the continual-learning runner: observations (``Signals``) in, ``Knobs`` out.

The runner calls its controller every ``control_interval`` training steps with the training signals of the
interval just trained, and applies the knobs it returns for the next interval. Fixed controllers, the RL env
(one env step = one interval) and a learned RLlib policy all plug in through this interface.

Example::

    >>> ctrl = resolve_controller("fixed")
    >>> ctrl.act(Signals())
    Knobs(k=2, replay_ratio=0.1, router_noise=0.3, router_temperature=1.0)
    >>> resolve_controller("fixed-noreplay").act(Signals()).replay_ratio
    0.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from orchestration.errors import ConfigError


@dataclass
class Knobs:
    """What a controller sets for the next interval (defaults: the original TG-SMN code's 2 / 0.10 / 0.30 / 1.0)."""
    k: int = 2
    """Experts per token of the sparse model (1..max_k); ignored by dense models."""
    replay_ratio: float = 0.1
    """Fraction of each batch's rows drawn from the replay buffer, in [0, 1)."""
    router_noise: float = 0.3
    """Std of the Gaussian noise on expert-router logits in training; ignored by dense models."""
    router_temperature: float = 1.0
    """Softmax temperature of the gate over the k chosen experts; ignored by dense models."""

    def __post_init__(self):
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(f"replay_ratio must be in [0, 1) (the rest of the batch is new data), "
                              f"got {self.replay_ratio}")
        if self.k < 1 or self.router_noise < 0 or self.router_temperature <= 0:
            raise ConfigError(f"knobs need k >= 1, router_noise >= 0 and router_temperature > 0, got {self}")


@dataclass
class Signals:
    """The observation: training signals of the last interval and the knobs it ran with.

    Every field but ``step`` and ``task`` is part of the vector the RL env sees (``as_array``), in the order
    of ``OBSERVATION_FIELDS``. Means are over the interval's steps unless said otherwise.
    """
    step: int = 0
    """Global training steps taken so far."""
    task: int = 0
    """Index of the task being trained."""
    loss: float = 0.0
    """Mean cross-entropy (nats/token) of the new-data rows of the batch (replayed rows excluded)."""
    ema_loss: float = 0.0
    """Exponential moving average of the per-step loss (decay ema_decay), at the end of the interval."""
    ema_improvement: float = 0.0
    """Mean per-step decrease of the EMA loss over the interval (the TIUR "Delta t"; negative when it rises)."""
    loss_std: float = 0.0
    """Loss fluctuation: std of the per-sequence losses across the new-data rows of a batch, from the loss
    already computed (the original TG-SMN code ran 3 extra noisy forwards of the batch per step for this)."""
    stat_distance: float = 0.0
    """Statistical distance of one update: sqrt(2 KL(p_before || p_after)) of the next-token distributions on
    probe rows, measured across the last step of the interval (deterministic forwards, noise off)."""
    tiur_efficiency: float = 0.0
    """max(ema_improvement, 0) / (loss_std * stat_distance + 1e-8): loss decrease per unit of fluctuation and
    distance travelled (the eta of the original TG-SMN code)."""
    grad_norm: float = 0.0
    """Mean global gradient norm before clipping."""
    routing_entropy: float = 0.0
    """Mean entropy (nats) of the expert-router softmax, averaged over layers (0 for dense models)."""
    expert_utilization: float = 1.0
    """Fraction of experts that received a token in a batch, averaged over layers (1 for dense models)."""
    replay_loss: float = 0.0
    """Mean cross-entropy of the replayed rows (0 when none were replayed): a cheap forgetting signal."""
    task_progress: float = 0.0
    """Fraction of the task's steps done at the end of the interval (1.0 when the interval finished the task)."""
    k: float = 2.0
    """k in effect during the interval."""
    replay_ratio: float = 0.0
    """Replay ratio in effect during the interval."""
    router_noise: float = 0.0
    """Router noise in effect during the interval."""
    router_temperature: float = 1.0
    """Router temperature in effect during the interval."""

    def as_array(self) -> np.ndarray:
        """The observation vector (float32, len(OBSERVATION_FIELDS))."""
        return np.array([getattr(self, name) for name in OBSERVATION_FIELDS], dtype=np.float32)


OBSERVATION_FIELDS = tuple(f.name for f in dataclasses.fields(Signals) if f.name not in ("step", "task"))


@runtime_checkable
class Controller(Protocol):
    """Anything that maps the last interval's signals to the next interval's knobs.

    ``state_dict`` returns what a resumed run needs to continue exactly (JSON values or tensors; it is stored
    in the runner's checkpoint and given back to ``load_state_dict``).
    """

    def act(self, signals: Signals) -> Knobs: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedController:
    """Returns the same knobs at every call (it counts its calls, which tests and logs use)."""

    def __init__(self, knobs: Knobs):
        self.knobs = knobs
        self.calls = 0

    def act(self, signals: Signals) -> Knobs:
        self.calls += 1
        return self.knobs

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


# named fixed settings; "fixed" itself takes the config's fixed_knobs (unless overridden, the original TG-SMN
# code's default, which "fixed-source" also names)
FIXED_PRESETS: dict[str, Knobs] = {
    "fixed-source": Knobs(),
    "fixed-noreplay": dataclasses.replace(Knobs(), replay_ratio=0.0),
    "fixed-replay30": dataclasses.replace(Knobs(), replay_ratio=0.30),
    "fixed-k1": dataclasses.replace(Knobs(), k=1),
    "fixed-quiet": dataclasses.replace(Knobs(), router_noise=0.0),
}

# Maps a controller spec this package does not know (the path of a learned policy) to a controller, or None.
# The caller passes it in: this package cannot import the RL code that loads policies (``rl`` builds on it), and
# a module-level function pickles by reference, so it reaches Ray tasks too.
ControllerResolver = Callable[[str], "Controller | None"]


def resolve_controller(spec: str, fixed_knobs: Knobs | None = None,
                       learned: ControllerResolver | None = None) -> Controller:
    """The controller named by ``spec``: ``fixed`` (``fixed_knobs``), a fixed preset, or ``learned(spec)``.

    Raises ConfigError for anything else, listing the names it accepts.
    """
    if learned is not None and spec != "fixed" and spec not in FIXED_PRESETS:
        controller = learned(spec)
        if controller is not None:
            return controller
    if spec == "fixed":
        return FixedController(fixed_knobs or Knobs())
    if spec in FIXED_PRESETS:
        return FixedController(FIXED_PRESETS[spec])
    raise ConfigError(f"unknown controller {spec!r}; use fixed (its knobs from fixed_knobs.*), one of "
                      f"{', '.join(FIXED_PRESETS)}, or the path of a learned policy (from `memtrain rl train thermo`; from "
                      "Python, pass learned=rl.envs.thermo.learned_controller_resolver)")
