"""``memtrain rl eval``: a learned policy against fixed baselines on held-out seeds, mean with 95% intervals.

A policy is anything with ``reset()`` (start of an episode) and ``act(observation) -> action``: an exported PPO
policy (``LearnedPolicy``) or an env module's fixed baselines (``baseline_policies(env_config) -> {name: policy}``).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

from orchestration.report import markdown_table, pyplot, save_png
from orchestration.storage import Location
from rl.envs import make_env


class Policy(Protocol):
    def reset(self) -> None: ...
    def act(self, observation): ...


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t confidence interval (0 for a single value)."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return float(arr.mean()), 0.0
    return float(arr.mean()), float(stats.t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))


def run_episodes(env_name: str, env_config: dict, policy: Policy, seed: int, episodes: int) -> dict:
    """Mean return and mean reward parts per episode of ``policy`` on env seeds ``seed*1000 + i``."""
    env = make_env(env_name, {**env_config, "seed": seed})
    returns, parts = [], {}
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + episode)
        policy.reset()
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy.act(obs))
            total += float(reward)
            for key, value in (info or {}).get("reward_parts", {}).items():
                parts[key] = parts.get(key, 0.0) + float(value) / episodes
            done = terminated or truncated
        returns.append(total)
    env.close()
    return {"return": float(np.mean(returns)), **parts}


def evaluate(env_name: str, env_config: dict, policies: dict[str, Policy], seeds: list[int],
             episodes: int) -> list[dict]:
    """One row per policy: mean return over seeds with its 95% interval, and mean reward parts."""
    rows = []
    for name, policy in policies.items():
        per_seed = [run_episodes(env_name, env_config, policy, seed, episodes) for seed in seeds]
        mean, half = mean_ci95([r["return"] for r in per_seed])
        row = {"policy": name, "return_mean": mean, "ci95": half, "low": mean - half, "high": mean + half,
               "seeds": len(seeds)}
        for key in per_seed[0]:
            if key != "return":
                row[key] = float(np.mean([r[key] for r in per_seed]))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["return_mean"])


def write_report(rows: list[dict], out_dir: str | os.PathLike | Location, title: str) -> Location:
    """results.json, results.md (table) and returns.png (means with 95% intervals) in a folder (local, shared or a
    URI)."""
    out = Location(out_dir)
    (out / "results.json").write_json(rows)
    columns = ["policy", "return_mean", "ci95", "seeds"] + sorted({k for r in rows for k in r}
                                                                  - {"policy", "return_mean", "ci95", "seeds", "low",
                                                                     "high"})
    (out / "results.md").write_text(f"# {title}\n\n{markdown_table(rows, columns)}\n")
    fig, ax = pyplot().subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    ax.barh([r["policy"] for r in rows], [r["return_mean"] for r in rows], xerr=[r["ci95"] for r in rows],
            color="tab:blue", alpha=0.7, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("mean episode return (95% CI over seeds)")
    ax.set_title(title)
    save_png(fig, out / "returns.png")
    return out
