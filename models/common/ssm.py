"""A Mamba-style selective state-space model in pure PyTorch, with a parallel chunked scan.

The recurrence is Mamba-2's (SSD): per head h, with a state ``s_t`` of shape (P, N),

    s_t = exp(dt_t * A_h) * s_{t-1} + dt_t * x_t B_t^T        y_t = s_t C_t + D_h * x_t

where ``dt_t`` (step size), ``B_t`` and ``C_t`` depend on the input (the "selective" part) and ``A_h < 0`` is one
scalar per head. A scalar decay per head (Mamba-1 has one per channel and state) is what lets the scan run as
matmuls: ``chunked_scan`` splits T into chunks, computes the outputs inside each chunk as a masked,
decay-weighted attention-like product, carries the chunk-final states across chunks with one small
(chunks x chunks) product, and adds their contribution back (the "SSD minimal" algorithm of the Mamba-2 paper).
No state of shape (T, P, N) is ever materialised. ``sequential_scan`` is the step-by-step reference it is tested
against.

With the ``mamba-ssm`` package and a CUDA tensor, ``SelectiveSSM`` calls its fused kernel instead.

Example::

    >>> import torch
    >>> ssm = SelectiveSSM(SSMConfig(d_model=32, d_state=8, head_dim=16, chunk_size=8))
    >>> ssm(torch.randn(2, 20, 32)).shape
    torch.Size([2, 20, 32])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError

try:  # optional fused kernel (needs a CUDA build of mamba-ssm); the pure-PyTorch scan is used otherwise
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None


@dataclass
class SSMConfig:
    """A stack of selective-SSM blocks (the HMST episodic-memory encoder)."""

    d_model: int = 256
    """Width of the input and output features."""
    d_state: int = 16
    """State size N per head (B_t and C_t have this many entries)."""
    head_dim: int = 64
    """Channels P per head; the inner width expand*d_model must be divisible by it."""
    expand: int = 2
    """Inner width as a multiple of d_model."""
    d_conv: int = 4
    """Kernel size of the causal depthwise convolution before the scan."""
    chunk_size: int = 32
    """Chunk length of the parallel scan (work inside a chunk is O(chunk^2), across chunks O(T / chunk))."""
    n_layers: int = 2
    """Residual SSM blocks in an ``SSMEncoder``."""
    use_kernels: bool = True
    """Use mamba-ssm's fused CUDA scan when it is installed and the input is on a GPU."""

    def __post_init__(self):
        for name in ("d_model", "d_state", "head_dim", "expand", "d_conv", "chunk_size", "n_layers"):
            if getattr(self, name) <= 0:
                raise ModelError(f"SSMConfig.{name} must be positive, got {getattr(self, name)}")
        if (self.expand * self.d_model) % self.head_dim:
            raise ModelError(f"expand*d_model = {self.expand * self.d_model} must be divisible by head_dim="
                             f"{self.head_dim}; change head_dim or d_model")


def sequential_scan(x_BTHP: torch.Tensor, dt_BTH: torch.Tensor, A_H: torch.Tensor, B_BTN: torch.Tensor,
                    C_BTN: torch.Tensor, state_BHPN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time (the reference; O(T) Python steps). Returns ``(y_BTHP, final state)``."""
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTN.size(-1)
    s_BHPN = x_BTHP.new_zeros(Bsz, H, P, N) if state_BHPN is None else state_BHPN
    ys = []
    for t in range(T):
        decay_BH = torch.exp(dt_BTH[:, t] * A_H)
        inject_BHPN = (dt_BTH[:, t, :, None] * x_BTHP[:, t])[..., None] * B_BTN[:, t, None, None, :]
        s_BHPN = decay_BH[..., None, None] * s_BHPN + inject_BHPN
        ys.append((s_BHPN @ C_BTN[:, t, None, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), s_BHPN


def _segment_sums(a_XL: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for j <= i, -inf above the diagonal.

    Summed from masked copies rather than as a difference of cumulative sums: across chunks the cumulative
    log-decay grows with T, the difference would lose precision, and the scan must match the sequential one to
    1e-4. (The tensor is only (chunks + 1)^2 per head, so the extra passes cost nothing.)
    """
    L = a_XL.size(-1)
    below_LL = torch.ones(L, L, dtype=torch.bool, device=a_XL.device).tril(-1)
    sums_XLL = a_XL[..., None, :].expand(*a_XL.shape, L).transpose(-1, -2)  # [..., i, j] = a_i
    sums_XLL = sums_XLL.masked_fill(~below_LL, 0.0).cumsum(dim=-2)
    return sums_XLL.masked_fill(~below_LL.logical_or(torch.eye(L, dtype=torch.bool, device=a_XL.device)),
                                float("-inf"))


def chunked_scan(x_BTHP: torch.Tensor, dt_BTH: torch.Tensor, A_H: torch.Tensor, B_BTN: torch.Tensor,
                 C_BTN: torch.Tensor, chunk_size: int = 64,
                 state_BHPN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence as ``sequential_scan``, computed chunk-parallel. Returns ``(y_BTHP, final state)``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x, dt = torch.randn(1, 50, 2, 4, generator=g), torch.rand(1, 50, 2, generator=g)
        >>> A, B, C = -torch.rand(2, generator=g), torch.randn(1, 50, 3, generator=g), torch.randn(1, 50, 3, generator=g)
        >>> torch.allclose(chunked_scan(x, dt, A, B, C, 16)[0], sequential_scan(x, dt, A, B, C)[0], atol=1e-5)
        True
    """
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTN.size(-1)
    L = chunk_size
    pad = (-T) % L
    if pad:  # zero steps (dt = 0: no decay, no input) leave the state unchanged
        x_BTHP, dt_BTH = F.pad(x_BTHP, (0, 0, 0, 0, 0, pad)), F.pad(dt_BTH, (0, 0, 0, pad))
        B_BTN, C_BTN = F.pad(B_BTN, (0, 0, 0, pad)), F.pad(C_BTN, (0, 0, 0, pad))
    c = (T + pad) // L
    a_BHcL = (dt_BTH * A_H).view(Bsz, c, L, H).permute(0, 3, 1, 2)  # log-decay of each step, <= 0
    dt_BHcL = dt_BTH.view(Bsz, c, L, H).permute(0, 3, 1, 2)
    # x in (B, H, c, L, P) order, made contiguous once so the matmuls below read it without copies. The input of
    # step s is u_s = dt_s x_s; dt_s scales the smaller factor next to x in each product instead of x itself.
    x_BHcLP = x_BTHP.view(Bsz, c, L, H, P).permute(0, 3, 1, 2, 4).contiguous()
    B_BcLN, C_BcLN = B_BTN.view(Bsz, c, L, N), C_BTN.view(Bsz, c, L, N)
    acum_BHcL = a_BHcL.cumsum(dim=-1)

    # 1. inside each chunk: y_l = sum_{s<=l} exp(a_{s+1} + ... + a_l) (C_l . B_s) u_s. Within one chunk the
    # cumulative log-decay stays small enough for a plain difference of cumulative sums (two passes instead of
    # the four of _segment_sums, on the largest tensors of the scan). Mask and exp run in place on the fresh
    # difference (exp's backward needs only its output).
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=x_BTHP.device).tril()
    decay_BHcLL = (acum_BHcL[..., :, None] - acum_BHcL[..., None, :]).masked_fill_(~causal_LL, float("-inf")).exp_()
    mix_BHcLL = (decay_BHcLL * (C_BcLN @ B_BcLN.transpose(-1, -2))[:, None]).mul_(dt_BHcL[..., None, :])
    y_BHcLP = mix_BHcLL @ x_BHcLP

    # 2. state each chunk ends in, starting from zero: sum_s exp(a_{s+1} + ... + a_L) u_s B_s^T, kept transposed
    # (N x P) so that step 4 reads it without a copy (the decay scales B, which is N wide, rather than x)
    to_end_BHcL = torch.exp(acum_BHcL[..., -1:] - acum_BHcL)
    chunk_states_BHcNP = (B_BcLN[:, None] * (to_end_BHcL * dt_BHcL)[..., None]).transpose(-1, -2) @ x_BHcLP

    # 3. carry states across chunks: state entering chunk z = sum_{c<z} decay(c+1 .. z-1) * chunk_state_c; the
    # states entering chunks 0..c-1 and the final state are two products, so both come out contiguous
    s0_BH1NP = (x_BTHP.new_zeros(Bsz, H, 1, N, P) if state_BHPN is None
                else state_BHPN.transpose(-1, -2)[:, :, None].to(chunk_states_BHcNP.dtype))
    states_BHzX = torch.cat([s0_BH1NP, chunk_states_BHcNP], dim=2).flatten(-2)
    chunk_decay_BHzz = torch.exp(_segment_sums(F.pad(acum_BHcL[..., -1], (1, 0))))
    entering_BHcNP = (chunk_decay_BHzz[:, :, :-1] @ states_BHzX).view(Bsz, H, c, N, P)
    final_BHPN = (chunk_decay_BHzz[:, :, -1:] @ states_BHzX).view(Bsz, H, N, P).transpose(-1, -2)

    # 4. what the entering state contributes inside the chunk, exp(a_1 + ... + a_l) C_l . state, added to y
    # by one batched multiply-add (the decay again scales the N-wide side). In place: y is a fresh matmul output,
    # which no backward needs; the explicit casts stand in for autocast, which leaves in-place ops alone.
    C_in_BHcLN = C_BcLN[:, None] * torch.exp(acum_BHcL)[..., None]
    y_BHcLP.view(-1, L, P).baddbmm_(C_in_BHcLN.reshape(-1, L, N).to(y_BHcLP.dtype),
                                    entering_BHcNP.view(-1, N, P).to(y_BHcLP.dtype))
    y_BTHP = y_BHcLP.permute(0, 2, 3, 1, 4).reshape(Bsz, c * L, H, P)[:, :T]
    return y_BTHP, final_BHPN


class SelectiveSSM(nn.Module):
    """One Mamba-2-style mixer: input projection, causal depthwise conv, selective scan, gate, output projection."""

    def __init__(self, cfg: SSMConfig):
        super().__init__()
        self.cfg = cfg
        d_inner = cfg.expand * cfg.d_model
        self.d_inner, self.n_heads = d_inner, d_inner // cfg.head_dim
        conv_dim = d_inner + 2 * cfg.d_state  # x, B and C all go through the convolution
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner + 2 * cfg.d_state + self.n_heads, bias=False)
        self.conv = nn.Conv1d(conv_dim, conv_dim, cfg.d_conv, groups=conv_dim, padding=cfg.d_conv - 1)
        # Mamba's init: step sizes log-uniform in [1e-3, 1e-1] (stored through the inverse softplus), decay
        # rates A in [1, 16] so heads cover short and long memories
        dt_H = torch.exp(torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias_H = nn.Parameter(dt_H + torch.log(-torch.expm1(-dt_H)))
        self.A_log_H = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1.0, 16.0)))
        self.D_H = nn.Parameter(torch.ones(self.n_heads))
        self.norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)

    def forward(self, u_BTD: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        Bsz, T, _ = u_BTD.shape
        H, P, N = self.n_heads, cfg.head_dim, cfg.d_state
        z_BTI, xBC_BTC, dt_BTH = self.in_proj(u_BTD).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        xBC_BTC = F.silu(self.conv(xBC_BTC.transpose(1, 2))[..., :T].transpose(1, 2))  # keep the causal part
        x_BTI, B_BTN, C_BTN = xBC_BTC.split([self.d_inner, N, N], dim=-1)
        dt_BTH = F.softplus(dt_BTH + self.dt_bias_H)
        A_H = -torch.exp(self.A_log_H.float())
        x_BTHP = x_BTI.reshape(Bsz, T, H, P)
        if cfg.use_kernels and mamba_chunk_scan_combined is not None and u_BTD.is_cuda:
            y_BTHP = mamba_chunk_scan_combined(x_BTHP, dt_BTH, A_H, B_BTN[:, :, None], C_BTN[:, :, None],
                                               cfg.chunk_size)
        else:
            y_BTHP, _ = chunked_scan(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, cfg.chunk_size)
        y_BTHP = y_BTHP + self.D_H[:, None] * x_BTHP
        y_BTI = self.norm(y_BTHP.reshape(Bsz, T, self.d_inner) * F.silu(z_BTI))
        return self.out_proj(y_BTI)


class SSMEncoder(nn.Module):
    """Pre-norm residual stack of ``SelectiveSSM`` blocks; ``summarize`` pools it into one vector per sequence.

    Example::

        >>> enc = SSMEncoder(SSMConfig(d_model=32, d_state=8, head_dim=16, n_layers=2))
        >>> x_BTD, mask_BT = torch.randn(3, 10, 32), torch.ones(3, 10, dtype=torch.bool)
        >>> enc.summarize(x_BTD, mask_BT).shape
        torch.Size([3, 32])
    """

    def __init__(self, cfg: SSMConfig):
        super().__init__()
        self.cfg = cfg
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
        self.blocks = nn.ModuleList(SelectiveSSM(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if x_BTD.dim() != 3 or x_BTD.size(-1) != self.cfg.d_model:
            raise ModelError(f"SSMEncoder expects (batch, time, {self.cfg.d_model}) features, got "
                             f"{tuple(x_BTD.shape)}")
        for norm, block in zip(self.norms, self.blocks):
            x_BTD = x_BTD + block(norm(x_BTD))
        return self.norm_out(x_BTD)

    def summarize(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the encoder outputs over the valid (``mask_BT`` True) positions: one vector per sequence.

        The encoder is causal, so right-padding never changes the outputs at valid positions.
        """
        h_BTD = self(x_BTD)
        if mask_BT is None:
            return h_BTD.mean(dim=1)
        weights_BT1 = mask_BT[..., None].to(h_BTD.dtype)
        return (h_BTD * weights_BT1).sum(dim=1) / weights_BT1.sum(dim=1).clamp_min(1.0)
