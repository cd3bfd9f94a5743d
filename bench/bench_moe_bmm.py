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
import sys

from timing import paired_bf16_steps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common import moe  # noqa: E402

THRESHOLD = moe.EQUAL_BLOCKS_MAX_ROWS


def main() -> None:
    def use(name: str) -> None:
        moe.EQUAL_BLOCKS_MAX_ROWS = 0.0 if name == "per-expert matmuls" else THRESHOLD
    paired_bf16_steps(use, "per-expert matmuls", "batched matmuls",
                      f"equal blocks while they add at most {THRESHOLD - 1:.0%} rows")


if __name__ == "__main__":
    main()
