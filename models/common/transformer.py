"""A decoder-only Transformer backbone whose feed-forward layer is pluggable (dense MLP, MoE, sparse experts).

The dense TG-SMN LM is this backbone with ``MLP``; the HMST and TG-SMN sparse models pass their own FFN.
Every FFN returns ``(y_BTD, aux_loss or None, stats)`` so routing losses and diagnostics flow to ``LMOutput``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.common.attention import CausalSelfAttention, KVCache, RotaryEmbedding
from models.common.errors import ModelError
from models.common.losses import linear_cross_entropy
from models.common.output import LMOutput

FFNOutput = tuple[torch.Tensor, torch.Tensor | None, dict]


@dataclass
class TransformerStackConfig:
    """A stack of Transformer blocks over a token vocabulary: the fields the LM backbone (``TransformerConfig``)
    and the HMST critic's encoder (``models.hmst.critic.CriticConfig``) share."""

    vocab_size: int = 8192
    """Size of the token vocabulary (set from the tokenizer at train time)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (d_model must be divisible by it)."""
    d_ff: int = 1024
    """Hidden width of the feed-forward layer."""
    max_seq_len: int = 512
    """Longest sequence the position tables cover (for an LM: prompt plus generated tokens)."""
    dropout: float = 0.0
    """Dropout on attention probabilities, attention output and FFN output."""

    def __post_init__(self):
        name = type(self).__name__
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise ModelError(f"{name}.{field} must be positive, got {getattr(self, field)}")
        if self.d_model % self.n_heads:
            raise ModelError(f"{name}.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"{name}.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TransformerConfig(TransformerStackConfig):
    """The decoder-only LM backbone: the stack's fields plus positions, head tying, biases and the FFN activation."""

    pos_encoding: str = "rope"
    """Positions: "rope" (rotary, relative) or "learned" (absolute embedding table)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    bias: bool = False
    """Use biases in the linear layers and norms."""
    activation: str = "gelu"
    """FFN non-linearity: "gelu" or "relu"."""

    def __post_init__(self):
        super().__post_init__()
        if self.pos_encoding not in ("rope", "learned"):
            raise ModelError(f"pos_encoding must be 'rope' or 'learned', got {self.pos_encoding!r}")
        if self.activation not in ("gelu", "relu"):
            raise ModelError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")


class MLP(nn.Module):
    """The dense feed-forward layer: Linear -> activation -> Linear."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float, bias: bool):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.act = F.gelu if activation == "gelu" else F.relu
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> FFNOutput:
        return self.dropout(self.down(self.act(self.up(x_BTD)))), None, {}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: TransformerConfig, ffn: nn.Module, rope: RotaryEmbedding | None):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias, rope)
        self.norm_ffn = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ffn = ffn
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, layer: int, cache: KVCache | None) -> FFNOutput:
        x_BTD = x_BTD + self.resid_dropout(self.attn(self.norm_attn(x_BTD), layer, cache))
        y_BTD, aux_loss, stats = self.ffn(self.norm_ffn(x_BTD))
        return x_BTD + y_BTD, aux_loss, stats


def head_and_loss(head: nn.Linear, x_BTD: torch.Tensor,
                  targets_BT: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(logits, mean cross-entropy)`` of a bias-free head; when training (targets given, grad enabled) the loss
    comes from the fused ``linear_cross_entropy`` and the logits are not materialised (None)."""
    if targets_BT is not None and torch.is_grad_enabled():
        return None, linear_cross_entropy(x_BTD.flatten(0, 1), head.weight, targets_BT.flatten())
    logits_BTV = head(x_BTD)
    if targets_BT is None:
        return logits_BTV, None
    return logits_BTV, F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())


class TransformerLM(nn.Module):
    """Decoder-only LM: embeddings, ``n_layers`` blocks with a pluggable FFN, final norm, (tied) head."""

    def __init__(self, cfg: TransformerConfig, make_ffn: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.cfg = cfg
        make_ffn = make_ffn or (lambda layer: MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout, cfg.bias))
        head_dim = cfg.d_model // cfg.n_heads
        # one rotary table shared by every block (buffers are not parameters, so sharing is free)
        rope = RotaryEmbedding(head_dim, cfg.max_seq_len) if cfg.pos_encoding == "rope" else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, make_ffn(i), rope) for i in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual output projections by depth so activations stay O(1) at init
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None) -> LMOutput:
        x_BTD, _, aux_loss, stats = self.run_blocks(input_ids_BT, cache)
        logits_BTV, loss = head_and_loss(self.head, self.norm_out(x_BTD), targets_BT)
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss
        return LMOutput(logits=logits_BTV, loss=loss, aux_loss=aux_loss, stats=stats)

    def run_blocks(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None, n_blocks: int | None = None,
                   capture_after: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict]:
        """Embed and run the first ``n_blocks`` blocks (all by default).

        Returns the residual stream before the final norm, the stream after block ``capture_after`` (or None),
        the summed auxiliary loss of the FFNs (None if they have none) and their stats averaged over the blocks run.
        """
        B, T = input_ids_BT.shape
        n_blocks = len(self.blocks) if n_blocks is None else n_blocks
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ModelError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                             "raise max_seq_len in the model config or feed shorter sequences")
        x_BTD = self.tok_emb(input_ids_BT)
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(torch.arange(start, start + T, device=input_ids_BT.device))
        x_BTD = self.emb_dropout(x_BTD)
        aux_terms, stats, captured_BTD = [], {}, None
        for layer in range(n_blocks):
            x_BTD, aux, layer_stats = self.blocks[layer](x_BTD, layer, cache)
            if aux is not None:
                aux_terms.append(aux)
            for key, value in layer_stats.items():
                stats[key] = stats.get(key, 0.0) + value / n_blocks
            if layer + 1 == capture_after:
                captured_BTD = x_BTD
        if cache is not None:
            cache.advance(T)
        aux_loss = torch.stack(aux_terms).sum() if aux_terms else None
        return x_BTD, captured_BTD, aux_loss, stats

    # --- generation protocol (models.common.sampling.generate) ---
    def new_state(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_heads, min(max_len, self.cfg.max_seq_len),
                       self.cfg.d_model // self.cfg.n_heads, device=p.device, dtype=p.dtype)

    def step(self, input_ids_BT: torch.Tensor, state: KVCache) -> torch.Tensor:
        return self(input_ids_BT, cache=state).logits

    # --- accounting ---
    def num_params(self) -> int:
        """Total parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token uses: everything except the FFN weights (experts) it is not routed to."""
        # active_ffn_params counts matmul weights only; FFN biases are used by every token and stay in
        ffn_matmul = sum(p.numel() for block in self.blocks for p in block.ffn.parameters() if p.dim() >= 2)
        return self.num_params() - ffn_matmul + self.active_ffn_params()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul parameters + attention scores (PaLM, App. B).

        Embedding lookups are not matmuls; the output head is. For sparse FFNs, override ``active_ffn_params``.
        """
        cfg = self.cfg
        per_block_attn = 4 * cfg.d_model * cfg.d_model
        matmul_params = cfg.n_layers * per_block_attn + self.active_ffn_params() + cfg.d_model * cfg.vocab_size
        attention = 6 * cfg.n_layers * seq_len * cfg.d_model  # PaLM's 12·L·T·d, halved by the causal mask
        return 6 * matmul_params + attention

    def active_ffn_params(self) -> int:
        """Matmul parameters one token passes through in all FFNs together."""
        return self.cfg.n_layers * 2 * self.cfg.d_model * self.cfg.d_ff
