"""THL: a hierarchical recurrent LM with a fixed-slot memory, for long streams in bounded memory.

Per token t (B = batch; the read and the write are in ``memory.py``)::

    x_t   = Emb[x_t] + local sliding-window attention over the last local_window embeddings
    q_t   = W_in x_t + W_qf s0_{t-1} + W_qs sK_{t-1}              # token part batched over the window
    r_t   = top-kappa read of the J slots per head (Gumbel-perturbed in training)
    s0_t  = GRU_0(s0_{t-1}; x_t, r_t, s1_{t-1})                  # top-down: the slower tier conditions it
    sk_t  = GRU_k(sk_{t-1}; s(k-1)_t, r_t, s(k+1)_{t-1})  if pos % tau_k == 0 else sk_{t-1}
    write = novelty-gated write of [s0_t; sK_t] into one slot
    logits_t = W_o LayerNorm([s0_t; ...; sK_t])

Everything that depends only on the tokens (embedding, local attention, the token parts of the query and of
tier 0's gates, the LM head) runs batched over a window; only the recurrence steps in time. Windows are
``bptt_window`` tokens and every window starts from detached state (truncated BPTT).

Example::

    >>> import torch
    >>> from models.registry import build_model
    >>> model = build_model("thl-tiny", vocab_size=256)
    >>> out = model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    >>> out.logits.shape, out.loss.dim()
    (torch.Size([2, 16, 256]), 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.output import LMOutput
from models.thl.config import PRESETS, THLConfig
from models.thl.memory import MemoryRouter, MemoryWriter, THLState, gumbel_noise, load_balance_loss
from models.thl.recurrence import run_window

CONFIG_CLASS = THLConfig
__all__ = ["PRESETS", "CONFIG_CLASS", "build", "THLConfig", "THLModel", "THLForSequenceClassification", "THLState"]


class LocalAttention(nn.Module):
    """Multi-head attention over the last ``local_window`` tokens (the current one included).

    Positions enter as a learned bias per head and distance, so streaming from a cache of the last W-1 keys
    and values gives exactly the same result as a full pass.
    """

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.n_heads, self.window = cfg.local_heads, cfg.local_window
        self.qkv = nn.Linear(cfg.d_embed, 3 * cfg.d_embed, bias=False)
        self.distance_bias_HW = nn.Parameter(torch.zeros(cfg.local_heads, cfg.local_window))

    def forward(self, e_BTD: torch.Tensor, state: THLState) -> torch.Tensor:
        B, T, D = e_BTD.shape
        H, W = self.n_heads, self.window
        q_BHTd, k_BHTd, v_BHTd = self.qkv(e_BTD).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        k_BHSd = torch.cat([state.local_k_BHLD, k_BHTd], dim=2)  # S = (W-1) cached + T new
        v_BHSd = torch.cat([state.local_v_BHLD, v_BHTd], dim=2)
        # query i sits at key position W-1+i; it sees keys within distance W-1 that hold real tokens
        distance_TS = (torch.arange(T, device=e_BTD.device)[:, None] + W - 1
                       - torch.arange(W - 1 + T, device=e_BTD.device)[None, :])
        first_real = W - 1 - state.local_len
        key_pos_S = torch.arange(W - 1 + T, device=e_BTD.device)
        allowed_TS = (distance_TS >= 0) & (distance_TS < W) & (key_pos_S >= first_real)[None, :]
        bias_HTS = self.distance_bias_HW[:, distance_TS.clamp(0, W - 1)].masked_fill(~allowed_TS, float("-inf"))
        out_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=bias_HTS.to(q_BHTd.dtype))
        state.local_k_BHLD = k_BHSd[:, :, T:].contiguous()
        state.local_v_BHLD = v_BHSd[:, :, T:].contiguous()
        state.local_len = min(W - 1, state.local_len + T)
        return out_BHTd.transpose(1, 2).reshape(B, T, D)


class TierCell(nn.Module):
    """A GRU tier's weights: input side (its pre-activation may be partly computed by the caller, so parts of it
    can be batched) and hidden side. The step itself (torch.gru_cell's update) is in ``recurrence.py`` and
    ``recurrence.cpp``."""

    def __init__(self, d_in: int, d: int, input_bias: bool):
        super().__init__()
        self.inp = nn.Linear(d_in, 3 * d, bias=input_bias)
        self.hh = nn.Linear(d, 3 * d)


class THLCore(nn.Module):
    """The recurrent part: router read, clocked GRU tiers with top-down conditioning, novelty-gated write.

    Terms that depend only on a slow tier (its share of the query, of the write vector, and its top-down input
    to tier 0) are recomputed when that tier ticks, not every token. A window's recurrence is one autograd node
    with a hand-written backward (``recurrence.py``); this module holds the weights and the batched token side.
    """

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.cfg = cfg
        dims, K = cfg.tier_dims, len(cfg.tier_dims)
        # token-only inputs of the query and of tier 0's gates, one batched matmul per window
        self.in_proj = nn.Linear(cfg.d_embed, cfg.read_heads * cfg.head_dim + 3 * dims[0])
        self.router = MemoryRouter(cfg)
        self.writer = MemoryWriter(cfg)
        # top-down: tier 1's state conditions tier 0's gates (tier k+1 enters tier k's input for k >= 1)
        self.topdown = nn.Linear(dims[1], 3 * dims[0], bias=False) if K > 1 else None
        tiers = [TierCell(cfg.value_dim, dims[0], input_bias=False)]  # tier 0's bias is in in_proj
        for k in range(1, K):
            upper = dims[k + 1] if k + 1 < K else 0
            tiers.append(TierCell(dims[k - 1] + cfg.value_dim + upper, dims[k], input_bias=True))
        self.tiers = nn.ModuleList(tiers)

    def forward(self, x_BTD: torch.Tensor, state: THLState) -> dict:
        """Runs one window on token features x = embedding + local attention (state is updated in place);
        returns per-token tier features and routing records."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        HD = cfg.read_heads * cfg.head_dim
        pre_TBX = self.in_proj(x_BTD).transpose(0, 1)
        q_in_TBX, gates0_TBX = pre_TBX[..., :HD].contiguous(), pre_TBX[..., HD:].contiguous()
        noise_TBHJ = None
        if self.training and cfg.router_noise > 0:
            noise_TBHJ = gumbel_noise((T, B, cfg.read_heads, cfg.memory_slots), cfg.router_noise, x_BTD.device,
                                      x_BTD.dtype)
        rec = run_window(self, q_in_TBX, gates0_TBX, noise_TBHJ, state)
        return {key.replace("_TB", "_BT"): value.transpose(0, 1) for key, value in rec.items()}


class LMHead(nn.Module):
    """LayerNorm over the concatenated tier states, then the vocabulary projection."""

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.norm = nn.LayerNorm(sum(cfg.tier_dims))
        self.out = nn.Linear(sum(cfg.tier_dims), cfg.vocab_size, bias=False)

    def forward(self, feats_BTS: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(feats_BTS))


class THLModel(nn.Module):
    """The THL language model; follows the memtrain LM contract and the ``generate()`` step protocol.

    ``forward`` starts from a fresh state unless one is given; ``step`` continues a stream in place.

    Example::

        >>> import torch
        >>> from models.common.sampling import SamplingConfig, generate
        >>> model = THLModel(THLConfig(vocab_size=64)).eval()
        >>> generate(model, torch.tensor([[1, 2, 3]]), SamplingConfig(max_new_tokens=4, temperature=0)).shape
        torch.Size([1, 4])
    """

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.local_attn = LocalAttention(cfg)
        self.core = THLCore(cfg)
        self.head = LMHead(cfg)

    def new_state(self, batch_size: int, max_len: int = 0, device: torch.device | str | None = None) -> THLState:
        """A fresh stream state; ``max_len`` is accepted for the generate protocol and unused (no KV cache)."""
        weight = self.head.out.weight
        return THLState.zeros(self.cfg, batch_size, device if device is not None else weight.device,
                              weight.dtype)

    def step(self, input_ids_BT: torch.Tensor, state: THLState) -> torch.Tensor:
        """Consume tokens, advancing ``state``; returns logits (B, T, V)."""
        return self._run(input_ids_BT, state)[0]

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                state: THLState | None = None) -> LMOutput:
        if state is None:
            state = self.new_state(input_ids_BT.size(0), device=input_ids_BT.device)
        logits_BTV, rec = self._run(input_ids_BT, state)
        alpha_NK, idx_NK = rec["alpha_BTHK"].flatten(0, 2), rec["idx_BTHK"].flatten(0, 2)
        balance = load_balance_loss(alpha_NK, idx_NK, self.cfg.memory_slots)
        usage_J = torch.bincount(idx_NK.flatten().detach(), minlength=self.cfg.memory_slots).float()
        p_J = usage_J / usage_J.sum()
        stats = {"thl/write_rate": rec["written_BT"].float().mean().detach(),
                 "thl/blend_share": rec["blended_BT"].float().mean().detach(),
                 "thl/gate_mean": rec["gate_BT"].mean().detach(),
                 "thl/load_balance": balance.detach(),
                 "thl/slot_usage_entropy": -(p_J * p_J.clamp_min(1e-12).log()).sum().detach()}
        if targets_BT is None:
            return LMOutput(logits=logits_BTV, stats=stats)
        if targets_BT.shape != input_ids_BT.shape:
            raise ModelError(f"targets shape {tuple(targets_BT.shape)} must equal input shape "
                             f"{tuple(input_ids_BT.shape)} (targets are the inputs shifted by one)")
        aux_loss = self.cfg.load_balance_weight * balance
        loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten()) + aux_loss
        return LMOutput(logits=logits_BTV, loss=loss, aux_loss=aux_loss, stats=stats)

    def features(self, input_ids_BT: torch.Tensor, state: THLState) -> tuple[torch.Tensor, dict]:
        """Concatenated tier states (B, T, sum(tier_dims)) before the head, and the routing records."""
        self._check_ids(input_ids_BT)
        window = self.cfg.bptt_window
        feats, records = [], []
        for start in range(0, input_ids_BT.size(1), window):
            state.detach_()  # truncated BPTT: no gradient reaches an earlier window
            state.fold_scale()
            e_BTD = self.embed(input_ids_BT[:, start:start + window])
            rec = self.core(e_BTD + self.local_attn(e_BTD, state), state)
            feats.append(rec.pop("feats_BTS"))
            records.append(rec)
        merged = {key: torch.cat([r[key] for r in records], dim=1) for key in records[0]}
        return torch.cat(feats, dim=1), merged

    def _run(self, input_ids_BT: torch.Tensor, state: THLState) -> tuple[torch.Tensor, dict]:
        feats_BTS, rec = self.features(input_ids_BT, state)
        return self.head(feats_BTS), rec

    def _check_ids(self, input_ids_BT: torch.Tensor) -> None:
        if input_ids_BT.dim() != 2 or input_ids_BT.size(1) == 0:
            raise ModelError(f"input_ids must be a non-empty (batch, length) tensor, got shape "
                             f"{tuple(input_ids_BT.shape)}")
        if input_ids_BT.dtype not in (torch.long, torch.int32):
            raise ModelError(f"input_ids must be integer token ids, got dtype {input_ids_BT.dtype}")
        lo, hi = int(input_ids_BT.min()), int(input_ids_BT.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ModelError(f"token ids must be in [0, {self.cfg.vocab_size}), got range [{lo}, {hi}]; "
                             "build the model with the tokenizer's vocab_size")

    # --- accounting ---
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x MACs that autograd tracks + 2 x the untracked O(J) scoring work.

        ``seq_len`` does not matter: local attention spans local_window tokens and the rest is recurrent.
        """
        cfg = self.cfg
        dims, K, HD = cfg.tier_dims, len(cfg.tier_dims), cfg.read_heads * cfg.head_dim
        E = cfg.read_heads * cfg.head_dim + cfg.value_dim
        # a tier's matmuls (and what depends only on it) run once per tick
        tiers = sum((cell.inp.weight.numel() + cell.hh.weight.numel()) / cfg.tier_timescales[k]
                    for k, cell in enumerate(self.core.tiers))
        slow = (dims[-1] * (HD + cfg.memory_dim)) / cfg.tier_timescales[-1]
        if K > 1:
            slow += self.core.topdown.weight.numel() / cfg.tier_timescales[1]
        tracked = (3 * cfg.d_embed ** 2 + 2 * cfg.local_window * cfg.d_embed  # local qkv + scores/values
                   + self.core.in_proj.weight.numel() + dims[0] * (HD + cfg.memory_dim) + slow
                   + tiers + cfg.memory_dim * E + cfg.read_heads * cfg.read_topk * E  # write row's k/v + the read
                   + sum(dims) * cfg.vocab_size)
        untracked = cfg.memory_slots * (HD + cfg.memory_dim)  # scores against cached keys + novelty cosines
        return 6 * tracked + 2 * untracked


@dataclass
class ClassificationOutput:
    logits: torch.Tensor
    """(B, num_labels)"""
    loss: torch.Tensor | None = None
    """Cross-entropy against the labels, when given."""


class THLForSequenceClassification(nn.Module):
    """THL features mean-pooled over every real position (padding mask), then a linear classifier.

    Pooling over all positions (not the slow tier's last state) lets every token change the output. Pad on
    the right: the model is causal, so right padding never changes the features of real tokens.

    Example::

        >>> import torch
        >>> clf = THLForSequenceClassification(THLConfig(vocab_size=64), num_labels=3)
        >>> ids, mask = torch.randint(0, 64, (2, 10)), torch.ones(2, 10, dtype=torch.long)
        >>> clf(ids, mask, labels_B=torch.tensor([0, 2])).logits.shape
        torch.Size([2, 3])
    """

    def __init__(self, cfg: THLConfig, num_labels: int = 2):
        super().__init__()
        if num_labels < 2:
            raise ModelError(f"num_labels must be at least 2, got {num_labels}")
        self.cfg = cfg
        self.thl = THLModel(cfg)
        self.classifier = nn.Linear(sum(cfg.tier_dims), num_labels)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None,
                labels_B: torch.Tensor | None = None) -> ClassificationOutput:
        state = self.thl.new_state(input_ids_BT.size(0), device=input_ids_BT.device)
        feats_BTS, _ = self.thl.features(input_ids_BT, state)
        h_BTS = self.thl.head.norm(feats_BTS)
        if attention_mask_BT is None:
            attention_mask_BT = torch.ones_like(input_ids_BT)
        if attention_mask_BT.shape != input_ids_BT.shape:
            raise ModelError(f"attention_mask shape {tuple(attention_mask_BT.shape)} must equal input shape "
                             f"{tuple(input_ids_BT.shape)}")
        mask_BT1 = attention_mask_BT.to(h_BTS.dtype).unsqueeze(-1)
        count_B1 = mask_BT1.sum(1)
        if bool((count_B1 == 0).any()):
            raise ModelError("a row of attention_mask has no real token; every sequence needs at least one")
        logits_BL = self.classifier((h_BTS * mask_BT1).sum(1) / count_B1)
        loss = F.cross_entropy(logits_BL, labels_B) if labels_B is not None else None
        return ClassificationOutput(logits=logits_BL, loss=loss)


def build(cfg: THLConfig) -> THLModel:
    return THLModel(cfg)
