"""Per-episode metrics beyond the return: the reward's parts (from ``info["reward_parts"]``) and action statistics."""

from __future__ import annotations

import numpy as np
import tree
from ray.rllib.callbacks.callbacks import RLlibCallback


class EpisodeMetrics(RLlibCallback):
    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        if metrics_logger is None:
            return
        totals: dict[str, float] = {}
        for info in episode.get_infos():
            for key, value in (info or {}).get("reward_parts", {}).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        for key, value in totals.items():
            metrics_logger.log_value(f"reward_part/{key}", value, reduce="mean")
        # one column per scalar of the action (Dict/tuple spaces flattened in dm-tree order: sorted keys)
        actions = episode.get_actions()
        if isinstance(actions, dict):
            flat = np.concatenate([np.asarray(v, np.float64).reshape(len(v), -1) for v in tree.flatten(actions)], 1)
        else:
            flat = np.asarray([np.concatenate([np.ravel(x) for x in tree.flatten(a)]) for a in actions], np.float64)
        for i, mean in enumerate(flat.mean(axis=0)):
            metrics_logger.log_value(f"action_mean/action_{i}", float(mean), reduce="mean")
