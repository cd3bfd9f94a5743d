"""Attention in fp32 on CPU under bf16 autocast, side by side with the bf16 attention it replaced.

    python bench/bench_attention_dtype.py

``CausalSelfAttention`` on CPU casts q, k, v to fp32 once after the QKV projection, rotates them with a complex
multiply (RoPE) and runs the SDPA kernel with autocast switched off. The reference is the attention before it
(reproduced below): RoPE as eight strided elementwise ops in bf16, then the SDPA kernel on bf16 inputs. Alone, the
causal SDPA flash kernel runs forward + backward 2-3.5x faster on fp32 inputs than on bf16 ones (torch 2.13, AMX
host). Autocast casts SDPA's inputs to bf16, so a plain ``.float()`` before the call changes nothing: the first
version of this bench measured exactly that and found no gain.

Prints the bf16 training step time of hmst-micro at the pipeline's per-worker shape (8 x 128, vocabulary 1,024,
1 thread), hmst-tiny (16 x 128) and hmst-source-tiny (8 x 128) on 2 threads, the two attentions interleaved, with
the median of the paired ratios.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from timing import paired_bf16_steps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common import attention  # noqa: E402

MODEL_FORWARD = attention.CausalSelfAttention.forward


def bf16_rope(rope: attention.RotaryEmbedding, x_BHTD: torch.Tensor) -> torch.Tensor:
    """The real-valued RoPE the model used before, in x's dtype."""
    T = x_BHTD.size(2)
    cos_TF, sin_TF = rope.cos_SF[:T].to(x_BHTD.dtype), rope.sin_SF[:T].to(x_BHTD.dtype)
    x1, x2 = x_BHTD[..., 0::2], x_BHTD[..., 1::2]
    return torch.stack((x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF), dim=-1).flatten(-2)


def bf16_forward(self, x_BTD: torch.Tensor, layer: int = 0, cache=None) -> torch.Tensor:
    """The training path of CausalSelfAttention.forward before the change: everything in autocast's bf16."""
    B, T, D = x_BTD.shape
    q_BHTD, k_BHTD, v_BHTD = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q_BHTD, k_BHTD = bf16_rope(self.rope, q_BHTD), bf16_rope(self.rope, k_BHTD)
    y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True)
    return self.proj(y_BHTD.transpose(1, 2).reshape(B, T, D))


def main() -> None:
    def use(name: str) -> None:
        attention.CausalSelfAttention.forward = bf16_forward if name == "bf16 attention" else MODEL_FORWARD
    paired_bf16_steps(use, "bf16 attention", "fp32 attention", "the model's attention against the bf16 one")


if __name__ == "__main__":
    main()
