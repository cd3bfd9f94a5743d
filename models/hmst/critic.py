"""HMST's critic: reads [query | response | facts] and predicts whether the response is correct, and how sure it is.

Differences from the original HMST code: the padding mask is used in attention *and* in the pooling (the original
mean-pooled over padding too), the size follows a config (the original was always 206M parameters), the heads
return logits (losses use the numerically stable ``*_with_logits`` forms), and ``loss`` is what a training
command calls (the original never trained its critic).

Example::

    >>> import torch
    >>> critic = Critic(CriticConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    >>> batch = pack_segments([([1, 2], [3], [4, 5, 6]), ([7], [8, 9], [])], max_len=16)
    >>> out = critic(*batch)
    >>> out.correct_logit_B.shape, bool(((out.confidence() >= 0) & (out.confidence() <= 1)).all())
    (torch.Size([2]), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.transformer import TransformerStackConfig

QUERY, RESPONSE, FACTS = 0, 1, 2  # segment ids


@dataclass
class CriticConfig(TransformerStackConfig):
    """Size of the critic encoder: the stack's fields (see ``TransformerStackConfig``), where ``max_seq_len`` is
    the longest packed [query | response | facts] sequence."""

    dropout: float = 0.1
    """Dropout inside the encoder layers; 0.1 is ``nn.TransformerEncoderLayer``'s own default."""


@dataclass
class CriticOutput:
    correct_logit_B: torch.Tensor
    """Logit of P(the response is correct given the query and facts)."""
    confidence_logit_B: torch.Tensor
    """Logit of P(the correctness prediction itself is right): the critic's self-assessed reliability."""

    def correctness(self) -> torch.Tensor:
        return torch.sigmoid(self.correct_logit_B)

    def confidence(self) -> torch.Tensor:
        return torch.sigmoid(self.confidence_logit_B)


def pack_segments(examples: list[tuple[list[int], list[int], list[int]]], max_len: int,
                  pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids_BT, segments_BT, mask_BT)`` for (query, response, facts) token lists, right-padded.

    When an example is longer than ``max_len`` the facts are cut first, then the query (the response is what
    is being judged and is kept whole when it fits).
    """
    rows = []
    for query, response, facts in examples:
        if len(response) >= max_len:
            raise ModelError(f"a response of {len(response)} tokens does not fit the critic's max_len={max_len}; "
                             "raise CriticConfig.max_seq_len or shorten the response")
        query = query[-(max_len - len(response)):] if len(query) + len(response) > max_len else query
        facts = facts[:max_len - len(query) - len(response)]
        rows.append((query + response + facts,
                     [QUERY] * len(query) + [RESPONSE] * len(response) + [FACTS] * len(facts)))
    T = max(len(ids) for ids, _ in rows)
    ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    segments_BT = torch.zeros(len(rows), T, dtype=torch.long)
    mask_BT = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (ids, segments) in enumerate(rows):
        ids_BT[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        segments_BT[i, :len(ids)] = torch.tensor(segments, dtype=torch.long)
        mask_BT[i, :len(ids)] = True
    return ids_BT, segments_BT, mask_BT


def _masked_mean(h_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    weights_BT1 = mask_BT[..., None].to(h_BTD.dtype)
    return (h_BTD * weights_BT1).sum(dim=1) / weights_BT1.sum(dim=1).clamp_min(1.0)


class Critic(nn.Module):
    """Bidirectional Transformer encoder with token, position and segment embeddings; masked mean pooling of the
    response and of the whole input."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.seg_emb = nn.Embedding(3, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        # correctness and confidence logits from [mean over the response | mean over everything]: the verdict is
        # one comparison made at the response's tokens, which a mean over the whole input dilutes
        self.heads = nn.Linear(2 * cfg.d_model, 2)

    def forward(self, ids_BT: torch.Tensor, segments_BT: torch.Tensor, mask_BT: torch.Tensor) -> CriticOutput:
        B, T = ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ModelError(f"critic input of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                             "pack with pack_segments(..., max_len=cfg.max_seq_len)")
        if segments_BT.shape != ids_BT.shape or mask_BT.shape != ids_BT.shape:
            raise ModelError(f"ids {tuple(ids_BT.shape)}, segments {tuple(segments_BT.shape)} and mask "
                             f"{tuple(mask_BT.shape)} must have the same shape")
        x_BTD = self.tok_emb(ids_BT) + self.pos_emb(torch.arange(T, device=ids_BT.device)) + self.seg_emb(segments_BT)
        h_BTD = self.norm(self.encoder(x_BTD, src_key_padding_mask=~mask_BT))
        pooled_B2D = torch.cat([_masked_mean(h_BTD, mask_BT & (segments_BT == RESPONSE)),
                                _masked_mean(h_BTD, mask_BT)], dim=-1)
        logits_B2 = self.heads(pooled_B2D).float()
        return CriticOutput(logits_B2[:, 0], logits_B2[:, 1])

    @staticmethod
    def loss(out: CriticOutput, correct_B: torch.Tensor) -> torch.Tensor:
        """BCE on correctness + 0.5 x BCE of confidence against "the correctness prediction was right"."""
        correct_B = correct_B.float()
        was_right_B = ((out.correct_logit_B.detach() > 0).float() == correct_B).float()
        return (F.binary_cross_entropy_with_logits(out.correct_logit_B, correct_B)
                + 0.5 * F.binary_cross_entropy_with_logits(out.confidence_logit_B, was_right_B))
