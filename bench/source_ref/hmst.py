"""The HMST source's base MoE model and Stage-1 training step, for same-run comparisons.

Re-implemented from the source's ``hmst/models/base_moe.py`` (51089e1) at its "tiny" preset with
``train.py``'s vocabulary (V 50,258 = GPT-2 + <pad>, d 512, 6 layers, 8 heads, d_ff 2,048, 4 experts, top-2,
max_seq_len 8,192, dropout 0.1). What the source does, kept because it is what is timed:

- learned absolute positions, dropout after the embedding, head tied to the token embedding;
- pre-norm blocks around ``nn.MultiheadAttention`` called with its defaults (so it also computes the
  head-averaged attention weights) and a float -inf causal mask;
- the MoE layer's Python double loop over (choice, expert): a boolean mask per pair, the masked tokens
  gathered, the expert (Linear, GELU, dropout, Linear, all with biases) run on them and its gated output
  added back in place, so each expert runs once per choice; the load-balancing loss with its per-expert
  Python loop over top-1 fractions, weight 0.01, summed over layers;
- the step of ``train.py``: cross-entropy ignoring <pad> plus the balancing losses, backward, clip 1.0,
  AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.01 on every parameter, PyTorch's default implementation).
  The LambdaLR schedule is left out: it costs microseconds a step.

The model has the source's parameter count for "tiny": 86.65M.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, PAD_ID = 50258, 50257
D_MODEL, N_LAYERS, N_HEADS, D_FF, N_EXPERTS, TOP_K, MAX_SEQ_LEN, DROPOUT = 512, 6, 8, 2048, 4, 2, 8192, 0.1
BALANCE_WEIGHT = 0.01  # hard-coded in the source (the config's value never reaches the layer)


class SourceMoE(nn.Module):
    """The source's ``MoELayer``: ``forward(x_BTD) -> (y_BTD, balance_loss)``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D_MODEL, N_EXPERTS)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D_MODEL, D_FF), nn.GELU(), nn.Dropout(DROPOUT), nn.Linear(D_FF, D_MODEL))
            for _ in range(N_EXPERTS))

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_ND = x_BTD.reshape(-1, D_MODEL)
        probs_NE = F.softmax(self.gate(x_ND), dim=-1)
        top_NK, expert_NK = probs_NE.topk(TOP_K, dim=-1)
        top_NK = top_NK / top_NK.sum(dim=-1, keepdim=True)
        top1_N = probs_NE.argmax(dim=-1)
        fraction_E = torch.zeros(N_EXPERTS)
        for e in range(N_EXPERTS):
            fraction_E[e] = (top1_N == e).float().mean()
        balance = BALANCE_WEIGHT * N_EXPERTS * (fraction_E * probs_NE.mean(dim=0)).sum()
        y_ND = torch.zeros_like(x_ND)
        for i in range(TOP_K):  # the source's dispatch: one masked gather and in-place add per (choice, expert)
            for e, expert in enumerate(self.experts):
                mask_N = expert_NK[:, i] == e
                if mask_N.any():
                    y_ND[mask_N] += top_NK[mask_N, i:i + 1] * expert(x_ND[mask_N])
        return y_ND.view_as(x_BTD), balance


class SourceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D_MODEL, N_HEADS, dropout=DROPOUT, batch_first=True)
        self.attn_norm, self.ff_norm = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.ff = SourceMoE()
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x_BTD: torch.Tensor, mask_TT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_BTD = self.attn_norm(x_BTD)
        a_BTD, _ = self.attn(h_BTD, h_BTD, h_BTD, attn_mask=mask_TT)
        x_BTD = x_BTD + self.dropout(a_BTD)
        f_BTD, balance = self.ff(self.ff_norm(x_BTD))
        return x_BTD + self.dropout(f_BTD), balance


class SourceMoELM(nn.Module):
    """The source's ``BaseMoEModel``: ``forward(ids_BT) -> (logits_BTV, summed balancing loss)``."""

    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, D_MODEL)
        self.position_embedding = nn.Embedding(MAX_SEQ_LEN, D_MODEL)
        self.dropout = nn.Dropout(DROPOUT)
        self.layers = nn.ModuleList(SourceBlock() for _ in range(N_LAYERS))
        self.final_norm = nn.LayerNorm(D_MODEL)
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        for module in self.modules():  # GPT-style N(0, 0.02); attention's packed in-projection keeps xavier
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = ids_BT.size(1)
        x_BTD = self.dropout(self.token_embedding(ids_BT) + self.position_embedding(torch.arange(T).unsqueeze(0)))
        mask_TT = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        balance = 0.0
        for layer in self.layers:
            x_BTD, layer_balance = layer(x_BTD, mask_TT)
            balance = balance + layer_balance
        return self.lm_head(self.final_norm(x_BTD)), balance


def trainer(ids_BT1: torch.Tensor) -> tuple[nn.Module, Callable[[], None]]:
    """The source's model and one Stage-1 step on ``ids_BT1`` (inputs ``[:, :-1]``, labels ``[:, 1:]``)."""
    model = SourceMoELM().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)
    inputs_BT, labels_BT = ids_BT1[:, :-1], ids_BT1[:, 1:]

    def step() -> None:
        logits_BTV, balance = model(inputs_BT)
        loss = F.cross_entropy(logits_BTV.reshape(-1, VOCAB), labels_BT.reshape(-1), ignore_index=PAD_ID)
        (loss + balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model, step
