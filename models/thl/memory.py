"""THL's memory: the streaming state, the sparse top-kappa router and the novelty-gated writer.

Why the cost per token does not depend on J. The bank keeps, next to each slot's content, its projected key and
value (``keys_BHDJ``, ``values_BHJV``); a write updates the one row it touches, and the decay gamma is one scalar (``scale``) that
multiplies every row, so nothing is re-projected. The only O(J) work left per token is a dot product of the query
with the cached keys and one cosine per slot for the novelty test, both tiny next to the matmuls. Keys and
contents are stored transposed (slot index last) because a row-vector-times-matrix product is ~8x faster on
CPU than the matrix-times-column-vector one.

Why training is fast. The bank is updated in place and never enters autograd as a whole (no J-sized tensor is
materialised per step). Gradients still reach the writer: every write is logged (``WriteLog``), and a read of a
row written earlier in the same BPTT window is a ``_LoggedGather`` whose backward adds the row's gradient to that
write's log entry; ``_LogWrite`` hands the accumulated gradient to the write's own graph. A chain of 0-dim
"tokens" orders the two in autograd, so every read's backward runs before the backward of the writes it saw.
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


class WriteLog:
    """Per BPTT window: which write (log position) last set each slot, and gradient buffers for those writes.

    The buffers mirror the bank tensors with the slot axis replaced by the log position.
    """

    def __init__(self, state: THLState, window: int):
        B, H, D, J = state.keys_BHDJ.shape
        self.src_BJ = torch.full((B, J), -1, dtype=torch.long, device=state.mem_BMJ.device)
        self.grad_mem_BML = state.mem_BMJ.new_zeros(B, state.mem_BMJ.size(1), window)
        self.grad_keys_BHDL = state.keys_BHDJ.new_zeros(B, H, D, window)
        self.grad_values_BHLV = state.values_BHJV.new_zeros(B, H, window, state.values_BHJV.size(-1))
        self.token = state.mem_BMJ.new_zeros(())  # the autograd ordering chain; requires grad after the 1st write

    def gather(self, bank: torch.Tensor, dim: int, index: torch.Tensor, grad_log: torch.Tensor) -> torch.Tensor:
        """``bank.gather(dim, index)`` (index holds slot ids); the rows' gradients go to the writes that set them."""
        src = self.src_BJ.gather(1, index.reshape(index.size(0), -1)).view_as(index)
        return _LoggedGather.apply(self.token, bank, dim, index, src, grad_log)

    def record(self, slot_B: torch.Tensor, step: int, mem_BM: torch.Tensor, keys_BHD: torch.Tensor,
               values_BHV: torch.Tensor) -> None:
        self.src_BJ.scatter_(1, slot_B[:, None], step)
        self.token = _LogWrite.apply(self.token, mem_BM, keys_BHD, values_BHV, step, self)


class _LoggedGather(torch.autograd.Function):
    """Gather rows of an in-place-updated bank; backward adds their gradient to the log entries that wrote them."""

    @staticmethod
    def forward(ctx, token, bank, dim, index, src, grad_log):
        ctx.dim, ctx.src, ctx.grad_log = dim, src, grad_log
        return bank.gather(dim, index)

    @staticmethod
    def backward(ctx, grad):
        # rows that were in the bank when the window started are constants: their gradient is dropped
        valid = (ctx.src >= 0).to(grad.dtype)
        ctx.grad_log.scatter_add_(ctx.dim, ctx.src.clamp(min=0), grad * valid)
        return None, None, None, None, None, None


class _LogWrite(torch.autograd.Function):
    """Link from a write to the token chain; backward returns the gradient the write's readers left in the log."""

    @staticmethod
    def forward(ctx, token, mem_BM, keys_BHD, values_BHV, step, log):
        ctx.step, ctx.log = step, log
        return token.detach().clone()

    @staticmethod
    def backward(ctx, grad_token):
        # every reader of this write consumed a later token, so autograd has already run their backward
        log, i = ctx.log, ctx.step
        return (grad_token, log.grad_mem_BML[:, :, i].clone(), log.grad_keys_BHDL[..., i].clone(),
                log.grad_values_BHLV[:, :, i].clone(), None, None)


class MemoryRouter(nn.Module):
    """Sparse multi-head read: each head scores all slots against cached keys and reads its top-kappa values.

    Training adds Gumbel noise (scale ``router_noise``) before the top-k, so exploration picks other slots;
    the weights are a tempered softmax over the selected (noisy) scores. ``straight_through`` adds the dense
    softmax's gradient for all J slots on top (forward unchanged).
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

    def read(self, q_BHD: torch.Tensor, state: THLState, log: WriteLog | None,
             noise_BHJ: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the read vector r (B, value_dim), the weights alpha (B, H, kappa) and slot indices (B, H, kappa)."""
        cfg = self.cfg
        B, H, D = q_BHD.shape
        K, V, scale = cfg.read_topk, state.values_BHJV.size(-1), state.scale * self.score_scale
        with torch.no_grad():  # the O(J) part: never in autograd
            scores_BHJ = torch.matmul(q_BHD.detach().unsqueeze(2), state.keys_BHDJ).squeeze(2)
            scores_BHJ = scores_BHJ.mul_(scale).sub_(cfg.load_penalty * state.load_BJ.unsqueeze(1))
            if noise_BHJ is not None:
                scores_BHJ += noise_BHJ
            top_BHK, idx_BHK = scores_BHJ.topk(K, dim=-1)
        key_index_BHDK = idx_BHK.unsqueeze(2).expand(B, H, D, K)
        value_index_BHKV = idx_BHK.unsqueeze(3).expand(B, H, K, V)
        if log is None:
            values_BHKV = state.values_BHJV.gather(2, value_index_BHKV)
            logits_BHK = top_BHK
        else:  # recompute the selected scores with a gradient (same values) and route it to logged writes
            keys_BHDK = log.gather(state.keys_BHDJ, 3, key_index_BHDK, log.grad_keys_BHDL)
            values_BHKV = log.gather(state.values_BHJV, 2, value_index_BHKV, log.grad_values_BHLV)
            dot_BHK = (keys_BHDK * q_BHD.unsqueeze(3)).sum(2) * scale
            logits_BHK = dot_BHK + (top_BHK - dot_BHK.detach())
        alpha_BHK = torch.softmax(logits_BHK / cfg.router_temperature, dim=-1)
        r_BHV = (alpha_BHK.unsqueeze(3) * values_BHKV).sum(2)  # kappa rows: elementwise beats a batched matvec
        if log is not None and cfg.straight_through:
            r_BHV = r_BHV + self._straight_through(q_BHD, scores_BHJ, state)
        with torch.no_grad():
            rho = cfg.read_ema_decay
            state.load_BJ.mul_(rho).scatter_add_(1, idx_BHK.view(B, H * K),
                                                 alpha_BHK.detach().view(B, H * K) * ((1 - rho) * cfg.memory_slots / H))
        return r_BHV.flatten(1) * state.scale, alpha_BHK, idx_BHK

    def _straight_through(self, q_BHD, scores_BHJ, state):
        """Zero in the forward pass; its backward is the dense softmax's gradient over every slot (O(J))."""
        keys_BHDJ, values_BHJV = state.keys_BHDJ.clone(), state.values_BHJV.clone()
        dense_BHJ = torch.matmul(q_BHD.unsqueeze(2), keys_BHDJ).squeeze(2) * (state.scale * self.score_scale)
        dense_BHJ = dense_BHJ + (scores_BHJ - dense_BHJ.detach())  # same values as the sparse scores
        soft_BHJ = torch.softmax(dense_BHJ / self.cfg.router_temperature, dim=-1)
        return torch.matmul((soft_BHJ - soft_BHJ.detach()).unsqueeze(2), values_BHJV).squeeze(2)


class MemoryWriter(nn.Module):
    """Novelty-gated write of one slot per token.

    w = clip(W [s_fast; s_slow]); novelty n = 1 - max_j cos(w, m_j); gate g = sigmoid(beta (n - theta)).
    - n <= theta (g <= 0.5): the content is already stored; the write is suppressed (nothing changes).
    - best cosine >= blend_threshold: blend into that most similar slot, m <- m + eta g (w - m).
    - otherwise replace the slot with the best staleness / under-use score (empty slots first): m <- g w.
    """

    def __init__(self, cfg: THLConfig):
        super().__init__()
        self.cfg = cfg
        # w = W_fast s_fast + (W_slow s_slow + b); the slow part is recomputed only when the slowest tier ticks
        self.proj_fast = nn.Linear(cfg.tier_dims[0], cfg.memory_dim, bias=False)
        self.proj_slow = nn.Linear(cfg.tier_dims[-1], cfg.memory_dim)

    def write(self, s_fast_BD: torch.Tensor, slow_BM: torch.Tensor, state: THLState, router: MemoryRouter,
              log: WriteLog | None, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Writes into ``state`` in place; ``slow_BM`` = proj_slow(slowest tier). Returns (written?, blended?,
        gate), each of shape (B,)."""
        cfg = self.cfg
        w_BM = torch.addmm(slow_BM, s_fast_BD, self.proj_fast.weight.t())
        w_BM = w_BM * (cfg.write_clip / (w_BM.norm(dim=-1, keepdim=True) + 1e-6)).clamp(max=1.0)
        B, M = w_BM.shape
        H, D = cfg.read_heads, cfg.head_dim
        with torch.no_grad():  # O(J) decisions, outside autograd
            w_norm_B1 = w_BM.norm(dim=-1, keepdim=True)
            dots_BJ = torch.matmul(w_BM.detach().unsqueeze(1), state.mem_BMJ).squeeze(1)
            cos_BJ = dots_BJ / (state.mem_norm_BJ * w_norm_B1 + 1e-8)  # an empty slot has cosine 0
            best_cos_B, best_B = cos_BJ.max(dim=-1)
            staleness_BJ = (state.pos - state.last_write_BJ).to(w_BM.dtype).log1p_()
            stale_B = (cfg.stale_weight * staleness_BJ - cfg.underuse_weight * state.load_BJ).argmax(dim=-1)
            write_B = best_cos_B < 1.0 - cfg.novelty_theta
            blend_B = best_cos_B >= cfg.blend_threshold
            slot_B = torch.where(blend_B, best_B, stale_B)
            slot_index_BM1 = slot_B.view(B, 1, 1).expand(B, M, 1)
        if log is None:
            cos_B = best_cos_B
            old_BM = state.mem_BMJ.gather(2, slot_index_BM1).squeeze(2)
        else:  # the same values, with gradients reaching w and (through the log) the writes of both rows
            best_BM = log.gather(state.mem_BMJ, 2, best_B.view(B, 1, 1).expand(B, M, 1), log.grad_mem_BML).squeeze(2)
            cos_t_B = (w_BM * best_BM).sum(-1) / (w_BM.norm(dim=-1) * best_BM.norm(dim=-1) + 1e-8)
            cos_B = cos_t_B + (best_cos_B - cos_t_B.detach())
            old_BM = log.gather(state.mem_BMJ, 2, slot_index_BM1, log.grad_mem_BML).squeeze(2)
        gate_B = torch.sigmoid(cfg.novelty_beta * (1.0 - cos_B - cfg.novelty_theta))
        coef_B = torch.where(write_B, torch.where(blend_B, cfg.write_rate * gate_B, 1.0), 0.0)
        target_BM = torch.where(blend_B[:, None], w_BM, gate_B[:, None] * w_BM) / state.scale
        new_BM = old_BM + coef_B[:, None] * (target_BM - old_BM)
        keys_BHD, values_BHV = router.slot_kv(new_BM).view(B, H, -1).split([D, cfg.value_dim // H], dim=-1)
        with torch.no_grad():  # update only the touched row of every cache
            state.mem_BMJ.scatter_(2, slot_index_BM1, new_BM.detach().unsqueeze(2))
            state.keys_BHDJ.scatter_(3, slot_B.view(B, 1, 1, 1).expand(B, H, D, 1), keys_BHD.detach().unsqueeze(3))
            state.values_BHJV.scatter_(2, slot_B.view(B, 1, 1, 1).expand(B, H, 1, values_BHV.size(-1)),
                                       values_BHV.detach().unsqueeze(2))
            state.mem_norm_BJ.scatter_(1, slot_B[:, None], new_BM.detach().norm(dim=-1, keepdim=True))
            last_B1 = state.last_write_BJ.gather(1, slot_B[:, None])
            state.last_write_BJ.scatter_(1, slot_B[:, None], torch.where(write_B[:, None], state.pos, last_B1))
        if log is not None:
            log.record(slot_B, step, new_BM, keys_BHD, values_BHV)
        return write_B, blend_B, gate_B.detach()


def gumbel_noise(shape, scale: float, device, dtype) -> torch.Tensor:
    """Gumbel(0, 1) samples times ``scale`` (the perturbation that makes top-k a sample, Kool et al. 2019)."""
    u = torch.rand(shape, device=device, dtype=dtype).clamp_(1e-9, 1.0 - 1e-9)
    return -torch.log(-torch.log(u)) * scale


def load_balance_loss(alpha_NK: torch.Tensor, idx_NK: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Switch-style balance J * sum_j f_j P_j over reads: f = share of selections (no grad), P = mean weight.

    Equals 1 when reads are spread evenly and grows with concentration; only the selected weights carry a
    gradient, so the cost is O(reads), not O(J) per token.
    """
    counts_J = torch.bincount(idx_NK.flatten(), minlength=num_slots).to(alpha_NK.dtype)
    f_J = counts_J / counts_J.sum()
    return num_slots * (alpha_NK * f_J[idx_NK]).sum() / alpha_NK.size(0)

