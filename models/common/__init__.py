"""Layers shared by every model family: attention with KV cache, RoPE, norms, sampling."""
