"""Causal self-attention on top of ``F.scaled_dot_product_attention``, rotary positions, and a static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    Preallocation keeps a decode step O(context) with no reallocation, so a step at 2048 tokens of context
    costs about what a step at 128 does (the attention read is small next to the matmuls).
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.k_LBHSD = torch.zeros(shape, device=device, dtype=dtype)
        self.v_LBHSD = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions already written (the same for every layer once a forward has finished)

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values of ``layer`` and return all keys/values up to and including them."""
        start, end = self.length, self.length + k_BHTD.size(2)
        if end > self.max_len:
            raise ModelError(f"KV cache is full: {end} positions requested, {self.max_len} allocated; "
                             "allocate a larger cache (max_len) or shorten the prompt plus max_new_tokens")
        self.k_LBHSD[layer, :, :, start:end] = k_BHTD
        self.v_LBHSD[layer, :, :, start:end] = v_BHTD
        return self.k_LBHSD[layer, :, :, :end], self.v_LBHSD[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) with cos/sin tables precomputed for ``max_seq_len`` positions."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ModelError(f"RoPE needs an even head dimension, got {head_dim}; change d_model or n_heads")
        inv_freq_F = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles_SF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq_F)
        self.register_buffer("cos_SF", angles_SF.cos(), persistent=False)
        self.register_buffer("sin_SF", angles_SF.sin(), persistent=False)

    def forward(self, x_BHTD: torch.Tensor, start: int) -> torch.Tensor:
        """``x_BHTD`` rotated by the angles of positions ``start ..``; computed in fp32, returned in x's dtype.

        Each (even, odd) pair of a head is one complex number, so the rotation is one complex multiply: one
        kernel forward and one backward, where the real-valued form costs eight strided elementwise ops.
        """
        T = x_BHTD.size(2)
        rotation_TF = torch.complex(self.cos_SF[start:start + T].float(), self.sin_SF[start:start + T].float())
        pairs_BHTF = torch.view_as_complex(x_BHTD.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs_BHTF * rotation_TF).flatten(-2).to(x_BHTD.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; one fused QKV projection; optional RoPE; reads/writes a ``KVCache``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool, rope: RotaryEmbedding | None):
        super().__init__()
        if d_model % n_heads:
            raise ModelError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.rope = rope

    def forward(self, x_BTD: torch.Tensor, layer: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv_BTC = self.qkv(x_BTD)
        out_dtype = qkv_BTC.dtype  # bf16 under bf16 autocast: what the output projection takes
        # On CPU attention runs in fp32 even under bf16 autocast: torch's CPU flash kernel is 2-3.5x slower on
        # bf16 inputs than on fp32 ones (torch 2.13, AMX host), and CPU autocast would cast fp32 inputs back to
        # bf16, so it is switched off around the kernel (which leaves GPU autocast alone). On GPUs the bf16
        # kernels are the fast ones.
        if x_BTD.device.type == "cpu":
            qkv_BTC = qkv_BTC.float()
        q_BHTD, k_BHTD, v_BHTD = qkv_BTC.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        start = cache.length if cache is not None else 0
        if self.rope is not None:
            q_BHTD, k_BHTD = self.rope(q_BHTD, start), self.rope(k_BHTD, start)
        if cache is not None:  # the cache holds the model's dtype; attention reads it in this pass's dtype
            k_BHSD, v_BHSD = (t.to(q_BHTD.dtype) for t in cache.update(layer, k_BHTD, v_BHTD))
        else:
            k_BHSD, v_BHSD = k_BHTD, v_BHTD
        dropout = self.dropout if self.training else 0.0
        with torch.autocast("cpu", enabled=False):
            if start == 0:
                y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, dropout_p=dropout, is_causal=True)
            elif T == 1:  # one new token attends to the whole cache: no mask needed
                y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, dropout_p=dropout)
            else:  # a chunk appended to a non-empty cache: query i sees keys 0 .. start + i
                mask_TS = torch.ones(T, start + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=start)
                y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask_TS,
                                                        dropout_p=dropout)
        return self.proj(y_BHTD.to(out_dtype).transpose(1, 2).reshape(B, T, D))
