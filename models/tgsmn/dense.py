"""TG-SMN's dense baseline: a pre-norm decoder-only Transformer (the shared backbone with a dense MLP).

The original TG-SMN code used sinusoidal positions, an untied head and ``nn.MultiheadAttention`` with a float
mask; we use the shared backbone (SDPA attention with a KV cache, RoPE, tied head by default), which is faster and
supports generation. ``tgsmn-dense-small`` keeps the original's shape (d_model 192, 4 layers, 4 heads, d_ff 768).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.common.transformer import TransformerConfig, TransformerLM


@dataclass
class DenseLMConfig(TransformerConfig):
    """Dense TG-SMN LM; every field is the backbone's (see ``TransformerConfig``)."""


PRESETS: dict[str, dict] = {
    # CPU-sized: ~1.8M parameters at an 8k vocabulary; trains in minutes on 2 cores
    "tgsmn-dense-tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=256),
    # the original TG-SMN code's shape, ReLU included
    "tgsmn-dense-small": dict(d_model=192, n_layers=4, n_heads=4, d_ff=768, max_seq_len=512, activation="relu"),
    # GPU-sized
    "tgsmn-dense-base": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_seq_len=1024),
    "tgsmn-dense-large": dict(d_model=1024, n_layers=16, n_heads=16, d_ff=4096, max_seq_len=2048),
}

CONFIG_CLASS = DenseLMConfig


def build(cfg: DenseLMConfig) -> TransformerLM:
    return TransformerLM(cfg)
