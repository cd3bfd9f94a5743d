"""A trained PPO policy as a plain object: exported weights (safetensors) + spaces (JSON), no Algorithm, no pickle.

Example::

    policy = LearnedPolicy.load("runs/rl-thermo/policy")   # or a URI: s3://bucket/runs/rl-thermo/policy
    policy.reset()                         # fresh recurrent state at the start of an episode
    action = policy.act(observation)       # deterministic; Box actions mapped back to the env's ranges
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import tree  # dm-tree, installed with RLlib

from orchestration.storage import Location
from rl.errors import RLError
from rl.spaces import space_from_json, space_to_json

POLICY_WEIGHTS = "policy.safetensors"
POLICY_SPEC = "policy.json"


def _ppo_module_class():
    from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule

    return DefaultPPOTorchRLModule


def export_policy(algo, env_name: str, directory: str | os.PathLike) -> Path:
    """Write the algorithm's RLModule weights and spaces to ``directory`` (atomically, file by file)."""
    module = algo.get_module()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = directory / (POLICY_WEIGHTS + ".tmp")
    safetensors.torch.save_file(weights, str(tmp))
    os.replace(tmp, directory / POLICY_WEIGHTS)
    spec = {"env": env_name, "model_config": dataclasses.asdict(module.model_config)
            if dataclasses.is_dataclass(module.model_config) else dict(module.model_config),
            "observation_space": space_to_json(module.observation_space),
            "action_space": space_to_json(module.action_space),
            "normalize_actions": bool(algo.config.normalize_actions),
            "inference_only": bool(getattr(module, "inference_only", False))}
    tmp = directory / (POLICY_SPEC + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, directory / POLICY_SPEC)
    return directory


class LearnedPolicy:
    """Deterministic actions from an exported PPO module, carrying the LSTM state from step to step."""

    def __init__(self, module, spec: dict):
        self.module = module.eval()
        self.spec = spec
        self.env_name = spec["env"]
        self.action_space = space_from_json(spec["action_space"])
        self.observation_space = space_from_json(spec["observation_space"])
        self.stateful = module.is_stateful()
        self._state = None
        self.reset()

    @classmethod
    def load(cls, directory: str | os.PathLike | Location) -> "LearnedPolicy":
        """Load an exported policy folder (local, on a shared mount or a URI)."""
        from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        where = Location(directory)
        if not (where / POLICY_SPEC).is_file() or not (where / POLICY_WEIGHTS).is_file():
            raise RLError(f"no exported policy in {where.uri!r}: expected {POLICY_SPEC} and {POLICY_WEIGHTS} "
                          "written by `memtrain rl train` (the run's policy/ folder)")
        spec = (where / POLICY_SPEC).read_json()
        module = RLModuleSpec(module_class=_ppo_module_class(),
                              observation_space=space_from_json(spec["observation_space"]),
                              action_space=space_from_json(spec["action_space"]),
                              model_config=DefaultModelConfig(**spec["model_config"]),
                              inference_only=spec.get("inference_only", False)).build()
        try:
            module.load_state_dict(safetensors.torch.load((where / POLICY_WEIGHTS).read_bytes()))
        except (RuntimeError, OSError, safetensors.SafetensorError) as exc:
            raise RLError(f"policy weights in {where} do not load: {exc}") from None
        return cls(module, spec)

    def reset(self) -> None:
        """Start a new episode: zero recurrent state."""
        if self.stateful:
            self._state = tree.map_structure(lambda s: torch.as_tensor(s)[None], self.module.get_initial_state())

    def get_state(self) -> dict:
        """The recurrent state (tensors; empty for a feed-forward policy), e.g. for a run's checkpoint."""
        return tree.map_structure(lambda s: s.clone(), self._state) if self.stateful else {}

    def set_state(self, state: dict) -> None:
        if self.stateful:
            self._state = tree.map_structure(torch.as_tensor, state)

    @torch.no_grad()
    def act(self, observation) -> np.ndarray | dict:
        from ray.rllib.core import Columns
        from ray.rllib.utils.spaces.space_utils import unsquash_action

        obs = tree.map_structure(lambda o: torch.as_tensor(np.asarray(o, dtype=np.float32))[None], observation)
        batch = {Columns.OBS: obs}
        if self.stateful:  # recurrent modules take (batch, time, ...) inputs and the state of the previous step
            batch = {Columns.OBS: tree.map_structure(lambda o: o[:, None], obs), Columns.STATE_IN: self._state}
        out = self.module.forward_inference(batch)
        if self.stateful:
            self._state = out[Columns.STATE_OUT]
        logits = out[Columns.ACTION_DIST_INPUTS]
        if self.stateful:
            logits = logits[:, 0]
        dist = self.module.get_inference_action_dist_cls().from_logits(logits)
        action = tree.map_structure(lambda a: a[0].numpy(), dist.to_deterministic().sample())
        if self.spec.get("normalize_actions", True):
            action = unsquash_action(action, self.action_space)
        return action
