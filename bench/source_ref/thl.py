"""The THL source's model and training step, for same-run comparisons.

Re-implemented from the source's ``thl/`` package (ca3b218) at its "small" benchmark shape (V 512,
d 256 everywhere, 3 GRU tiers clocked at 1/8/64, a 64-entry local window, J 256 slots, 4 read heads x 64,
kappa 4, one write slot). What the source does, kept because it is what is timed:

- ``forward`` is a Python loop over time steps with full backpropagation through it (no truncation, no
  chunking), on a fresh state per call;
- per step: local attention over the last <= 64 raw embeddings, re-projecting the whole window to keys and
  values, on a buffer cloned every step while it fills; the router projects all J slots to keys *and* values
  (O(J) per token) and picks kappa per head by Gumbel-perturbed top-k; the read metadata (an EMA that keeps
  its graph, last-read times that nothing reads); three GRU tiers, the inactive ones passed through; the
  writer's cosine against all J slots, all three slot choices (empty, least used, most similar) computed and
  one picked per row; decay of the whole memory and an additive scatter; the write metadata; LayerNorm and head;
- the harness step: mean cross-entropy on the shifted targets, backward, AdamW (lr 1e-4, PyTorch's default).

The model has the source's parameter count for "small": 2,920,960 (the writer's dead ``W_r`` included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D_EMBED, TIER_DIMS, TIMESCALES = 512, 256, (256, 256, 256), (1, 8, 64)
LOCAL_WINDOW, QUERY_DIM = 64, 64
SLOTS, MEMORY_DIM, VALUE_DIM, HEADS, HEAD_DIM, TOPK = 256, 256, 256, 4, 64, 4
LOAD_PENALTY, READ_DECAY, WRITE_DECAY, MEMORY_DECAY = 0.1, 0.99, 0.99, 0.9995
WRITE_SLOTS, WRITE_CLIP, NOVELTY_BETA, NOVELTY_THETA, STALE_WEIGHT, UNDERUSE_WEIGHT = 1, 1.0, 8.0, 0.3, 1.0, 1.0


class SourceTierCell(nn.Module):
    """GRU tier: ``z, r = sigmoid(W [s; x])``, ``s~ = tanh(W_h [r*s; x])``, ``s' = (1-z) s + z s~``."""

    def __init__(self, d_state: int, d_lower: int):
        super().__init__()
        d_in = d_state + d_lower + VALUE_DIM
        self.W_z, self.W_r, self.W_h = nn.Linear(d_in, d_state), nn.Linear(d_in, d_state), nn.Linear(d_in, d_state)

    def forward(self, s_BS: torch.Tensor, lower_BL: torch.Tensor, read_BV: torch.Tensor) -> torch.Tensor:
        x_BX = torch.cat([lower_BL, read_BV], dim=-1)
        gate_in = torch.cat([s_BS, x_BX], dim=-1)
        z_BS, r_BS = torch.sigmoid(self.W_z(gate_in)), torch.sigmoid(self.W_r(gate_in))
        candidate_BS = torch.tanh(self.W_h(torch.cat([r_BS * s_BS, x_BX], dim=-1)))
        return (1 - z_BS) * s_BS + z_BS * candidate_BS


class SourceTHL(nn.Module):
    """The source's ``THLModel`` in training mode: ``forward(ids_BT) -> logits_BTV`` from a fresh state."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_EMBED)
        self.local_q = nn.Linear(D_EMBED, QUERY_DIM, bias=False)
        self.local_k = nn.Linear(D_EMBED, QUERY_DIM, bias=False)
        self.local_v = nn.Linear(D_EMBED, VALUE_DIM, bias=False)
        self.read_q = nn.Linear(D_EMBED + TIER_DIMS[0] + TIER_DIMS[-1], HEADS * HEAD_DIM, bias=False)
        self.read_k = nn.Linear(MEMORY_DIM, HEADS * HEAD_DIM, bias=False)
        self.read_v = nn.Linear(MEMORY_DIM, VALUE_DIM, bias=False)
        self.write_w = nn.Linear(TIER_DIMS[0] + TIER_DIMS[-1], MEMORY_DIM)
        self.write_r = nn.Linear(VALUE_DIM, MEMORY_DIM, bias=False)  # dead in the source too: never called
        self.tiers = nn.ModuleList(SourceTierCell(d, lower) for d, lower in zip(TIER_DIMS, (D_EMBED, *TIER_DIMS)))
        self.norm = nn.LayerNorm(sum(TIER_DIMS))
        self.head = nn.Linear(sum(TIER_DIMS), VOCAB)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def local_read(self, e_BE: torch.Tensor, buffer_BWE: torch.Tensor, valid: int) -> torch.Tensor:
        if valid == 0:
            return e_BE.new_zeros(e_BE.size(0), VALUE_DIM)
        window_BWE = buffer_BWE[:, :valid]
        scores_BW = torch.einsum("bwd,bd->bw", self.local_k(window_BWE), self.local_q(e_BE)) / QUERY_DIM**0.5
        return torch.bmm(scores_BW.softmax(dim=-1).unsqueeze(1), self.local_v(window_BWE)).squeeze(1)

    def memory_read(self, u_BU: torch.Tensor, memory_BJM: torch.Tensor, read_ema_BJ: torch.Tensor):
        B = u_BU.size(0)
        q_BH1D = self.read_q(u_BU).view(B, HEADS, HEAD_DIM, 1)
        keys_BHJD = self.read_k(memory_BJM).view(B, SLOTS, HEADS, HEAD_DIM).permute(0, 2, 1, 3)  # every slot
        scores_BHJ = torch.matmul(keys_BHJD, q_BH1D).squeeze(-1) / HEAD_DIM**0.5
        scores_BHJ = scores_BHJ - LOAD_PENALTY * read_ema_BJ.unsqueeze(1)
        gumbel_BHJ = -torch.log(-torch.log(torch.rand_like(scores_BHJ) + 1e-9) + 1e-9)
        top_BHK, slot_BHK = (scores_BHJ + gumbel_BHJ).topk(TOPK, dim=-1)
        alpha_BHK = top_BHK.softmax(dim=-1)
        values_BHJV = self.read_v(memory_BJM).view(B, SLOTS, HEADS, VALUE_DIM // HEADS).permute(0, 2, 1, 3)
        chosen_BHKV = values_BHJV.gather(2, slot_BHK.unsqueeze(-1).expand(-1, -1, -1, VALUE_DIM // HEADS))
        return torch.matmul(alpha_BHK.unsqueeze(2), chosen_BHKV).reshape(B, VALUE_DIM), alpha_BHK, slot_BHK

    def write(self, s0_BS: torch.Tensor, top_BS: torch.Tensor, staleness_BJ: torch.Tensor,
              underuse_BJ: torch.Tensor, memory_BJM: torch.Tensor):
        w_BM = self.write_w(torch.cat([s0_BS, top_BS], dim=-1))
        w_BM = w_BM * torch.clamp(WRITE_CLIP / (w_BM.norm(dim=-1, keepdim=True) + 1e-6), max=1.0)
        affinity_BJ = (memory_BJM * w_BM.unsqueeze(1)).sum(-1) / (
            (w_BM.norm(dim=-1, keepdim=True) + 1e-8) * (memory_BJM.norm(dim=-1) + 1e-8))
        novelty_B1 = 1.0 - affinity_BJ.max(dim=-1).values.unsqueeze(-1)
        gate_B1 = torch.sigmoid(NOVELTY_BETA * (novelty_B1 - NOVELTY_THETA))
        use_score_BJ = STALE_WEIGHT * staleness_BJ + UNDERUSE_WEIGHT * underuse_BJ
        empty_BJ = memory_BJM.norm(dim=-1) <= 1e-6  # the source takes the slot norms a second time here
        slot_index_J = torch.arange(SLOTS, dtype=use_score_BJ.dtype)
        empty_choice_BW = (empty_BJ.to(use_score_BJ.dtype) * 1e4 - slot_index_J).topk(WRITE_SLOTS, dim=-1).indices
        lru_choice_BW = use_score_BJ.topk(WRITE_SLOTS, dim=-1).indices
        similar_choice_BW = affinity_BJ.topk(WRITE_SLOTS, dim=-1).indices
        novel_B = novelty_B1.squeeze(-1) > NOVELTY_THETA
        has_empty_B = empty_BJ.any(dim=-1)
        gate_B1 = torch.where(novel_B.unsqueeze(-1), gate_B1, torch.ones_like(gate_B1))
        slot_BW = torch.where((novel_B & ~has_empty_B).unsqueeze(1), lru_choice_BW, similar_choice_BW)
        slot_BW = torch.where((novel_B & has_empty_B).unsqueeze(1), empty_choice_BW, slot_BW)
        return w_BM, gate_B1, slot_BW

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = ids_BT.shape
        tiers = [torch.zeros(B, d) for d in TIER_DIMS]
        memory_BJM = torch.zeros(B, SLOTS, MEMORY_DIM)
        read_ema_BJ, write_ema_BJ = torch.zeros(B, SLOTS), torch.zeros(B, SLOTS)
        last_read_BJ = torch.zeros(B, SLOTS, dtype=torch.long)
        last_write_BJ = torch.zeros(B, SLOTS, dtype=torch.long)
        buffer_BWE, valid = torch.zeros(B, LOCAL_WINDOW, D_EMBED), 0
        logits = []
        for t in range(T):
            e_BE = self.embedding(ids_BT[:, t])
            local_BV = self.local_read(e_BE, buffer_BWE, valid)
            if valid < LOCAL_WINDOW:
                buffer_BWE = buffer_BWE.clone()
                buffer_BWE[:, valid] = e_BE
                valid += 1
            else:
                buffer_BWE = torch.cat([buffer_BWE[:, 1:], e_BE.unsqueeze(1)], dim=1)

            read_BV, alpha_BHK, slot_BHK = self.memory_read(torch.cat([e_BE, tiers[0], tiers[-1]], dim=-1),
                                                            memory_BJM, read_ema_BJ)
            slot_BR = slot_BHK.reshape(B, -1)
            read_BJ = torch.zeros_like(read_ema_BJ).scatter_add_(1, slot_BR, alpha_BHK.reshape(B, -1))
            read_ema_BJ = READ_DECAY * read_ema_BJ + (1 - READ_DECAY) * read_BJ
            read_mask_BJ = torch.zeros_like(last_read_BJ, dtype=torch.bool).scatter(1, slot_BR, True)
            last_read_BJ = torch.where(read_mask_BJ, t, last_read_BJ)

            lower_BL = e_BE
            for k, cell in enumerate(self.tiers):
                if t % TIMESCALES[k] == 0:
                    tiers[k] = cell(tiers[k], lower_BL, read_BV + local_BV if k == 0 else read_BV)
                lower_BL = tiers[k]

            w_BM, gate_B1, slot_BW = self.write(tiers[0], tiers[-1], t - last_write_BJ,
                                                1.0 / (1e-8 + read_ema_BJ), memory_BJM)
            memory_BJM = (memory_BJM * MEMORY_DECAY).scatter_add_(
                1, slot_BW.unsqueeze(-1).expand(-1, -1, MEMORY_DIM),
                (w_BM * gate_B1).unsqueeze(1).expand(-1, WRITE_SLOTS, -1))
            written_BJ = torch.zeros_like(write_ema_BJ).scatter_add_(1, slot_BW, torch.ones(B, WRITE_SLOTS))
            write_ema_BJ = WRITE_DECAY * write_ema_BJ + (1 - WRITE_DECAY) * written_BJ
            write_mask_BJ = torch.zeros_like(last_write_BJ, dtype=torch.bool).scatter(1, slot_BW, True)
            last_write_BJ = torch.where(write_mask_BJ, t, last_write_BJ)
            logits.append(self.head(self.norm(torch.cat(tiers, dim=-1))))
        return torch.stack(logits, dim=1)


def trainer(ids_BT1: torch.Tensor) -> tuple[nn.Module, Callable[[], None]]:
    """The source's model and one harness step on ``ids_BT1`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    model = SourceTHL().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits_BTV = model(ids_BT1[:, :-1])
        loss = F.cross_entropy(logits_BTV.reshape(-1, VOCAB), ids_BT1[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, step
