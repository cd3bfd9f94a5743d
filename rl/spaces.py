"""gymnasium spaces to and from JSON, so an exported policy needs no pickle to rebuild its module."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from rl.errors import RLError


def space_to_json(space: gym.Space) -> dict:
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(), "shape": list(space.shape),
                "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(s) for k, s in space.spaces.items()}}
    raise RLError(f"cannot export a policy over a {type(space).__name__} space; use Box, Discrete, MultiDiscrete or Dict")


def space_from_json(spec: dict) -> gym.Space:
    kind = spec["type"]
    if kind == "Box":
        return gym.spaces.Box(np.array(spec["low"], dtype=spec["dtype"]), np.array(spec["high"], dtype=spec["dtype"]),
                              shape=tuple(spec["shape"]), dtype=spec["dtype"])
    if kind == "Discrete":
        return gym.spaces.Discrete(spec["n"])
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(spec["nvec"])
    if kind == "Dict":
        return gym.spaces.Dict({k: space_from_json(s) for k, s in spec["spaces"].items()})
    raise RLError(f"unknown space type {kind!r} in policy.json")
