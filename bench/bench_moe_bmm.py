"""MoE experts as one batched matmul per projection against one matmul per expert, side by side.

    python bench/bench_moe_bmm.py

``MoELayer`` pads every expert's row block to the largest one when that adds at most ``EQUAL_BLOCKS_MAX_ROWS``
of rows, and ``_ExpertFFN`` then runs each projection, forward and backward, as one ``bmm`` over the experts
(6 calls per layer instead of 6 per expert). The reference sets the threshold to 0 (blocks as they are, one
matmul per expert). Prints the bf16 training step of hmst-micro at the pipeline's per-worker shape (8 x 128,
vocabulary 1,024, 1 thread), hmst-tiny (16 x 128) and hmst-source-tiny (8 x 128) on 2 threads, interleaved, with
the median of the paired ratios.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
from timing import interleaved, lm_train_step

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common import moe  # noqa: E402
from models.registry import build_model  # noqa: E402
from orchestration.allocator import keep_freed_memory  # noqa: E402

THRESHOLD = moe.EQUAL_BLOCKS_MAX_ROWS


def main() -> None:
    keep_freed_memory()  # as every training process of memtrain does
    print(f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}; equal blocks while they add "
          f"at most {THRESHOLD - 1:.0%} rows\n")
    print("| model, batch, threads | per-expert matmuls step (ms) | batched matmuls step (ms) | speedup |")
    print("|---|---|---|---|")
    for shape, batch, threads, vocab, repeats in (("hmst-micro", 8, 1, 1024, 15), ("hmst-tiny", 16, 2, None, 9),
                                                  ("hmst-source-tiny", 8, 2, None, 7)):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_model(shape, **({"vocab_size": vocab} if vocab else {}))
        step = lm_train_step(model, torch.randint(0, model.cfg.vocab_size, (batch, 129)), bf16=True)

        def variant(threshold: float):
            def run():
                moe.EQUAL_BLOCKS_MAX_ROWS = threshold
                step()
            return run
        times = interleaved({"loop": variant(0.0), "bmm": variant(THRESHOLD)}, repeats, warmup=3)
        moe.EQUAL_BLOCKS_MAX_ROWS = THRESHOLD
        ratio = statistics.median(a / b for a, b in zip(times["loop"], times["bmm"]))
        print(f"| {shape}, {batch} x 128, {threads} | {statistics.median(times['loop']) * 1e3:.0f} | "
              f"{statistics.median(times['bmm']) * 1e3:.0f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
