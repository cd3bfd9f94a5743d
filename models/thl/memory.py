"""THL's memory: the streaming state, the sparse top-kappa router and the novelty-gated writer.

Why the cost per token does not depend on J. The bank keeps, next to each slot's content, its projected key and
value (``keys_BHDJ``, ``values_BHJV``); a write updates the one row it touches, and the decay gamma is one scalar (``scale``) that
multiplies every row, so nothing is re-projected. The only O(J) work left per token is a dot product of the query
with the cached keys and one cosine per slot for the novelty test, both tiny next to the matmuls. Keys and
contents are stored transposed (slot index last) because a row-vector-times-matrix product is ~8x faster on
CPU than the matrix-times-column-vector one.

Why training is fast. The read and the write run outside autograd: the bank is updated in place and no
J-sized tensor is materialised per step. ``recurrence.py`` makes a whole BPTT window one autograd node whose
backward walks the window in reverse and routes each read row's gradient to the write that produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.thl.config import THLConfig

NEVER_WRITTEN = -(2**40)  # last_write of an empty slot: the stalest possible, so replace writes fill it first
FOLD_BELOW = 1e-3  # fold the decay scale into the rows when it falls below this (once per ~14k tokens at 0.9995)


@dataclass
class THLState:
    """Everything a THL stream carries from one token to the next; its size does not depend on stream length.

    Slot contents, keys and values are stored divided by ``scale`` (the product of the decays since the last
    fold), so the per-token decay is one float multiply. ``nbytes()`` is constant over a stream.
    """

    pos: int
    """Tokens consumed so far (drives the tier clocks)."""
    tiers: list[torch.Tensor]
    """One (B, d_k) hidden state per tier."""
    mem_BMJ: torch.Tensor
    """Slot contents, transposed (in units of ``scale``)."""
    keys_BHDJ: torch.Tensor
    """Cached projected key of every slot for every router head, transposed."""
    values_BHJV: torch.Tensor
    """Cached projected value of every slot, split over the router heads."""
    mem_norm_BJ: torch.Tensor
    """Norm of every slot's content (0 for empty slots), for the novelty cosine."""
    load_BJ: torch.Tensor
    """EMA of each slot's share of the read mass, scaled so that 1 is the average slot."""
    last_write_BJ: torch.Tensor
    """Stream position of each slot's last write (int64; NEVER_WRITTEN when empty)."""
    scale: float
    """Decay factor shared by every slot since the last fold."""
    local_k_BHLD: torch.Tensor
    """Keys of the last local_window - 1 tokens for the local attention."""
    local_v_BHLD: torch.Tensor
    """Values of the last local_window - 1 tokens."""
    local_len: int
    """How many of those cached positions hold real tokens (fewer at the start of a stream)."""

    @classmethod
    def zeros(cls, cfg: THLConfig, batch_size: int, device, dtype=torch.float32) -> "THLState":
        B, J, H = batch_size, cfg.memory_slots, cfg.read_heads
        L, Hl, Dl = cfg.local_window - 1, cfg.local_heads, cfg.d_embed // cfg.local_heads
        z = dict(device=device, dtype=dtype)
        return cls(pos=0, tiers=[torch.zeros(B, d, **z) for d in cfg.tier_dims],
                   mem_BMJ=torch.zeros(B, cfg.memory_dim, J, **z), keys_BHDJ=torch.zeros(B, H, cfg.head_dim, J, **z),
                   values_BHJV=torch.zeros(B, H, J, cfg.value_dim // H, **z),
                   mem_norm_BJ=torch.zeros(B, J, **z), load_BJ=torch.ones(B, J, **z),
                   last_write_BJ=torch.full((B, J), NEVER_WRITTEN, device=device, dtype=torch.long), scale=1.0,
                   local_k_BHLD=torch.zeros(B, Hl, L, Dl, **z), local_v_BHLD=torch.zeros(B, Hl, L, Dl, **z),
                   local_len=0)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.tiers, self.mem_BMJ, self.keys_BHDJ, self.values_BHJV, self.mem_norm_BJ, self.load_BJ, self.last_write_BJ,
                self.local_k_BHLD, self.local_v_BHLD]

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (the same at every stream position)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def detach_(self) -> None:
        """Cut every gradient path into the past (truncated BPTT). The bank and metadata never carry a graph."""
        self.tiers = [s.detach() for s in self.tiers]
        self.local_k_BHLD = self.local_k_BHLD.detach()
        self.local_v_BHLD = self.local_v_BHLD.detach()

    def fold_scale(self) -> None:
        """Multiply the shared decay into the rows once it gets small, so the stored rows stay well scaled."""
        if self.scale < FOLD_BELOW:
            for rows in (self.mem_BMJ, self.keys_BHDJ, self.values_BHJV):
                rows.mul_(self.scale)
            self.mem_norm_BJ.mul_(self.scale)
            self.scale = 1.0


class MemoryRouter(nn.Module):
    """Sparse multi-head read: each head scores all slots against cached keys and reads its top-kappa values.

    Training adds Gumbel noise (scale ``router_noise``) before the top-k, so exploration picks other slots;
    the weights are a tempered softmax over the selected (noisy) scores. Gradients reach the query and the
    selected rows' keys and values; ``straight_through`` adds the dense softmax's gradient for all J slots to
    the query (forward unchanged). The backward pass is in ``recurrence.py``.
    """

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.cfg = cfg
        H, dh = cfg.read_heads, cfg.head_dim
        # query = token part (batched in the core's in_proj) + fast tier part (per token) + slow tier part
        # (recomputed only when the slowest tier ticks)
        self.query_fast = nn.Linear(cfg.tier_dims[0], H * dh, bias=False)
        self.query_slow = nn.Linear(cfg.tier_dims[-1], H * dh, bias=False)
        # projects a slot's content to its per-head key and value; run only on rows a write touches
        self.slot_kv = nn.Linear(cfg.memory_dim, H * (dh + cfg.value_dim // H), bias=False)
        self.score_scale = 1.0 / math.sqrt(dh)

    @torch.no_grad()
    def read(self, q_BHD: torch.Tensor, state: THLState, noise_BHJ: torch.Tensor | None,
             keep_dense: bool) -> tuple[torch.Tensor, dict]:
        """Returns the read vector r (B, value_dim) and what the backward pass needs: the weights alpha
        (B, H, kappa), slot indices, the selected keys (B, H, D, kappa) and values (B, H, kappa, V), and with
        ``keep_dense`` the dense softmax over all slots (for the straight-through gradient)."""
        cfg = self.cfg
        B, H, D = q_BHD.shape
        J, K, V = cfg.memory_slots, cfg.read_topk, state.values_BHJV.size(-1)
        # noise and load penalty first, then one fused q . keys GEMM on top (the O(J) part)
        load_BHJ = state.load_BJ.unsqueeze(1).expand(B, H, J)
        bias_BHJ = load_BHJ * -cfg.load_penalty if noise_BHJ is None else noise_BHJ - cfg.load_penalty * load_BHJ
        scores_BHJ = torch.baddbmm(bias_BHJ.view(B * H, 1, J), q_BHD.view(B * H, 1, D),
                                   state.keys_BHDJ.view(B * H, D, J),
                                   alpha=state.scale * self.score_scale).view(B, H, J)
        top_BHK, idx_BHK = scores_BHJ.topk(K, dim=-1)
        keys_BHDK = state.keys_BHDJ.gather(3, idx_BHK.unsqueeze(2).expand(B, H, D, K))
        values_BHKV = state.values_BHJV.gather(2, idx_BHK.unsqueeze(3).expand(B, H, K, V))
        alpha_BHK = torch.softmax(top_BHK / cfg.router_temperature, dim=-1)
        r_BX = (alpha_BHK.unsqueeze(3) * values_BHKV).sum(2).view(B, -1) * state.scale  # kappa rows: elementwise
        rho = cfg.read_ema_decay
        # under autocast the scores (and alpha) are bf16 while the load statistic stays in the state's dtype
        state.load_BJ.mul_(rho).scatter_add_(1, idx_BHK.view(B, H * K),
                                             (alpha_BHK.view(B, H * K) * ((1 - rho) * J / H)).to(state.load_BJ.dtype))
        saved = dict(alpha=alpha_BHK, idx=idx_BHK, keys=keys_BHDK, values=values_BHKV)
        if keep_dense:
            saved["dense"] = torch.softmax(scores_BHJ / cfg.router_temperature, dim=-1)
        return r_BX, saved


class MemoryWriter(nn.Module):
    """Novelty-gated write of one slot per token.

    w = clip(W [s_fast; s_slow]); novelty n = 1 - max_j cos(w, m_j); gate g = sigmoid(beta (n - theta)).
    - n <= theta (g <= 0.5): the content is already stored; the write is suppressed (nothing changes).
    - best cosine >= blend_threshold: blend into that most similar slot, m <- m + eta g (w - m).
    - otherwise replace the slot with the best staleness / under-use score (empty slots first): m <- g w.
    Gradients reach w (through the target and through the gate's cosine with the best slot) and the old
    contents of the written and of the best slot; the slot choice is a hard decision. Backward: ``recurrence.py``.
    """

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.cfg = cfg
        # w = W_fast s_fast + (W_slow s_slow + b); the slow part is recomputed only when the slowest tier ticks
        self.proj_fast = nn.Linear(cfg.tier_dims[0], cfg.memory_dim, bias=False)
        self.proj_slow = nn.Linear(cfg.tier_dims[-1], cfg.memory_dim)

    @torch.no_grad()
    def write(self, s_fast_BD: torch.Tensor, slow_BM: torch.Tensor, state: THLState, router: MemoryRouter,
              keep: bool, keep_old_kv: bool = False) -> dict:
        """Writes into ``state`` in place; ``slow_BM`` = proj_slow(slowest tier). Returns the decisions
        (written?, blended?, gate, slot; each (B,)) and, with ``keep``, what the backward pass needs
        (``keep_old_kv``: also the written slot's key and value rows before the write)."""
        cfg = self.cfg
        u_BM = torch.addmm(slow_BM, s_fast_BD, self.proj_fast.weight.t())
        u_norm_B1 = u_BM.norm(dim=-1, keepdim=True)
        clip_B1 = (cfg.write_clip / (u_norm_B1 + 1e-6)).clamp_(max=1.0)
        w_BM = u_BM * clip_B1
        B, M = w_BM.shape
        H, D = cfg.read_heads, cfg.head_dim
        # the O(J) decisions: novelty against every slot, and the replace candidate
        dots_BJ = torch.matmul(w_BM.unsqueeze(1), state.mem_BMJ).squeeze(1)
        cos_BJ = dots_BJ / (state.mem_norm_BJ * w_BM.norm(dim=-1, keepdim=True) + 1e-8)  # empty slot: cosine 0
        best_cos_B, best_B = cos_BJ.max(dim=-1)
        staleness_BJ = (state.pos - state.last_write_BJ).to(w_BM.dtype).log1p_()
        stale_B = staleness_BJ.mul_(cfg.stale_weight).sub_(state.load_BJ, alpha=cfg.underuse_weight).argmax(dim=-1)
        write_B = best_cos_B < 1.0 - cfg.novelty_theta
        blend_B = best_cos_B >= cfg.blend_threshold
        slot_B = torch.where(blend_B, best_B, stale_B)
        slot_index_BM1 = slot_B.view(B, 1, 1).expand(B, M, 1)
        old_BM = state.mem_BMJ.gather(2, slot_index_BM1).squeeze(2)
        gate_B = torch.sigmoid((1.0 - cfg.novelty_theta - best_cos_B) * cfg.novelty_beta)
        coef_B = torch.where(write_B, torch.where(blend_B, cfg.write_rate * gate_B, 1.0), 0.0)
        target_scale_B = torch.where(blend_B, 1.0, gate_B) / state.scale  # rows are stored in units of scale
        target_BM = w_BM * target_scale_B[:, None]
        new_BM = torch.lerp(old_BM, target_BM, coef_B[:, None])
        # in the state's dtype: under autocast the projection comes out in bf16, the caches stay as they were made
        kv_BHE = torch.mm(new_BM, router.slot_kv.weight.t()).view(B, H, -1).to(state.keys_BHDJ.dtype)
        saved = dict(written=write_B, blended=blend_B, gate=gate_B, slot=slot_B)
        if keep:
            saved.update(u=u_BM, u_norm=u_norm_B1, clip=clip_B1, w=w_BM, old=old_BM, target=target_BM, new=new_BM,
                         coef=coef_B, target_scale=target_scale_B, best=best_B,
                         best_row=state.mem_BMJ.gather(2, best_B.view(B, 1, 1).expand(B, M, 1)).squeeze(2))
        key_index_BHD1 = slot_B.view(B, 1, 1, 1).expand(B, H, D, 1)
        value_index_BH1V = slot_B.view(B, 1, 1, 1).expand(B, H, 1, kv_BHE.size(-1) - D)
        if keep_old_kv:
            saved.update(old_keys=state.keys_BHDJ.gather(3, key_index_BHD1),
                         old_values=state.values_BHJV.gather(2, value_index_BH1V))
        # update only the touched row of every cache (an unwritten row gets its own value back)
        slot_B1 = slot_B[:, None]
        state.mem_BMJ.scatter_(2, slot_index_BM1, new_BM.unsqueeze(2))
        state.keys_BHDJ.scatter_(3, key_index_BHD1, kv_BHE[..., :D].unsqueeze(3))
        state.values_BHJV.scatter_(2, value_index_BH1V, kv_BHE[..., D:].unsqueeze(2))
        state.mem_norm_BJ.scatter_(1, slot_B1, new_BM.norm(dim=-1, keepdim=True))
        # positions only grow, so "max" keeps the old last-write time exactly when nothing was written
        state.last_write_BJ.scatter_reduce_(1, slot_B1, torch.where(write_B, state.pos, NEVER_WRITTEN)[:, None],
                                            "amax")
        return saved


def gumbel_noise(shape, scale: float, device, dtype) -> torch.Tensor:
    """Gumbel(0, 1) samples times ``scale`` (the perturbation that makes top-k a sample, Kool et al. 2019)."""
    u = torch.rand(shape, device=device, dtype=dtype).clamp_(1e-9, 1.0 - 1e-9)
    return u.log_().neg_().log_().mul_(-scale)  # -log(-log u) scale, in place: this is T x B x H x J values


def load_balance_loss(alpha_NK: torch.Tensor, idx_NK: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Switch-style balance J * sum_j f_j P_j over reads: f = share of selections (no grad), P = mean weight.

    Equals 1 when reads are spread evenly and grows with concentration; only the selected weights carry a
    gradient, so the cost is O(reads), not O(J) per token.
    """
    counts_J = torch.bincount(idx_NK.flatten(), minlength=num_slots).to(alpha_NK.dtype)
    f_J = counts_J / counts_J.sum()
    return num_slots * (alpha_NK * f_J[idx_NK]).sum() / alpha_NK.size(0)

