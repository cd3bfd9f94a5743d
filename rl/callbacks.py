"""Per-episode metrics beyond the return: the reward's parts (from ``info["reward_parts"]``) and action statistics."""

from __future__ import annotations

import numpy as np
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
        actions = episode.get_actions()
        if isinstance(actions, dict):  # Dict action spaces: one statistic per component
            items = actions.items()
        else:
            items = [("action", actions)]
        for key, values in items:
            arr = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
            for i, mean in enumerate(arr.mean(axis=0)):
                metrics_logger.log_value(f"action_mean/{key}_{i}", float(mean), reduce="mean")
