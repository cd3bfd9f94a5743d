"""memtrain's RL environments by name (also any gymnasium id, e.g. CartPole-v1, for trying the PPO machinery).

Every memtrain env has a typed config (``MetaEnvConfig``, ``ThermoEnvConfig``): ``env_settings`` checks an
``env_config`` dict against it (unknown keys and bad values are refused, naming the valid keys), and
``env_config_dict`` turns it back into the plain dict that RLlib and gymnasium hand to the env's constructor.

Example::

    >>> env_settings("meta", {"memory": "local", "queries": 3}).queries
    3
    >>> env_settings("meta", {"querys": 3})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rl.errors.RLError: bad env_config for the meta env: unknown config key 'querys' in env_config; valid keys: ...
"""

from __future__ import annotations

import importlib

import gymnasium as gym
from omegaconf import OmegaConf

from orchestration.config import from_dict
from orchestration.errors import ConfigError
from rl.errors import RLError

# name -> (module, env class, config class)
ENVS = {
    "meta": ("rl.envs.meta", "MetaControllerEnv", "MetaEnvConfig"),
    "thermo": ("rl.envs.thermo", "ThermoControllerEnv", "ThermoEnvConfig"),
}


def _check_name(name: str) -> None:
    if name not in ENVS and name not in gym.registry:
        raise RLError(f"unknown env {name!r}; memtrain envs: {', '.join(ENVS)} (or a registered gymnasium id)")


def env_settings(name: str, env_config: dict | None = None):
    """``env_config`` as the typed config of memtrain env ``name``; None for a gymnasium id, which takes none."""
    _check_name(name)
    if name not in ENVS:
        if env_config:
            raise RLError(f"{name} is a gymnasium env and takes no env_config (got {', '.join(env_config)})")
        return None
    module, _, config_class = ENVS[name]
    cls = getattr(importlib.import_module(module), config_class)
    try:
        return from_dict(cls, dict(env_config or {}), where="env_config")
    except ConfigError as exc:
        raise RLError(f"bad env_config for the {name} env: {exc}") from None


def env_config_dict(settings) -> dict:
    """A typed env config as the plain dict (nested dicts and lists) an env is built from."""
    return OmegaConf.to_container(OmegaConf.structured(settings))


def make_env(name: str, env_config: dict | None = None) -> gym.Env:
    """Build env ``name`` from ``env_config`` (memtrain envs check it against their config class)."""
    _check_name(name)
    if name in ENVS:
        module, cls, _ = ENVS[name]
        return getattr(importlib.import_module(module), cls)(dict(env_config or {}))
    return gym.make(name)


def rllib_env_name(name: str) -> str:
    """Register ``name`` with RLlib (in this process; env runners get it through the config) and return its id."""
    from ray.tune.registry import register_env

    registered = f"memtrain-{name}"
    register_env(registered, lambda cfg, _name=name: make_env(_name, dict(cfg)))
    return registered
