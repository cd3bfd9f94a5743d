"""Negative result kept: computing attention in fp32 under bf16 autocast on CPU, side by side with the bf16 kernel.

    python bench/bench_attention_dtype.py

Alone, the causal SDPA kernel at 8 x 8 heads x 128 x 64 runs forward + backward about 1.65x faster on fp32 inputs
than on bf16 ones (this host, torch 2.13). Inside a whole bf16 training step the casts of q, k, v and the output
cost more than that saves: this prints the step time of hmst-source-tiny (8 x 128) and hmst-tiny (16 x 128) with
the model's attention (bf16 kernel) against the same attention with fp32 inputs, interleaved, and the median of
the paired ratios.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F
from timing import interleaved, lm_train_step

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common import attention  # noqa: E402
from models.registry import build_model  # noqa: E402
from orchestration.allocator import keep_freed_memory  # noqa: E402

MODEL_FORWARD = attention.CausalSelfAttention.forward


def fp32_forward(self, x_BTD: torch.Tensor, layer: int = 0, cache=None) -> torch.Tensor:
    """The training path of CausalSelfAttention.forward with q, k, v cast to fp32 for the kernel."""
    B, T, D = x_BTD.shape
    q_BHTD, k_BHTD, v_BHTD = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if self.rope is not None:
        q_BHTD, k_BHTD = self.rope(q_BHTD, 0), self.rope(k_BHTD, 0)
    y_BHTD = F.scaled_dot_product_attention(q_BHTD.float(), k_BHTD.float(), v_BHTD.float(), is_causal=True)
    return self.proj(y_BHTD.to(q_BHTD.dtype).transpose(1, 2).reshape(B, T, D))


def step_of(shape: str, batch: int):
    torch.manual_seed(0)
    model = build_model(shape)
    step = lm_train_step(model, torch.randint(0, model.cfg.vocab_size, (batch, 129)), bf16=True)

    def variant(forward):
        def run():
            attention.CausalSelfAttention.forward = forward
            step()
        return run
    return variant


def main() -> None:
    torch.set_num_threads(2)
    keep_freed_memory()  # as every training process of memtrain does
    print(f"torch {torch.__version__}, 2 threads, load average at start {os.getloadavg()[0]:.1f}\n")
    print("| model, batch | bf16 step, bf16 kernel (ms) | bf16 step, fp32 kernel (ms) | bf16 kernel / fp32 kernel |")
    print("|---|---|---|---|")
    for shape, batch in (("hmst-source-tiny", 8), ("hmst-tiny", 16)):
        variant = step_of(shape, batch)
        times = interleaved({"bf16": variant(MODEL_FORWARD), "fp32": variant(fp32_forward)}, 7, warmup=2)
        attention.CausalSelfAttention.forward = MODEL_FORWARD
        ratio = statistics.median(a / b for a, b in zip(times["bf16"], times["fp32"]))
        print(f"| {shape}, {batch} x 128 | {statistics.median(times['bf16']) * 1e3:.0f} | "
              f"{statistics.median(times['fp32']) * 1e3:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
