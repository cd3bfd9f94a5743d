"""The TG-SMN source's language model and training step, for same-run comparisons.

Re-implemented from the source's ``tg_smn/models/transformer_lm.py`` (66ebd85) with its default
shape (``ModelCfgLM``: d 192, 4 heads, 4 layers, dropout 0.1, E 256 experts in groups of 32, rank 16, k <= 2).
Kept as the source has them, because they are what is timed:

- pre-LN blocks around ``nn.MultiheadAttention`` (float -inf causal mask, ``need_weights=False``), sinusoidal
  positions, functional dropout 0.1 after the embedding, attention and FFN, an untied head;
- dense FFN: d -> 4d -> d with ReLU;
- sparse FFN in every block: a group router of which only the argmax is used (so it never trains), then
  per token a copy of its group's local router and of its k experts' low-rank weights gathered from the
  stacked parameters, Gaussian noise on the local scores and a softmax over the k kept scores;
- the step of ``run_lm_experiment`` without its probes: mean cross-entropy, backward, clip 1.0, AdamW (lr 3e-4,
  weight decay 0, PyTorch's default implementation).

At V 8,176 the models have the source's parameter counts: 4,919,424 dense, 10,230,176 sparse.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, N_HEADS, N_LAYERS, DROPOUT = 192, 4, 4, 0.1
N_EXPERTS, GROUP_SIZE, RANK, MAX_K = 256, 32, 16, 2
MAX_LEN = 2048  # rows of the sinusoidal position table


class SourceSparseLayer(nn.Module):
    """The source's ``HierarchicalSparseExpertLayer`` on flattened tokens: ``forward(h_ND) -> y_ND``.

    Routing knobs are module state, as the source's ``set_routing`` leaves them: k, noise and temperature.
    """

    def __init__(self, d: int = D_MODEL, n_experts: int = N_EXPERTS, group_size: int = GROUP_SIZE,
                 rank: int = RANK):
        super().__init__()
        self.group_size = group_size
        n_groups = n_experts // group_size
        self.group_router = nn.Linear(d, n_groups)
        self.local_router_GDM = nn.Parameter(torch.randn(n_groups, d, group_size) * 0.02)
        self.W1_EDR = nn.Parameter(torch.randn(n_experts, d, rank) * 0.02)
        self.W2_ERD = nn.Parameter(torch.randn(n_experts, rank, d) * 0.02)
        self.set_routing(MAX_K, 0.0, 1.0)

    def set_routing(self, k: int, noise: float, temperature: float) -> None:
        self.k, self.noise, self.temperature = k, noise, temperature

    def forward(self, h_ND: torch.Tensor) -> torch.Tensor:
        group_N = self.group_router(h_ND).argmax(dim=-1)  # only the index is used: no gradient reaches the router
        local_NM = torch.einsum("nd,ndm->nm", h_ND, self.local_router_GDM[group_N])  # a router copy per token
        if self.noise > 0:
            local_NM = local_NM + self.noise * torch.randn_like(local_NM)
        top_NK, member_NK = local_NM.topk(self.k, dim=-1)
        gate_NK = F.softmax(top_NK / max(self.temperature, 1e-6), dim=-1)
        expert_NK = group_N.unsqueeze(-1) * self.group_size + member_NK
        # the source's hot path: every token-slot gets its own copy of its expert's weights, (N, k, d, r) each
        a_NKR = F.relu(torch.einsum("nd,nkdr->nkr", h_ND, self.W1_EDR[expert_NK]))
        y_NKD = torch.einsum("nkr,nkrd->nkd", a_NKR, self.W2_ERD[expert_NK])
        return (gate_NK.unsqueeze(-1) * y_NKD).sum(dim=1)


class SourceBlock(nn.Module):
    """Pre-LN block: ``x + drop(MHA(LN1(x)))``, then ``x + FFN(LN2(x))`` (the FFN drops its own output)."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, N_HEADS, dropout=DROPOUT, batch_first=True)
        if sparse:
            self.experts = SourceSparseLayer()
        else:
            self.fc1, self.fc2 = nn.Linear(D_MODEL, 4 * D_MODEL), nn.Linear(4 * D_MODEL, D_MODEL)
        self.sparse = sparse

    def forward(self, x_BTD: torch.Tensor, mask_TT: torch.Tensor) -> torch.Tensor:
        h_BTD = self.ln1(x_BTD)
        a_BTD, _ = self.attn(h_BTD, h_BTD, h_BTD, attn_mask=mask_TT, need_weights=False)
        x_BTD = x_BTD + F.dropout(a_BTD, DROPOUT)
        h_BTD = self.ln2(x_BTD)
        if self.sparse:
            f_BTD = self.experts(h_BTD.reshape(-1, D_MODEL)).view_as(h_BTD)
        else:
            f_BTD = self.fc2(F.dropout(F.relu(self.fc1(h_BTD)), DROPOUT))
        return x_BTD + F.dropout(f_BTD, DROPOUT)


class SourceLM(nn.Module):
    """The source's ``TransformerLM`` in its training mode (``stochastic=True``): ``forward(x_BT) -> logits_BTV``."""

    def __init__(self, vocab_size: int, sparse: bool):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, D_MODEL)
        position_L1 = torch.arange(MAX_LEN, dtype=torch.float).unsqueeze(1)
        frequency_H = torch.exp(torch.arange(0, D_MODEL, 2).float() * (-math.log(10000.0) / D_MODEL))
        pe_LD = torch.zeros(MAX_LEN, D_MODEL)
        pe_LD[:, 0::2], pe_LD[:, 1::2] = torch.sin(position_L1 * frequency_H), torch.cos(position_L1 * frequency_H)
        self.register_buffer("pe_LD", pe_LD)
        self.blocks = nn.ModuleList(SourceBlock(sparse) for _ in range(N_LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocab_size, bias=False)

    def set_routing(self, k: int, noise: float, temperature: float) -> None:
        for block in self.blocks:
            block.experts.set_routing(k, noise, temperature)

    def forward(self, x_BT: torch.Tensor) -> torch.Tensor:
        T = x_BT.size(1)
        h_BTD = F.dropout(self.tok_emb(x_BT) + self.pe_LD[:T], DROPOUT)
        mask_TT = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        for block in self.blocks:
            h_BTD = block(h_BTD, mask_TT)
        return self.head(self.ln_f(h_BTD))


def trainer(vocab_size: int, sparse: bool, x_BT: torch.Tensor,
            y_BT: torch.Tensor) -> tuple[nn.Module, Callable[[], None]]:
    """The source's model (sparse at its fixed controller: k 2, noise 0.3, temperature 1.0) and one step on a batch."""
    model = SourceLM(vocab_size, sparse).train()
    if sparse:
        model.set_routing(k=2, noise=0.3, temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)

    def step() -> None:
        logits_BTV = model(x_BT)
        loss = F.cross_entropy(logits_BTV.reshape(-1, vocab_size), y_BT.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model, step
