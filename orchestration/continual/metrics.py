"""Continual-learning metrics from the task x task evaluation matrix, in loss space, and the run's plots.

``R[i, j]`` is the held-out loss (nats/token) on task j after training task i; ``b[j]`` the loss of the
untrained model on task j. With T tasks (loss: lower is better; signs chosen so that the usual reading holds):

- average final loss: mean_j R[T-1, j]; average final perplexity: mean_j exp(R[T-1, j]);
- forgetting: mean over j < T-1 of R[T-1, j] - min_{j <= l < T-1} R[l, j] (how far each old task's loss rose
  above its best, >= 0);
- backward transfer: mean over j < T-1 of R[j, j] - R[T-1, j] (negative = later tasks hurt old ones);
- forward transfer: mean over j > 0 of b[j] - R[j-1, j] (positive = earlier tasks helped a task not yet seen).

Example::

    >>> import numpy as np
    >>> R = np.array([[2.0, 5.0], [3.0, 2.5]])
    >>> m = cl_metrics(R, baseline=np.array([6.0, 6.0]))
    >>> m["forgetting"], m["backward_transfer"], m["forward_transfer"]
    (1.0, -1.0, 1.0)
"""

from __future__ import annotations

import math
import os

import numpy as np

from orchestration.report import pyplot, save_png
from orchestration.storage import Location


def cl_metrics(matrix_TT: np.ndarray, baseline: np.ndarray | None = None) -> dict[str, float | None]:
    """Average final loss and perplexity, forgetting, BWT, FWT and the mean just-learned loss (None if undefined)."""
    R = np.asarray(matrix_TT, dtype=np.float64)
    T = R.shape[0]
    final = R[T - 1]
    out: dict[str, float | None] = {
        "avg_final_loss": float(final.mean()),
        "avg_final_perplexity": float(np.exp(np.minimum(final, 50)).mean()),
        "avg_learned_loss": float(np.diag(R).mean()),  # loss on each task right after training it (plasticity)
        "forgetting": None, "backward_transfer": None, "forward_transfer": None,
    }
    if T > 1:
        old = np.arange(T - 1)
        # best loss of task j over the rows l = j .. T-2: mask rows before j with +inf, then take the column min
        rows_LT = np.where(np.arange(T - 1)[:, None] >= old[None, :], R[:T - 1, :T - 1], np.inf)
        out["forgetting"] = float((final[old] - rows_LT.min(axis=0)).mean())
        out["backward_transfer"] = float((np.diag(R)[old] - final[old]).mean())
        if baseline is not None:
            out["forward_transfer"] = float((np.asarray(baseline)[1:] - R[np.arange(T - 1), np.arange(1, T)]).mean())
    return out


def matrix_csv(matrix: list[list[float]], task_names: list[str], baseline: list[float] | None) -> str:
    """The evaluation matrix as CSV: one row per evaluation point (init, then after each task), one column per task."""
    lines = ["after," + ",".join(task_names)]
    if baseline is not None:
        lines.append("init," + ",".join(f"{v:.6f}" for v in baseline))
    lines += [f"{task_names[i]}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(matrix)]
    return "\n".join(lines) + "\n"


def plot_matrix(matrix: list[list[float]], task_names: list[str], baseline: list[float] | None,
                out_png: str | os.PathLike | Location, subtitle: str = "") -> Location:
    """Heatmap of the evaluation matrix (rows: after training a task; columns: evaluated task); ``subtitle`` names
    the run (e.g. its controller)."""
    plt = pyplot()
    rows = ([baseline] if baseline is not None else []) + matrix
    labels = (["init"] if baseline is not None else []) + [f"after {n}" for n in task_names[:len(matrix)]]
    data = np.array(rows)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(task_names), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(data, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(task_names)), task_names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v > data.mean() else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="held-out loss (nats/token)")
    ax.set_title("evaluation matrix (test split)" + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    return save_png(fig, out_png)


def plot_knobs(rows: list[dict], task_steps: list[int], out_png: str | os.PathLike | Location,
               title: str = "") -> Location:
    """Training loss and the four knobs against the global step; dotted lines mark task switches; ``title`` says
    which controller set them."""
    plt = pyplot()
    panels = [("loss", "loss (new data)"), ("k", "k"), ("replay_ratio", "replay ratio"),
              ("router_noise", "router noise"), ("router_temperature", "router temperature")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.5, 1.6 * len(panels)), sharex=True)
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(axes, panels):
        ax.step(steps, [r[key] for r in rows], where="post")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for s in task_steps:
            ax.axvline(s, color="grey", linestyle=":", linewidth=0.8)
    axes[-1].set_xlabel("training step")
    if title:
        axes[0].set_title(title, fontsize=9)
    return save_png(fig, out_png)


def finite_or_none(value: float | None) -> float | None:
    """Strict JSON has no NaN or infinity: such values become null."""
    return value if value is None or math.isfinite(value) else None
