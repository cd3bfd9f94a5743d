"""The bf16 head's softmax in one low-precision kernel against an fp32 log-softmax, side by side.

    python bench/bench_loss_bf16.py

With bf16 logits, ``linear_cross_entropy`` takes the gradient (softmax - one-hot) from one softmax kernel that reads
bf16 and writes bf16, computing in fp32 inside; the target's entry and log-probability come from the row's other
entries (see ``models/common/losses.py``). The reference is the code it replaced, reproduced here: an fp32
log-softmax of the bf16 logits, exp in place, one-hot subtracted, cast back to bf16. Prints the bf16 training step
of hmst-micro at the pipeline's per-worker shape (8 x 128, vocabulary 1,024, 1 thread), hmst-tiny (16 x 128) and
hmst-source-tiny (8 x 128, vocabulary 50,258) on 2 threads, interleaved, with the median of the paired ratios.
"""

from __future__ import annotations

import os
import sys

import torch
from timing import paired_bf16_steps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common import losses  # noqa: E402

BF16_SOFTMAX = losses._target_logp_and_logit_grad


def fp32_log_softmax(logits_CV: torch.Tensor, t_C1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss chunk before: log-softmax in fp32, its exp turned into the gradient in place, cast back."""
    logp_CV = torch.log_softmax(logits_CV, dim=-1, dtype=torch.float32)
    logp_t_C1 = logp_CV.gather(1, t_C1)
    g_CV = logp_CV.exp_().scatter_add_(1, t_C1, torch.full_like(t_C1, -1.0, dtype=logp_CV.dtype))
    return logp_t_C1, g_CV.to(logits_CV.dtype)


def main() -> None:
    def use(name: str) -> None:
        losses._target_logp_and_logit_grad = fp32_log_softmax if name == "fp32 log-softmax" else BF16_SOFTMAX
    paired_bf16_steps(use, "fp32 log-softmax", "bf16 softmax", "the head's softmax and gradient for bf16 logits")


if __name__ == "__main__":
    main()
