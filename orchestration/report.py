"""Plots and markdown tables from run folders (metrics.jsonl, summary.json), wherever they are stored."""

from __future__ import annotations

import io
import os

from orchestration.storage import Location, read_metrics


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, where: str | os.PathLike | Location) -> Location:
    """Write a figure as PNG to a run path (local, shared or a URI) and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    where = Location(where)
    where.write_bytes(buf.getvalue())
    return where


def plot_loss_curves(run: str | os.PathLike | Location, out_png: str | os.PathLike | Location,
                     title: str = "pretraining") -> Location:
    """Training and held-out cross-entropy against step, from a pretraining run's metrics.jsonl; the auxiliary
    losses the model also trains with (MoE balance, z, early exit) as a separate line when there are any (runs written
    before ``train_ce`` was logged plot their total training loss, labelled so)."""
    plt = pyplot()
    rows = read_metrics(run)
    train = [(r["step"], r.get("train_ce", r.get("loss"))) for r in rows if "loss" in r]
    aux = [(r["step"], r["aux_loss"]) for r in rows if r.get("aux_loss")]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        has_ce = any("train_ce" in r for r in rows)
        ax.plot(*zip(*train), label="train cross-entropy" if has_ce else "train loss (cross-entropy + auxiliary)")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="held-out cross-entropy")
    if aux:
        ax.plot(*zip(*aux), linestyle="--", color="gray", label="auxiliary losses (not in cross-entropy)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats/token")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, out_png)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --- `memtrain report RUN_DIR`: plots and tables regenerated from any run or sweep directory ---------------------

def plot_metric_curves(curves: dict[str, list[tuple[float, float]]], out_png: str | os.PathLike | Location,
                       title: str, ylabel: str) -> Location:
    """One line per named series of (step, value) points, e.g. the held-out loss of every trial of a sweep."""
    plt = pyplot()
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
    return save_png(fig, out_png)


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


def _read_yaml(where: Location) -> dict:
    return (where.read_yaml() or {}) if where.is_file() else {}


def pretrain_report(run: Location) -> Location:
    """report.md and plots/loss.png of a pretraining run folder (anything with a metrics.jsonl)."""
    rows = read_metrics(run)
    cfg = _read_yaml(run / "config.yaml")
    model = cfg.get("model", "model")
    plot_loss_curves(run, run / "plots" / "loss.png", f"{model} pretraining")
    figures = run_figures(rows)
    evals = [{"step": r["step"], "eval_loss": r["eval_loss"], "eval_perplexity": r.get("eval_perplexity")}
             for r in rows if "eval_loss" in r]
    lines = [f"# Pretraining run `{run.name}`", "",
             f"Model `{model}`, {cfg.get('workers', '?')} worker(s), lr {cfg.get('lr', '?')}, "
             f"data `{cfg.get('data', {}).get('source', '?')}`; {len(rows)} reports in metrics.jsonl.", "",
             markdown_table([figures], list(figures)), "",
             "![loss curves](plots/loss.png)", "",
             "## Held-out evaluations", "", markdown_table(evals, ["step", "eval_loss", "eval_perplexity"]), ""]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    return out


def sweep_report(sweep: Location) -> Location:
    """report.md and plots/ of a sweep folder, rebuilt from its trial folders (no Tune state needed): trials
    ranked by the sweep's metric, with their searched values and held-out curves."""
    spec = _read_yaml(sweep / "sweep.yaml")
    metric, mode = spec.get("metric", "eval_loss"), spec.get("mode", "min")
    keys = list(spec.get("search", {}))
    rows, curves = [], {}
    for name in (sweep / "trials").listdir():
        trial = sweep / "trials" / name
        metrics = read_metrics(trial)
        cfg = _read_yaml(trial / "config.yaml")
        params = {}
        for key in keys:  # dotted keys into the trial's resolved config
            value = cfg
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            params[key] = value
        values = [r[metric] for r in metrics if metric in r]
        best = (min(values) if mode == "min" else max(values)) if values else None
        rows.append({"trial_id": name, **params, metric: values[-1] if values else None,
                     f"best_{metric}": best, "step": metrics[-1].get("step") if metrics else None})
        label = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                          for k, v in params.items())
        curves[label or name] = [(r["step"], r[metric]) for r in metrics if metric in r]
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    plot_metric_curves(curves, sweep / "plots" / f"{metric}.png", f"sweep {sweep.name}", metric)
    lines = [f"# Sweep `{sweep.name}`", "",
             f"{len(rows)} trial(s) of kind `{spec.get('kind', 'pretrain')}`, ranked by the last reported `{metric}` "
             f"({mode}); searched: {', '.join(keys) or 'nothing'}.", "",
             markdown_table(rows, ["rank", "trial_id", *keys, metric, f"best_{metric}", "step"]), "",
             f"![{metric} per trial](plots/{metric}.png)", ""]
    out = sweep / "report.md"
    out.write_text("\n".join(lines))
    return out


def write_report(where: str | os.PathLike | Location) -> Location:
    """Regenerate report.md and plots/ of a pretraining run or a sweep folder (local, shared or a URI); returns
    report.md's location.

    >>> import tempfile
    >>> from orchestration.storage import MetricsLog
    >>> tmp = tempfile.TemporaryDirectory()
    >>> run = Location(tmp.name) / "run"                  # a pretraining run's --output
    >>> metrics = MetricsLog(run / "metrics.jsonl")
    >>> metrics.append({"step": 10, "loss": 5.2, "eval_loss": 5.0})
    >>> metrics.append({"step": 20, "loss": 4.1, "eval_loss": 4.3})
    >>> write_report(run).name, (run / "plots").listdir()
    ('report.md', ['loss.png'])
    >>> tmp.cleanup()
    """
    from orchestration.errors import MemtrainError

    run_dir = Location(where)
    if (run_dir / "sweep.yaml").is_file() and (run_dir / "trials").listdir():
        return sweep_report(run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        return pretrain_report(run_dir)
    raise MemtrainError(f"{run_dir} is neither a pretraining run directory (no metrics.jsonl) nor a sweep directory "
                        "(no sweep.yaml and trials/); pass the --output of `memtrain pretrain` or `memtrain sweep`")
