"""HMST's episodic memory: a bounded store of SSM summaries of recent spans, with the real tokens they came from.

The original HMST code stored states in a deque, scored them one entry at a time in Python, returned placeholder
strings ``"<memory_i>"`` and lost its capacity bound after a removal. Here summaries live in one
preallocated (capacity, dim) tensor, retrieval is a single matmul + top-k over every slot, each entry keeps its
token span and text, ids are unique and never reused, and the capacity holds whatever is added or removed.

Example::

    >>> import torch
    >>> from models.common.ssm import SSMConfig, SSMEncoder
    >>> encoder = SSMEncoder(SSMConfig(d_model=32, d_state=8, head_dim=16, n_layers=1))
    >>> embed = torch.nn.Embedding(100, 32)
    >>> memory = EpisodicMemory(capacity=2, dim=32)
    >>> spans = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9])]
    >>> ids = memory.add(encode_spans(encoder, embed, spans), spans, texts=["a", "b", "c"])
    >>> ids, len(memory)                       # capacity 2: entry 0 (the oldest) was evicted
    ([0, 1, 2], 2)
    >>> hits = memory.retrieve(encode_spans(encoder, embed, [spans[2]])[0], k=1)
    >>> hits[0][0].text, hits[0][0].tokens.tolist()
    ('c', [6, 7, 8, 9])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.ssm import SSMEncoder


@dataclass
class EpisodicEntry:
    """One retrieved memory."""

    id: int
    """Unique id given by ``add`` (never reused)."""
    score: float
    """Cosine similarity between the query and the stored summary."""
    tokens: torch.Tensor
    """The token ids of the span the summary was computed from."""
    text: str | None
    """The span's text, if it was given when added."""
    importance: float
    """Importance given when added (consolidation moves the most important entries to semantic memory)."""


class EpisodicMemory:
    """At most ``capacity`` entries of (unit-normalised summary, token span, text, importance).

    When full, ``add`` evicts the oldest entry (``eviction="fifo"``) or the least important one, the oldest
    among ties (``eviction="importance"``).
    """

    def __init__(self, capacity: int, dim: int, eviction: str = "fifo"):
        if capacity < 1:
            raise ModelError(f"episodic memory capacity must be >= 1, got {capacity}")
        if dim < 1:
            raise ModelError(f"episodic memory dim must be >= 1, got {dim}")
        if eviction not in ("fifo", "importance"):
            raise ModelError(f"eviction must be 'fifo' or 'importance', got {eviction!r}")
        self.capacity, self.dim, self.eviction = capacity, dim, eviction
        self.summaries_CS = torch.zeros(capacity, dim)
        self.filled_C = torch.zeros(capacity, dtype=torch.bool)
        self.ids_C = torch.full((capacity,), -1, dtype=torch.long)  # also the insertion order: ids only grow
        self.importance_C = torch.zeros(capacity)
        self.tokens: list[torch.Tensor | None] = [None] * capacity
        self.texts: list[str | None] = [None] * capacity
        self._next_id = 0

    def __len__(self) -> int:
        return int(self.filled_C.sum())

    def add(self, summaries_NS: torch.Tensor, spans: list[torch.Tensor], texts: list[str] | None = None,
            importance: list[float] | torch.Tensor | None = None) -> list[int]:
        """Store N entries; returns their ids. ``spans[i]`` are the token ids summary i was computed from."""
        if summaries_NS.dim() != 2 or summaries_NS.size(1) != self.dim:
            raise ModelError(f"summaries must have shape (N, {self.dim}), got {tuple(summaries_NS.shape)}")
        n = summaries_NS.size(0)
        if len(spans) != n or (texts is not None and len(texts) != n):
            raise ModelError(f"got {n} summaries but {len(spans)} spans and "
                             f"{'no' if texts is None else len(texts)} texts; pass one span (and text) per summary")
        importance_N = torch.zeros(n) if importance is None else torch.as_tensor(importance, dtype=torch.float32)
        unit_NS = F.normalize(summaries_NS.detach().float().cpu(), dim=-1)
        ids = []
        for i in range(n):  # one slot per entry: eviction depends on what the previous entries did
            slot = self._free_slot()
            self.summaries_CS[slot] = unit_NS[i]
            self.filled_C[slot] = True
            self.ids_C[slot] = self._next_id
            self.importance_C[slot] = importance_N[i]
            self.tokens[slot] = spans[i].detach().cpu()
            self.texts[slot] = None if texts is None else texts[i]
            ids.append(self._next_id)
            self._next_id += 1
        return ids

    def _free_slot(self) -> int:
        if not self.filled_C.all():
            return int((~self.filled_C).nonzero()[0])
        if self.eviction == "fifo":
            return int(self.ids_C.argmin())
        # least important; among equals the oldest (smallest id), by ranking importance first then id
        order_C = torch.argsort(self.ids_C, stable=True)
        return int(order_C[torch.argsort(self.importance_C[order_C], stable=True)[0]])

    @torch.no_grad()
    def retrieve(self, queries_QS: torch.Tensor, k: int = 3) -> list[list[EpisodicEntry]]:
        """The ``k`` entries most similar (cosine) to each query; one list per query, best first.

        A single query may be given as shape (S,). Fewer than k entries come back when fewer are stored.
        """
        if queries_QS.dim() == 1:
            queries_QS = queries_QS[None]
        if queries_QS.dim() != 2 or queries_QS.size(1) != self.dim:
            raise ModelError(f"queries must have shape (Q, {self.dim}) or ({self.dim},), got "
                             f"{tuple(queries_QS.shape)}")
        if k < 1:
            raise ModelError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(queries_QS.size(0))]
        scores_QC = F.normalize(queries_QS.detach().float().cpu(), dim=-1) @ self.summaries_CS.T
        scores_QC = scores_QC.masked_fill(~self.filled_C, float("-inf"))
        top_scores_QK, top_slots_QK = scores_QC.topk(k, dim=-1)
        return [[EpisodicEntry(int(self.ids_C[slot]), float(score), self.tokens[slot], self.texts[slot],
                               float(self.importance_C[slot]))
                 for score, slot in zip(scores_K.tolist(), slots_K.tolist())]
                for scores_K, slots_K in zip(top_scores_QK, top_slots_QK)]

    def entries(self, min_importance: float = float("-inf")) -> list[EpisodicEntry]:
        """Stored entries with importance >= ``min_importance``, oldest first (score is NaN: no query was made).

        Consolidation reads the important ones to move them into the semantic memory.
        """
        keep_C = self.filled_C & (self.importance_C >= min_importance)
        slots = sorted(keep_C.nonzero().flatten().tolist(), key=lambda s: int(self.ids_C[s]))
        return [EpisodicEntry(int(self.ids_C[s]), float("nan"), self.tokens[s], self.texts[s],
                              float(self.importance_C[s])) for s in slots]

    def remove(self, ids: list[int]) -> int:
        """Remove the entries with these ids (unknown ids are ignored); returns how many were removed."""
        hit_C = torch.isin(self.ids_C, torch.as_tensor(ids, dtype=torch.long)) & self.filled_C
        for slot in hit_C.nonzero().flatten().tolist():
            self.tokens[slot], self.texts[slot] = None, None
        self.filled_C &= ~hit_C
        self.ids_C[hit_C] = -1
        return int(hit_C.sum())

    def stats(self) -> dict[str, float]:
        return {"episodic/entries": float(len(self)), "episodic/fill": len(self) / self.capacity}


@torch.no_grad()
def encode_spans(encoder: SSMEncoder, embed: nn.Embedding, spans: list[torch.Tensor]) -> torch.Tensor:
    """Summaries (N, d_model) of token spans of any lengths, in one padded batch through the SSM encoder."""
    if not spans or any(s.dim() != 1 or s.numel() == 0 for s in spans):
        raise ModelError("spans must be a non-empty list of non-empty 1-D token-id tensors")
    device = embed.weight.device
    ids_NT = nn.utils.rnn.pad_sequence([s.to(device) for s in spans], batch_first=True)
    lengths_N = torch.tensor([s.numel() for s in spans], device=device)
    mask_NT = torch.arange(ids_NT.size(1), device=device) < lengths_N[:, None]
    return encoder.summarize(embed(ids_NT), mask_NT)
