"""A grid of continual-learning runs (variants x controllers x benchmarks x seeds) as parallel Ray tasks.

Each run writes its own folder ``<output>/<benchmark>/<variant>/<controller>/seed<S>/`` (a learned policy's
``<controller>`` is ``learned-<its run folder's name>``); a run whose
``summary.json`` says finished is skipped, and an interrupted one resumes from its newest checkpoint, so
re-running the same grid only does what is missing. The grid ends with one table: ``results.csv`` (a row per
run) and ``results.md`` (the same rows, then mean and standard deviation over seeds per group).

The runs are Ray tasks that may land on any node: the driver builds each distinct task stream once, publishes it
under ``<output>/data/`` and every run reads it from there (one copy per node), and ``output`` must be a URI or a
folder every node mounts when the cluster has several nodes (a node-local one is refused before anything runs).

Example (``configs/continual/grid-permuted.yaml``)::

    memtrain continual-grid configs/continual/grid-permuted.yaml base.data.source=/path/to/wikitext2

or from Python::

    >>> cfg = load_config(GridConfig, "configs/continual/grid-permuted.yaml")     # doctest: +SKIP
    >>> rows = run_grid(cfg)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestration.config import load_config
from orchestration.continual.control import FIXED_PRESETS, ControllerResolver, resolve_controller
from orchestration.continual.runner import ContinualConfig, finished_summary, run_continual
from orchestration.continual.tasks import build_stream, load_stream
from orchestration.errors import ConfigError
from orchestration.report import markdown_table
from orchestration.storage import BundleRef, Location, fetch_bundle, publish_bundle, require_shared

log = logging.getLogger(__name__)

# the summary figures each results row carries (None when a run did not produce them)
RESULT_KEYS = ("avg_final_loss", "avg_final_perplexity", "forgetting", "backward_transfer", "forward_transfer",
               "avg_learned_loss", "steps", "tokens")
GROUP_KEYS = ("benchmark", "variant", "controller")


@dataclass
class GridConfig:
    base: ContinualConfig = field(default_factory=ContinualConfig)
    """Settings every run shares (any continual field, e.g. base.max_steps_per_task=40)."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """Named lists of key=value overrides of base, e.g. dense: [model=tgsmn-dense-tiny] (empty: one variant 'base')."""
    controllers: list[str] = field(default_factory=list)
    """Controllers crossed with the variants (empty: each variant's own controller setting): fixed settings or
    paths of learned policies (the command line resolves these; from Python pass ``learned`` to run_grid)."""
    benchmarks: list[str] = field(default_factory=list)
    """Benchmarks crossed with the rest (empty: base.stream.benchmark)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds of every combination."""
    output: str = "runs/continual-grid"
    """Grid folder (a local path, a folder every node mounts, or a URI): one sub-folder per run, data/ (the
    published task streams), results.csv and results.md."""
    cpus_per_run: float = 1.0
    """Ray CPUs reserved by each run (runs in parallel = cluster CPUs / cpus_per_run)."""
    threads_per_run: int = 1
    """torch threads inside each run."""

    def __post_init__(self):
        if not self.seeds:
            raise ConfigError("the grid needs at least one seed, e.g. seeds=[0,1,2]")
        if self.cpus_per_run <= 0 or self.threads_per_run < 1:
            raise ConfigError("cpus_per_run must be > 0 and threads_per_run >= 1")


@dataclass
class GridRun:
    """One cell of the grid."""
    benchmark: str
    variant: str
    controller: str
    """The controller's name in folders and tables (``controller_label`` of the spec in ``cfg.controller``)."""
    seed: int
    cfg: ContinualConfig


def controller_label(spec: str) -> str:
    """A controller spec as one folder name: fixed settings as they are, a policy path as ``learned-<run name>``.

    >>> controller_label("fixed-k1"), controller_label("s3://bucket/runs/rl-thermo/policy/")
    ('fixed-k1', 'learned-rl-thermo')
    """
    if spec == "fixed" or spec in FIXED_PRESETS:
        return spec
    parts = [part for part in spec.rstrip("/").split("/") if part]
    if len(parts) > 1 and parts[-1] == "policy":
        parts.pop()
    return f"learned-{parts[-1]}"


def expand(grid: GridConfig) -> list[GridRun]:
    """Every run of the grid with its resolved config (bad overrides fail here, before anything starts)."""
    base = dataclasses.asdict(grid.base)
    variants = grid.variants or {"base": []}
    runs = []
    for benchmark in grid.benchmarks or [grid.base.stream.benchmark]:
        for variant, overrides in variants.items():
            own = load_config(ContinualConfig, overrides=list(overrides), **base)
            for controller in grid.controllers or [own.controller]:
                label = controller_label(controller)
                for seed in grid.seeds:
                    out = Location(grid.output) / benchmark / variant / label / f"seed{seed}"
                    cfg = dataclasses.replace(own, stream=dataclasses.replace(own.stream, benchmark=benchmark),
                                              controller=controller, seed=seed, output=out.uri,
                                              threads=grid.threads_per_run)
                    runs.append(GridRun(benchmark, variant, label, seed, cfg))
    return runs


def _run_remote(cfg: ContinualConfig, stream: BundleRef, learned: ControllerResolver | None) -> dict:
    """Body of one Ray task, on any node: this node's copy of the published stream, then run (or resume)."""
    logging.basicConfig(level=logging.WARNING)
    return run_continual(cfg, stream=load_stream(fetch_bundle(stream, cfg.data.cache_dir), cfg.data.seq_len),
                         learned=learned)


def _stream_key(cfg: ContinualConfig) -> str:
    return json.dumps([dataclasses.asdict(cfg.stream), dataclasses.asdict(cfg.data)], sort_keys=True)


def run_grid(grid: GridConfig, learned: ControllerResolver | None = None) -> list[dict]:
    """Run every missing cell of the grid as a Ray task, then write results.csv and results.md; returns the rows.

    ``learned`` resolves the controllers that are not fixed settings (policy paths), in the driver (a bad one fails
    before anything runs) and again in each task.
    """
    import ray

    from orchestration.runtime import ensure_ray

    runs = expand(grid)
    for spec in dict.fromkeys(run.cfg.controller for run in runs):
        resolve_controller(spec, grid.base.fixed_knobs, learned)
    out = Location(grid.output)
    summaries: dict[int, dict] = {}
    todo = []
    for i, run in enumerate(runs):
        done = finished_summary(Location(run.cfg.output), run.cfg)
        if done is not None:
            summaries[i] = {**done, "grid_status": "skipped"}
        else:
            todo.append(i)
    log.info("grid: %d runs, %d already finished, %d to run", len(runs), len(runs) - len(todo), len(todo))
    if todo:
        ensure_ray()
        require_shared(out, "output")
        # tokenize each distinct stream once, on the driver, and publish it for the runs on every node
        streams: dict[str, BundleRef] = {}
        for i in todo:
            key = _stream_key(runs[i].cfg)
            if key not in streams:
                local = Path(build_stream(runs[i].cfg.stream, runs[i].cfg.data).folder)
                streams[key] = publish_bundle(local, out / "data" / local.name)
        task = ray.remote(_run_remote).options(num_cpus=grid.cpus_per_run, max_retries=0)
        pending = {task.remote(runs[i].cfg, streams[_stream_key(runs[i].cfg)], learned): i for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            run = runs[i]
            try:
                summaries[i] = {**ray.get(ready[0]), "grid_status": "ran"}
                log.info("grid: finished %s/%s/%s seed %d (%d left)", run.benchmark, run.variant, run.controller,
                         run.seed, len(pending))
            except Exception as exc:  # one failed run must not stop the others; its row says why
                summaries[i] = {"grid_status": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                log.error("grid: %s/%s/%s seed %d failed: %s", run.benchmark, run.variant, run.controller,
                          run.seed, summaries[i]["error"])
    rows = []
    for i, run in enumerate(runs):
        s = summaries[i]
        rows.append({"benchmark": run.benchmark, "variant": run.variant, "controller": run.controller,
                     "model": run.cfg.model, "seed": run.seed, "status": s["grid_status"],
                     **{k: s.get(k) for k in RESULT_KEYS}, "signal_fraction": s.get("time", {}).get("signal_fraction"),
                     "train_s": s.get("time", {}).get("train_s"), "error": s.get("error", ""), "dir": run.cfg.output})
    write_results(out, rows)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation (over seeds, ddof=1) of the result figures per (benchmark, variant, controller)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] != "error":
            groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(GROUP_KEYS, key), model=members[0]["model"], seeds=len(members))
        for metric in ("avg_final_loss", "forgetting", "backward_transfer", "forward_transfer", "avg_learned_loss"):
            values = np.array([m[metric] for m in members if m[metric] is not None], dtype=float)
            row[metric] = _mean_std(values)
        out.append(row)
    return out


def _mean_std(values: np.ndarray) -> str:
    if len(values) == 0:
        return ""
    std = values.std(ddof=1) if len(values) > 1 else math.nan
    return f"{values.mean():.4f} ± {std:.4f}" if math.isfinite(std) else f"{values.mean():.4f}"


def write_results(out: Location, rows: list[dict]) -> None:
    """results.csv (one row per run) and results.md (per-run table, then the seed aggregate)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buf.getvalue())
    agg = aggregate(rows)
    md = ["# continual grid results", "", "## mean ± std over seeds (losses in nats/token)", "",
          markdown_table(agg, [*GROUP_KEYS, "model", "seeds", "avg_final_loss", "forgetting", "backward_transfer",
                               "forward_transfer", "avg_learned_loss"]),
          "", "## every run", "",
          markdown_table(rows, [*GROUP_KEYS, "seed", "status", "avg_final_loss", "forgetting", "backward_transfer",
                                "forward_transfer", "signal_fraction", "train_s", "error"]), ""]
    (out / "results.md").write_text("\n".join(md))
