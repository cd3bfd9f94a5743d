"""What Ray Train's report hand-off costs a small, fast run: the Train controller's poll interval at Ray's default
(2 s) against memtrain's (0.5 s), side by side in one command.

    python bench/bench_report_interval.py           # about 3 minutes on 2 CPU cores

A worker's ``ray.train.report`` waits until the controller has taken the previous report, and the controller
looks every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; a run that reports more often than that stalls. The run here is
the tests' small model (2 layers, d_model 64) on 2 workers with a report every 5 steps (about 0.1 s of training)
and a checkpoint every 50. Throughput is end to end, between the first and the last report (metrics.jsonl's
``time``, stamped by the workers); rounds alternate the order of the two settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from orchestration.allocator import keep_freed_memory
from orchestration.config import load_config
from orchestration.training.pretrain import PretrainConfig, pretrain
from orchestration.storage import read_metrics

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def run(output: str, cache: str, steps: int, interval: str | None) -> float:
    if interval is None:
        os.environ.pop(INTERVAL, None)  # memtrain's default (set by make_trainer)
    else:
        os.environ[INTERVAL] = interval
    pretrain(load_config(PretrainConfig, overrides=[
        "data.source=builtin", f"data.cache_dir={cache}", "data.vocab_size=512", "data.seq_len=64", "batch_size=8",
        "model_overrides.n_layers=2", "model_overrides.d_model=64", "model_overrides.d_ff=128", "workers=2",
        "cpus_per_worker=1", f"max_steps={steps}", "log_every=5", "checkpoint_every=50", f"eval_every={steps}",
        "eval_batches=2", f"output={output}"]))
    rows = [r for r in read_metrics(output) if "loss" in r]
    return (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["time"] - rows[0]["time"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    from orchestration.runtime import ensure_ray

    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    cache = str(tmp / "cache")
    run(str(tmp / "warmup"), cache, 20, None)
    variants = {"ray default 2 s": "2.0", "memtrain 0.5 s": None}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            results[name].append(run(str(tmp / f"{r}-{name.split()[0]}"), cache, args.steps, variants[name]))
            print(f"round {r} {name}: {results[name][-1]:,.0f} tok/s", flush=True)
    ratios = [b / a for a, b in zip(results["ray default 2 s"], results["memtrain 0.5 s"])]
    print(f"\nmedian: ray default {statistics.median(results['ray default 2 s']):,.0f} tok/s, memtrain "
          f"{statistics.median(results['memtrain 0.5 s']):,.0f} tok/s; per-round ratio median "
          f"{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
