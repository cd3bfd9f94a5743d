"""memtrain's RL environments by name (also any gymnasium id, e.g. CartPole-v1, for trying the PPO machinery)."""

from __future__ import annotations

import importlib

import gymnasium as gym

from rl.errors import RLError

ENVS = {
    "meta": ("rl.envs.meta", "MetaControllerEnv"),
    "thermo": ("rl.envs.thermo", "ThermoControllerEnv"),
}


def make_env(name: str, env_config: dict | None = None) -> gym.Env:
    """Build env ``name`` with ``env_config`` (memtrain envs take the dict; gymnasium ids ignore it)."""
    if name in ENVS:
        module, cls = ENVS[name]
        return getattr(importlib.import_module(module), cls)(dict(env_config or {}))
    if name in gym.registry:
        return gym.make(name)
    raise RLError(f"unknown env {name!r}; memtrain envs: {', '.join(ENVS)} (or a registered gymnasium id)")


def rllib_env_name(name: str) -> str:
    """Register ``name`` with RLlib (in this process; env runners get it through the config) and return its id."""
    from ray.tune.registry import register_env

    registered = f"memtrain-{name}"
    register_env(registered, lambda cfg, _name=name: make_env(_name, dict(cfg)))
    return registered
