"""HMST's base language model: the shared Transformer backbone with a top-k MoE FFN and an early-exit head.

What differs from the original HMST code and why:

- experts are dispatched by one sort per layer (``models.common.moe``), not a Python loop over (choice, expert);
- the load-balancing loss uses the top-k dispatch fractions, takes its weight from the config and is averaged
  over layers (the original hard-coded 0.01, used top-1 fractions and summed over layers); a router z-loss and
  optional auxiliary-loss-free bias balancing are added;
- attention is SDPA with RoPE and a real K/V cache (the original cached normed hidden states and re-projected the
  whole context every decode step);
- an early-exit head after ``exit_layer`` blocks is trained jointly with a small weight, so the inference engine's
  "early exit" really skips the remaining blocks (the original's early exit ran the full model);
- total and active parameter counts come from the model (``num_params``, ``active_params``: each MoE layer
  contributes ``top_k / n_experts`` of its expert parameters), not from a hard-coded 2/8 ratio.

Example::

    >>> import torch
    >>> from models.registry import build_model
    >>> model = build_model("hmst-micro", vocab_size=256)
    >>> ids_BT = torch.randint(0, 256, (2, 16))
    >>> out = model(ids_BT, targets_BT=ids_BT)     # training: the fused loss, logits not materialised
    >>> out.logits is None, out.loss.dim()
    (True, 0)
    >>> model(ids_BT).logits.shape
    torch.Size([2, 16, 256])
    >>> model.active_params() < model.num_params()
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.common.attention import KVCache
from models.common.errors import ModelError
from models.common.moe import MoELayer
from models.common.output import LMOutput
from models.common.transformer import TransformerConfig, TransformerLM, head_and_loss


@dataclass
class HMSTConfig(TransformerConfig):
    """The HMST MoE LM: the backbone's fields (see ``TransformerConfig``) plus routing and early exit."""

    n_experts: int = 4
    """Experts per MoE layer."""
    top_k: int = 2
    """Experts each token is routed to (1 <= top_k <= n_experts)."""
    capacity_factor: float = 0.0
    """Expert capacity as a multiple of the balanced load N*top_k/n_experts; 0 = unlimited (no dropped tokens)."""
    balance_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss (averaged over layers; equals this weight at perfect balance)."""
    z_loss_weight: float = 1e-3
    """Weight of the router z-loss (averaged over layers)."""
    bias_balance_rate: float = 0.0
    """Step of the auxiliary-loss-free selection-bias update per training forward; 0 = off."""
    exit_layer: int = 2
    """Blocks before the early-exit head (0 = no exit head); must be below n_layers."""
    exit_loss_weight: float = 0.1
    """Weight of the early-exit head's cross-entropy in the training loss."""
    exit_loss_every: int = 8
    """Train the exit head on every n-th position only: it shares the vocabulary-wide output matrix, so on all
    positions it would cost as much as the main head; a strided subset gives the same expected loss."""

    def __post_init__(self):
        super().__post_init__()
        if self.n_experts < 1:
            raise ModelError(f"n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ModelError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}; "
                             "lower top_k or raise n_experts")
        if self.capacity_factor < 0:
            raise ModelError(f"capacity_factor must be >= 0 (0 = no limit), got {self.capacity_factor}")
        for name in ("balance_loss_weight", "z_loss_weight", "bias_balance_rate", "exit_loss_weight"):
            if getattr(self, name) < 0:
                raise ModelError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.exit_layer < self.n_layers:
            raise ModelError(f"exit_layer must be in [0, n_layers={self.n_layers}) (0 = no exit head), "
                             f"got {self.exit_layer}")
        if self.exit_loss_every < 1:
            raise ModelError(f"exit_loss_every must be >= 1, got {self.exit_loss_every}")


class HMSTLM(TransformerLM):
    """Decoder-only MoE LM with an optional early-exit head; follows the ``LMOutput`` contract."""

    def __init__(self, cfg: HMSTConfig):
        super().__init__(cfg, make_ffn=lambda layer: MoELayer(
            cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, capacity_factor=cfg.capacity_factor,
            balance_loss_weight=cfg.balance_loss_weight, z_loss_weight=cfg.z_loss_weight,
            bias_balance_rate=cfg.bias_balance_rate, activation=cfg.activation, dropout=cfg.dropout,
            loss_scale=1.0 / cfg.n_layers))
        # the backbone's depth-scaled init of residual output projections, for the experts' down projections
        for moe in self.moe_layers():
            nn.init.normal_(moe.down_EFD, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        # the exit head reuses the output matrix; only its norm is new (the last block's norm_out is not
        # appropriate for shallow features)
        self.norm_exit = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if cfg.exit_layer else None

    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks]

    def set_expert_bias(self, bias: torch.Tensor | None) -> None:
        """Inference hook: add ``bias`` (shape (E,) or (B, E)) to every layer's router logits; None clears it.

        Example::

            >>> from models.registry import build_model
            >>> model = build_model("hmst-micro", vocab_size=64)
            >>> model.set_expert_bias(torch.tensor([5.0, 0.0, 0.0, 0.0]))   # favour expert 0 everywhere
            >>> model.set_expert_bias(None)
        """
        for moe in self.moe_layers():
            moe.set_expert_bias(bias)

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, exit_early: bool = False) -> LMOutput:
        """Logits of the full model, or of the exit head alone when ``exit_early`` (later blocks are skipped).

        With targets, ``loss`` = main cross-entropy + ``aux_loss``, where ``aux_loss`` = MoE balance and z terms
        (averaged over layers) + ``exit_loss_weight`` x the exit head's cross-entropy; ``lm_loss`` stays the
        main cross-entropy.
        """
        cfg = self.cfg
        if exit_early and not cfg.exit_layer:
            raise ModelError("this model has no early-exit head (exit_layer=0); build it with exit_layer >= 1")
        n_blocks = cfg.exit_layer if exit_early else cfg.n_layers
        x_BTD, exit_BTD, aux_loss, stats = self.run_blocks(input_ids_BT, cache, n_blocks, capture_after=cfg.exit_layer)

        logits_BTV, loss = head_and_loss(self.head, (self.norm_exit if exit_early else self.norm_out)(x_BTD),
                                         targets_BT)
        if targets_BT is None:
            return LMOutput(logits=logits_BTV, aux_loss=aux_loss, stats=stats)

        if cfg.exit_layer and not exit_early and cfg.exit_loss_weight > 0:
            every = cfg.exit_loss_every
            _, exit_loss = head_and_loss(self.head, self.norm_exit(exit_BTD[:, every - 1::every]),
                                         targets_BT[:, every - 1::every])
            aux_loss = aux_loss + cfg.exit_loss_weight * exit_loss
            stats["hmst/exit_loss"] = exit_loss.detach()
        return LMOutput(logits=logits_BTV, loss=loss + aux_loss, aux_loss=aux_loss, stats=stats)

    def early_exit(self) -> "EarlyExitLM":
        """This model truncated at the exit head, as a ``generate``-compatible step model (shares weights)."""
        if not self.cfg.exit_layer:
            raise ModelError("this model has no early-exit head (exit_layer=0); build it with exit_layer >= 1")
        return EarlyExitLM(self)

    # --- accounting ---
    def active_ffn_params(self) -> int:
        return sum(moe.active_matmul_params() for moe in self.moe_layers())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token with only the *active* experts counted, plus the strided exit-head loss."""
        flops = super().flops_per_token(seq_len)
        if self.cfg.exit_layer and self.cfg.exit_loss_weight > 0:
            flops += 6 * self.cfg.d_model * self.cfg.vocab_size / self.cfg.exit_loss_every
        return flops


class EarlyExitLM:
    """The first ``exit_layer`` blocks and the exit head of an ``HMSTLM``, with its own (shallower) KV cache.

    A cache filled by the exit path has no keys/values for the deeper blocks, so the exit path and the full path
    never share a cache.

    Example::

        >>> from models.common.sampling import SamplingConfig, generate
        >>> from models.registry import build_model
        >>> model = build_model("hmst-micro", vocab_size=64).eval()
        >>> generate(model.early_exit(), torch.tensor([[1, 2]]), SamplingConfig(max_new_tokens=3, temperature=0)).shape
        torch.Size([1, 3])
    """

    def __init__(self, model: HMSTLM):
        self.model = model

    def new_state(self, batch_size: int, max_len: int) -> KVCache:
        cfg, p = self.model.cfg, self.model.tok_emb.weight
        return KVCache(cfg.exit_layer, batch_size, cfg.n_heads, min(max_len, cfg.max_seq_len),
                       cfg.d_model // cfg.n_heads, device=p.device, dtype=p.dtype)

    def step(self, input_ids_BT: torch.Tensor, state: KVCache) -> torch.Tensor:
        return self.model(input_ids_BT, cache=state, exit_early=True).logits


PRESETS: dict[str, dict] = {
    # unit tests and the laptop pipeline: ~2.4M total / ~1.8M active parameters at an 8k vocabulary
    "hmst-micro": dict(d_model=128, n_layers=4, n_heads=4, d_ff=256, n_experts=4, top_k=2, exit_layer=1,
                       max_seq_len=256),
    # pretrains on 2 CPU cores in a few minutes (~16M total / ~10M active at an 8k vocabulary)
    "hmst-tiny": dict(d_model=256, n_layers=6, n_heads=4, d_ff=1024, n_experts=4, top_k=2, exit_layer=2,
                      max_seq_len=512),
    # the original HMST code's "tiny" shape, GPT-2 vocabulary plus <pad>: the benchmark shape of issue 4
    "hmst-source-tiny": dict(vocab_size=50258, d_model=512, n_layers=6, n_heads=8, d_ff=2048, n_experts=4,
                             top_k=2, exit_layer=2, max_seq_len=2048),
    # GPU-sized
    "hmst-small": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, n_experts=8, top_k=2, exit_layer=4,
                       max_seq_len=2048),
    "hmst-base": dict(d_model=2048, n_layers=24, n_heads=16, d_ff=8192, n_experts=8, top_k=2, exit_layer=6,
                      max_seq_len=4096),
    "hmst-large": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=16384, n_experts=16, top_k=2, exit_layer=8,
                       max_seq_len=8192),
}

CONFIG_CLASS = HMSTConfig


def build(cfg: HMSTConfig) -> HMSTLM:
    return HMSTLM(cfg)
