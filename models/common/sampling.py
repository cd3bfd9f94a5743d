"""Next-token sampling (greedy, temperature, top-k, top-p) and the generation loop shared by every family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from models.common.errors import ModelError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    """How many tokens to generate after the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."""
    seed: int | None = None
    """Seed of the sampling generator, for reproducible samples."""

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ModelError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ModelError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ModelError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ModelError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits_BV``; returns token ids of shape (B,)."""
    if cfg.temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits_BV.size(-1):
        kth_B1 = logits_BV.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(dim=-1)) >= cfg.top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


class StepModel(Protocol):
    """What ``generate`` needs: a fresh inference state, and a step that consumes tokens and updates it."""

    def new_state(self, batch_size: int, max_len: int) -> Any: ...

    def step(self, input_ids_BT: torch.Tensor, state: Any) -> torch.Tensor:  # returns logits_BTV
        ...


@torch.inference_mode()
def generate(model: StepModel, prompt_ids_BT: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Generate ``cfg.max_new_tokens`` tokens after the prompt; returns only the new tokens, shape (B, N).

    Example::

        >>> from models.registry import build_model
        >>> model = build_model("tgsmn-dense-tiny", vocab_size=256).eval()
        >>> new = generate(model, torch.tensor([[1, 2, 3]]), SamplingConfig(max_new_tokens=5, temperature=0))
        >>> new.shape
        torch.Size([1, 5])
    """
    if prompt_ids_BT.dim() != 2 or prompt_ids_BT.size(1) == 0:
        raise ModelError(f"prompt must be a non-empty (batch, length) tensor of token ids, got shape "
                         f"{tuple(prompt_ids_BT.shape)}")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=prompt_ids_BT.device).manual_seed(cfg.seed)
    state = model.new_state(prompt_ids_BT.size(0), prompt_ids_BT.size(1) + cfg.max_new_tokens)
    # preallocated, so a long stream from a constant-memory model (THL) stays constant-memory
    new_BN = prompt_ids_BT.new_zeros((prompt_ids_BT.size(0), cfg.max_new_tokens))
    if cfg.max_new_tokens == 0:
        return new_BN
    logits_BTV = model.step(prompt_ids_BT, state)
    for i in range(cfg.max_new_tokens):
        new_BN[:, i] = sample_next(logits_BTV[:, -1], cfg, generator)
        if i + 1 < cfg.max_new_tokens:  # the last token needs no forward pass of its own
            logits_BTV = model.step(new_BN[:, i:i + 1], state)
    return new_BN
