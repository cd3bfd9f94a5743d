"""Plots and markdown tables from run directories (metrics.jsonl, summary.json)."""

from __future__ import annotations

import os
from pathlib import Path

from orchestration.pretrain import read_metrics


def plot_loss_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike, title: str = "pretraining") -> Path:
    """Training and held-out loss against step, from a pretraining run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --- `memtrain report RUN_DIR`: plots and tables regenerated from any run or sweep directory ---------------------

def plot_metric_curves(curves: dict[str, list[tuple[float, float]]], out_png: str | os.PathLike, title: str,
                       ylabel: str) -> Path:
    """One line per named series of (step, value) points, e.g. the held-out loss of every trial of a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_figures(rows: list[dict]) -> dict:
    """Headline figures of a pretraining run from its metrics.jsonl rows (what summary.json holds, recomputed)."""
    evals = [r for r in rows if "eval_loss" in r]
    trains = [r for r in rows if "loss" in r]
    return {
        "step": rows[-1].get("step") if rows else None,
        "tokens": rows[-1].get("tokens") if rows else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        "final_eval_perplexity": evals[-1].get("eval_perplexity") if evals else None,
        "final_train_loss": trains[-1]["loss"] if trains else None,
        "tokens_per_s": trains[-1].get("tokens_per_s") if trains else None,
        "mfu": trains[-1].get("mfu") if trains else None,
    }


def _read_yaml(path: Path) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def pretrain_report(run_dir: str | os.PathLike) -> Path:
    """report.md and plots/loss.png of a pretraining run directory (anything with a metrics.jsonl)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    cfg = _read_yaml(run_dir / "config.yaml")
    model = cfg.get("model", "model")
    plot = plot_loss_curves(run_dir, run_dir / "plots" / "loss.png", f"{model} pretraining")
    figures = run_figures(rows)
    evals = [{"step": r["step"], "eval_loss": r["eval_loss"], "eval_perplexity": r.get("eval_perplexity")}
             for r in rows if "eval_loss" in r]
    lines = [f"# Pretraining run `{run_dir.name}`", "",
             f"Model `{model}`, {cfg.get('workers', '?')} worker(s), lr {cfg.get('lr', '?')}, "
             f"data `{cfg.get('data', {}).get('source', '?')}`; {len(rows)} reports in metrics.jsonl.", "",
             markdown_table([figures], list(figures)), "",
             f"![loss curves]({plot.relative_to(run_dir)})", "",
             "## Held-out evaluations", "", markdown_table(evals, ["step", "eval_loss", "eval_perplexity"]), ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def sweep_report(sweep_dir: str | os.PathLike) -> Path:
    """report.md and plots/ of a sweep directory, rebuilt from its trial directories (no Tune state needed):
    trials ranked by the sweep's metric, with their searched values and held-out curves."""
    sweep_dir = Path(sweep_dir)
    spec = _read_yaml(sweep_dir / "sweep.yaml")
    metric, mode = spec.get("metric", "eval_loss"), spec.get("mode", "min")
    keys = list(spec.get("search", {}))
    rows, curves = [], {}
    for trial_dir in sorted(p for p in (sweep_dir / "trials").iterdir() if p.is_dir()):
        metrics = read_metrics(trial_dir)
        cfg = _read_yaml(trial_dir / "config.yaml")
        params = {}
        for key in keys:  # dotted keys into the trial's resolved config
            value = cfg
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            params[key] = value
        values = [r[metric] for r in metrics if metric in r]
        best = (min(values) if mode == "min" else max(values)) if values else None
        rows.append({"trial_id": trial_dir.name, **params, metric: values[-1] if values else None,
                     f"best_{metric}": best, "step": metrics[-1].get("step") if metrics else None})
        label = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                          for k, v in params.items())
        curves[label or trial_dir.name] = [(r["step"], r[metric]) for r in metrics if metric in r]
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    plot = plot_metric_curves(curves, sweep_dir / "plots" / f"{metric}.png", f"sweep {sweep_dir.name}", metric)
    lines = [f"# Sweep `{sweep_dir.name}`", "",
             f"{len(rows)} trial(s) of kind `{spec.get('kind', 'pretrain')}`, ranked by the last reported `{metric}` "
             f"({mode}); searched: {', '.join(keys) or 'nothing'}.", "",
             markdown_table(rows, ["rank", "trial_id", *keys, metric, f"best_{metric}", "step"]), "",
             f"![{metric} per trial]({plot.relative_to(sweep_dir)})", ""]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def write_report(run_dir: str | os.PathLike) -> Path:
    """Regenerate report.md and plots/ of a pretraining run or a sweep directory; returns report.md's path.

    >>> write_report("runs/x")                       # doctest: +SKIP
    PosixPath('runs/x/report.md')
    """
    from orchestration.errors import MemtrainError

    run_dir = Path(run_dir)
    if (run_dir / "sweep.yaml").is_file() and (run_dir / "trials").is_dir():
        return sweep_report(run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        return pretrain_report(run_dir)
    raise MemtrainError(f"{run_dir} is neither a pretraining run directory (no metrics.jsonl) nor a sweep directory "
                        "(no sweep.yaml and trials/); pass the --output of `memtrain pretrain` or `memtrain sweep`")
