"""``memtrain rl eval``: a learned policy against fixed baselines on held-out seeds, mean with 95% intervals.

A policy is anything with ``reset()`` (start of an episode) and ``act(observation) -> action``: an exported PPO
policy (``LearnedPolicy``) or an env module's fixed baselines (``baseline_policies(env_config) -> {name: policy}``).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Protocol

import numpy as np

from orchestration.progress import progress
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


def run_episodes(env, policy: Policy, seed: int, episodes: int, bar=None) -> dict:
    """Mean return and mean reward parts per episode of ``policy`` on ``env`` with reset seeds ``seed*1000 + i``
    (each finished episode advances ``bar``, a progress bar, when given)."""
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
        if bar is not None:
            bar.update()
    return {"return": float(np.mean(returns)), **parts}


def evaluate(env_name: str, env_config: dict, policies: dict[str, Policy], seeds: list[int], episodes: int,
             seed_config: Callable[[int], dict] | None = None) -> list[dict]:
    """One row per policy, best first: mean return over seeds with its 95% interval, the per-seed returns and mean
    reward parts.

    Every policy meets the same episodes (one env per seed, reset with seeds ``seed*1000 + i``), so two rows can be
    compared seed by seed (``compare``). ``seed_config(seed)`` adds env_config keys per seed (e.g. a held-out task
    stream per seed).
    """
    per_policy: dict[str, list[dict]] = {name: [] for name in policies}
    with progress(desc=f"evaluating {len(policies)} policies on {env_name}",
                  total=len(seeds) * len(policies) * episodes, unit="episode") as bar:
        for seed in seeds:
            env = make_env(env_name, {**env_config, **(seed_config(seed) if seed_config else {}), "seed": seed})
            for name, policy in policies.items():
                per_policy[name].append(run_episodes(env, policy, seed, episodes, bar))
            env.close()
    rows = []
    for name, per_seed in per_policy.items():
        returns = [r["return"] for r in per_seed]
        mean, half = mean_ci95(returns)
        row = {"policy": name, "return_mean": mean, "ci95": half, "low": mean - half, "high": mean + half,
               "seeds": len(seeds), "per_seed": returns}
        for key in per_seed[0]:
            if key != "return":
                row[key] = float(np.mean([r[key] for r in per_seed]))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["return_mean"])


def compare(rows: list[dict], reference: str) -> list[dict]:
    """Each row's difference from the ``reference`` row, paired seed by seed (every policy met the same episodes):
    ``diff`` (mean of per-seed differences), ``diff_ci95`` (its 95% Student-t half-width) and ``significant`` (the
    interval excludes 0). The reference row gets diff 0 and significant None.

    Example::

        >>> rows = [{"policy": "a", "per_seed": [1.0, 1.1, 0.9]}, {"policy": "b", "per_seed": [0.5, 0.7, 0.4]}]
        >>> [(r["policy"], round(r["diff"], 3), r["significant"]) for r in compare(rows, "b")]
        [('a', 0.467, True), ('b', 0.0, None)]
    """
    base = next((r for r in rows if r["policy"] == reference), None)
    if base is None:
        raise ValueError(f"no row {reference!r} to compare with; rows: {[r['policy'] for r in rows]}")
    out = []
    for row in rows:
        diff, half = mean_ci95([a - b for a, b in zip(row["per_seed"], base["per_seed"])])
        significant = None if row is base else bool(half > 0 and abs(diff) > half)
        out.append({**row, "diff": diff, "diff_ci95": half, "significant": significant})
    return out


def write_report(rows: list[dict], out_dir: str | os.PathLike | Location, title: str) -> Location:
    """results.json, results.md (table) and returns.png (means with 95% intervals) in a folder (local, shared or a
    URI)."""
    out = Location(out_dir)
    (out / "results.json").write_json(rows)
    columns = ["policy", "return_mean", "ci95", "seeds"] + sorted({k for r in rows for k in r}
                                                                  - {"policy", "return_mean", "ci95", "seeds", "low",
                                                                     "high", "per_seed"})
    (out / "results.md").write_text(f"# {title}\n\n{markdown_table(rows, columns)}\n")
    fig, ax = pyplot().subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    ax.barh([r["policy"] for r in rows], [r["return_mean"] for r in rows], xerr=[r["ci95"] for r in rows],
            color="tab:blue", alpha=0.7, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("mean episode return (95% CI over seeds)")
    ax.set_title(title)
    save_png(fig, out / "returns.png")
    return out
