"""Cost of the continual runner's training signals, as a fraction of the training step.

Three loops on the same model, data and batches, interleaved rep by rep (the machine is shared, so only
ratios measured side by side mean anything):

- ``bare``: forward with targets, backward, clip, AdamW step: the step with no signals at all;
- ``runner``: ``ContinualRunner.run_interval`` with replay off: per-row losses, loss fluctuation, EMA, gradient
  norm, routing stats every step, and the statistical-distance probe (2 eval forwards on probe_rows rows) on the
  last step of each interval;
- ``source-probe``: the bare step plus the original TG-SMN code's loss-fluctuation probe, 3 extra no-grad noisy
  forwards of the whole batch before every step (the std of their losses), for contrast.

It also prints the runner's own account of time spent inside signal code (``IntervalResult.signal_s``).

    python bench/bench_continual.py                                   # tgsmn-sparse-small, batch 32 x 64
    python bench/bench_continual.py --model tgsmn-sparse-tiny --batch-size 16 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from orchestration.allocator import keep_freed_memory
from orchestration.config import load_config
from orchestration.continual.runner import ContinualConfig, ContinualRunner
from orchestration.continual.control import Knobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tgsmn-sparse-small")
    p.add_argument("--data", default="builtin", help="corpus (builtin, or a local path such as ../shared/data/wikitext2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--interval", type=int, default=10, help="control_interval (the runner's default is 10)")
    p.add_argument("--reps", type=int, default=3, help="intervals timed per loop")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every training process of memtrain does (orchestration/allocator.py)
    cfg = load_config(ContinualConfig, overrides=[
        f"model={args.model}", f"data.source={args.data}", f"data.seq_len={args.seq_len}",
        f"batch_size={args.batch_size}", f"control_interval={args.interval}", "stream.n_tasks=2",
        f"max_steps_per_task={args.interval * (2 * args.reps + 4)}"])
    runner = ContinualRunner(cfg)
    runner.reset()
    knobs = Knobs(k=2, replay_ratio=0.0, router_noise=0.3, router_temperature=1.0)
    model, opt = runner.model, runner.optimizer
    B = args.batch_size

    def bare(extra_forwards: int) -> float:
        # the same batches the runner reads next (its data position does not move: these steps are extra)
        x_BT, y_BT = runner._new_rows(runner.state.task_samples, B)
        start = time.perf_counter()
        for _ in range(args.interval):
            loss = model(x_BT, y_BT).loss
            if extra_forwards:
                with torch.no_grad():
                    for _ in range(extra_forwards):
                        model(x_BT, y_BT)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    runner.run_interval(knobs)  # warm-up of every path
    bare(0)
    bare(3)
    times = {"bare": [], "runner": [], "source-probe": []}
    signal_fracs = []
    for _ in range(args.reps):
        times["bare"].append(bare(0))
        result = runner.run_interval(knobs)
        times["runner"].append(result.wall_s)
        signal_fracs.append(result.signal_s / result.wall_s)
        times["source-probe"].append(bare(3))
    tokens = args.interval * B * args.seq_len
    base = statistics.median(times["bare"])
    print(f"{args.model}, batch {B} x {args.seq_len}, control_interval {args.interval}, {args.threads} threads, "
          f"{args.reps} reps")
    # the minimum is the least disturbed by other processes on a shared machine; the median is shown too
    best = min(times["bare"])
    print("| loop | s / interval (median) | vs bare (median) | s / interval (min) | vs bare (min) | tokens/s (min) |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        med, low = statistics.median(values), min(values)
        print(f"| {name} | {med:.3f} | {100 * (med / base - 1):+.1f}% | {low:.3f} | {100 * (low / best - 1):+.1f}% "
              f"| {tokens / low:,.0f} |")
    print(f"time inside signal code (runner's own account): {100 * statistics.median(signal_fracs):.1f}% of the "
          f"interval")


if __name__ == "__main__":
    main()
