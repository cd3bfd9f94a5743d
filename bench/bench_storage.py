"""What the storage layer costs: the same 2-worker Ray Train pretraining with a local output and with an ``s3://``
output on an S3-compatible server on loopback (moto), side by side in one command.

    python bench/bench_storage.py                 # about 5 minutes on 2 CPU cores
    python bench/bench_storage.py --rounds 3 --steps 300

Each round runs both outputs, in alternating order (local, s3, then s3, local, ...), so drift in background load
hits them alike. A run is ``memtrain pretrain --model tgsmn-dense-tiny --data builtin --workers 2`` with a
checkpoint every 50 steps. Its throughput is end to end over the training part of the run: tokens trained between
the first and the last report divided by the wall time between them (metrics.jsonl's ``time``, stamped by the
workers), so the checkpoint uploads, metrics writes and evaluations are inside it. Prints tokens/s of each run,
how much longer a log window that follows a checkpoint takes than one that does not (the checkpoint's save and
upload), and the s3/local ratio of each round (the two runs of a round ran back to back) and their median.
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
from orchestration.storage.testing import LoopbackS3


def config(output: str, steps: int, cache: str) -> PretrainConfig:
    return load_config(PretrainConfig, overrides=[
        "model=tgsmn-dense-tiny", "data.source=builtin", f"data.cache_dir={cache}", "workers=2",
        f"max_steps={steps}", "checkpoint_every=50", "log_every=25", f"eval_every={steps}", f"output={output}"])


def measure(output: str) -> tuple[float, float]:
    """Tokens per second between the first and the last training report of a run, and the mean extra seconds
    of a log window that follows a checkpoint (its upload) over one that does not."""
    rows = [r for r in read_metrics(output) if "loss" in r]
    first, last = rows[0], rows[-1]
    after = {True: [], False: []}
    for prev, row in zip(rows, rows[1:]):
        after["checkpoint" in prev].append(row["time"] - prev["time"])
    extra = statistics.mean(after[True]) - statistics.mean(after[False])
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]), extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    with LoopbackS3(bucket="bench") as s3:
        os.environ.update(s3.env)  # before Ray starts, so its workers inherit them
        from orchestration.runtime import ensure_ray

        ensure_ray()
        cache = str(tmp / "cache")
        pretrain(config(str(tmp / "warmup"), 20, cache))  # tokenizer, shards, worker start-up paths warmed once
        results: dict[str, list[float]] = {"local": [], "s3": []}
        for r in range(args.rounds):
            order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
            for kind in order:
                output = str(tmp / f"local-{r}") if kind == "local" else s3.uri(f"run-{r}")
                pretrain(config(output, args.steps, cache))
                rate, extra = measure(output)
                results[kind].append(rate)
                print(f"round {r} {kind:5s}: {rate:,.0f} tok/s; a window after a checkpoint takes {extra:+.2f} s "
                      "more", flush=True)
    print(f"\n{args.steps} steps per run, checkpoint every 50, {args.rounds} rounds:")
    for r, (a, b) in enumerate(zip(results["local"], results["s3"])):
        print(f"round {r}: local {a:,.0f} tok/s, s3 {b:,.0f} tok/s, s3/local {b / a:.3f}")
    ratios = [b / a for a, b in zip(results["local"], results["s3"])]
    print(f"median over rounds: local {statistics.median(results['local']):,.0f} tok/s, s3 "
          f"{statistics.median(results['s3']):,.0f} tok/s; s3/local per round, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
