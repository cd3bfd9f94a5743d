"""Gradient clipping folded into the fused AdamW pass, side by side with clip_grad_norm_ then step.

    python bench/bench_clip_fold.py

A bf16 training step of hmst-source-tiny (8 x 128, 82M parameters): forward, backward, then either
``clip_grad_norm_(params, 1.0)`` and ``optimizer.step()`` (a pass that scales every gradient, then the optimizer's
pass), or ``orchestration.training.pretrain.clipped_step`` (the norm, then one fused pass that divides each
gradient by the clip coefficient as it reads it). Interleaved repeats; prints the medians and the median of the
paired ratios.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
from timing import interleaved

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.registry import build_model  # noqa: E402
from orchestration.allocator import keep_freed_memory  # noqa: E402
from orchestration.training.pretrain import clipped_step  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    keep_freed_memory()  # as every training process of memtrain does
    torch.manual_seed(0)
    model = build_model("hmst-source-tiny")
    ids_BT = torch.randint(0, model.cfg.vocab_size, (8, 129))
    params = list(model.parameters())

    def variant(folded: bool):
        optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids_BT[:, :-1], ids_BT[:, 1:])
            out.loss.backward()
            if folded:
                clipped_step(optimizer, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    print(f"torch {torch.__version__}, 2 threads, load average at start {os.getloadavg()[0]:.1f}\n")
    times = interleaved({"clip_grad_norm_ + step": variant(False), "clipped_step": variant(True)}, 9, warmup=2)
    ratio = statistics.median(a / b for a, b in zip(times["clip_grad_norm_ + step"], times["clipped_step"]))
    print("| bf16 step of hmst-source-tiny, 8 x 128 | median (ms) |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds) * 1e3:.0f} |")
    print(f"| **clip_grad_norm_ + step / clipped_step** (median of paired ratios) | **{ratio:.3f}** |")


if __name__ == "__main__":
    main()
