"""Token-choice top-k mixture-of-experts feed-forward layer with sort-based dispatch.

Every token picks its ``top_k`` experts from a linear router. The (token, expert) assignments are sorted by expert
once, so the tokens of each expert sit in one contiguous block and each expert runs one matmul per projection
(no per-(choice, expert) boolean masks, no expert running k times). Balancing tools, all optional:

- Switch-style load-balancing loss ``E * sum_e f_e * P_e`` on the *top-k dispatch* fractions ``f_e`` (the
  share of all N*k assignments that went to expert e) and the mean router probabilities ``P_e``;
- router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE), which keeps router logits small and bf16-safe;
- auxiliary-loss-free bias balancing (DeepSeek-V3): a per-expert bias added to the scores used for *selection*
  only, nudged after every training forward towards under-loaded experts;
- a capacity factor: each expert takes at most ``ceil(capacity_factor * N * k / E)`` assignments, first choices
  before second choices; dropped assignments are counted in ``stats`` (the token keeps its residual).

Example::

    >>> import torch
    >>> moe = MoELayer(d_model=32, d_ff=64, n_experts=4, top_k=2)
    >>> y_BTD, aux_loss, stats = moe(torch.randn(2, 5, 32))
    >>> y_BTD.shape, aux_loss.ndim, sorted(stats)[:2]
    (torch.Size([2, 5, 32]), 0, ['moe/balance_loss', 'moe/dropped_frac'])
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.torch_private import gelu_backward


class MoELayer(nn.Module):
    """Top-k routed experts (``up: d_model -> d_ff``, activation, ``down: d_ff -> d_model``, no biases).

    Returns ``(y_BTD, aux_loss, stats)`` as the backbone's pluggable FFN contract asks. ``aux_loss`` is already
    weighted and multiplied by ``loss_scale``: the backbone *sums* aux losses over layers, so passing
    ``loss_scale = 1 / n_layers`` makes the total the average over layers.

    Args:
        d_model: width of the residual stream.
        d_ff: hidden width of each expert.
        n_experts: number of experts E.
        top_k: experts per token k (1 <= k <= E). With k > 1 the k gate weights are renormalised to sum to 1;
            with k = 1 the raw router probability is kept so the router still gets a gradient (Switch).
        capacity_factor: 0 disables capacity (no token is dropped); otherwise each expert takes at most
            ``ceil(capacity_factor * N * k / E)`` of the N*k assignments of a forward.
        balance_loss_weight: weight of the Switch load-balancing loss (equals the weight at perfect balance).
        z_loss_weight: weight of the router z-loss.
        bias_balance_rate: step size of the auxiliary-loss-free selection bias update; 0 turns it off.
        activation: "gelu" or "relu".
        dropout: dropout on the layer output.
        loss_scale: multiplies the auxiliary loss (1 / n_layers averages it over the layers of a model).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, *, capacity_factor: float = 0.0,
                 balance_loss_weight: float = 0.01, z_loss_weight: float = 1e-3, bias_balance_rate: float = 0.0,
                 activation: str = "gelu", dropout: float = 0.0, loss_scale: float = 1.0):
        super().__init__()
        if n_experts < 1:
            raise ModelError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ModelError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}; lower top_k or add experts")
        if capacity_factor < 0:
            raise ModelError(f"capacity_factor must be >= 0 (0 = no capacity limit), got {capacity_factor}")
        if min(balance_loss_weight, z_loss_weight, bias_balance_rate) < 0:
            raise ModelError("balance_loss_weight, z_loss_weight and bias_balance_rate must be >= 0, got "
                             f"{balance_loss_weight}, {z_loss_weight}, {bias_balance_rate}")
        if activation not in ("gelu", "relu"):
            raise ModelError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.bias_balance_rate = bias_balance_rate
        self.loss_scale = loss_scale
        self.activation = activation
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # all experts in two stacked tensors: one parameter per projection, sliced per expert without copies
        self.up_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_ff).normal_(0.0, 0.02))
        self.down_EFD = nn.Parameter(torch.empty(n_experts, d_ff, d_model).normal_(0.0, 0.02))
        self.dropout = nn.Dropout(dropout)
        if bias_balance_rate > 0:
            # part of the checkpoint: inference must route with the bias training converged to
            self.register_buffer("balance_bias_E", torch.zeros(n_experts))
        else:
            self.balance_bias_E = None
        self.expert_bias: torch.Tensor | None = None  # set by ``set_expert_bias`` (inference steering)

    def set_expert_bias(self, bias: torch.Tensor | None) -> None:
        """Add ``bias`` to the router logits: shape (E,) for every token, (B, E) per sequence; None removes it.

        The HMST meta-controller uses this to steer a query towards some experts (the bias changes both which
        experts are chosen and their gate weights).
        """
        if bias is not None and (bias.dim() not in (1, 2) or bias.size(-1) != self.n_experts):
            raise ModelError(f"expert bias must have shape (n_experts,) or (batch, n_experts) with "
                             f"n_experts={self.n_experts}, got {tuple(bias.shape)}")
        self.expert_bias = bias

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        B, T, D = x_BTD.shape
        E, K = self.n_experts, self.top_k
        x_ND = x_BTD.reshape(B * T, D)
        N = x_ND.size(0)

        # the router runs in fp32 even under autocast: a softmax over near-tied bf16 logits flips top-k choices
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
        if self.expert_bias is not None:
            bias = self.expert_bias.to(logits_NE.dtype)
            if bias.dim() == 2:
                if bias.size(0) != B:
                    raise ModelError(f"expert bias has {bias.size(0)} rows but the batch has {B} sequences")
                logits_NE = (logits_NE.view(B, T, E) + bias[:, None, :]).view(N, E)
            else:
                logits_NE = logits_NE + bias
        probs_NE = logits_NE.softmax(dim=-1)
        scores_NE = probs_NE if self.balance_bias_E is None else probs_NE + self.balance_bias_E
        experts_NK = scores_NE.topk(K, dim=-1).indices
        gates_NK = probs_NE.gather(1, experts_NK)
        if K > 1:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)

        # Dispatch: flatten the N*K assignments choice-major (all first choices, then all second choices), then
        # one stable sort by expert. Within an expert first choices therefore come first, which is the order
        # the capacity limit keeps.
        expert_A = experts_NK.t().reshape(-1)
        order_A = expert_A.argsort(stable=True)
        tokens_per_expert_E = torch.bincount(expert_A, minlength=E)
        kept_per_expert_E = tokens_per_expert_E
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * N * K / E)
            first_slot_E = tokens_per_expert_E.cumsum(0) - tokens_per_expert_E
            slot_A = torch.arange(N * K, device=x_ND.device) - first_slot_E.repeat_interleave(tokens_per_expert_E)
            order_A = order_A[slot_A < capacity]
            kept_per_expert_E = tokens_per_expert_E.clamp(max=capacity)
        # Expert e's block of the expert input: its kept assignments in sorted order, then zero rows up to a
        # multiple of `bucket`. src_P: the assignment m = choice * N + token in each slot (N*K for a padding row);
        # dest_M: the slot of each assignment (P if dropped).
        A_kept = order_A.numel()
        kept_E = kept_per_expert_E.tolist()
        bucket = _row_bucket(x_ND)
        block_E = [-(-n // bucket) * bucket for n in kept_E]
        if E > 1 and max(block_E) * E <= EQUAL_BLOCKS_MAX_ROWS * sum(block_E):
            # equal blocks: each projection runs as one batched matmul over all experts (see _ExpertFFN)
            block_E = [max(block_E)] * E
        P = sum(block_E)
        slot_A = torch.arange(A_kept, device=x_ND.device)
        if P > A_kept:  # shift each expert's slots by the padding of the experts before it
            pad_before_E = torch.tensor(block_E, device=x_ND.device).cumsum(0) - kept_per_expert_E.cumsum(0)
            pad_before_E = torch.cat([pad_before_E.new_zeros(1), pad_before_E[:-1]])
            slot_A += pad_before_E.repeat_interleave(kept_per_expert_E, output_size=A_kept)
            src_P = torch.full((P,), N * K, dtype=torch.long, device=x_ND.device)
            src_P[slot_A] = order_A
        else:
            src_P = order_A
        dest_M = torch.full((N * K,), P, dtype=torch.long, device=x_ND.device)
        dest_M[order_A] = slot_A

        padded, dropped = P > A_kept, A_kept < N * K
        x_PD = _MoveRows.apply(x_ND.repeat(K, 1), src_P, dest_M, padded, dropped)
        y_PD = self._run_experts(x_PD, block_E)
        y_MD = _MoveRows.apply(y_PD, dest_M, src_P, dropped, padded)
        gate_M = gates_NK.t().reshape(-1, 1).to(y_MD.dtype)
        y_ND = (y_MD * gate_M).view(K, N, D).sum(dim=0)

        # Auxiliary losses. f_e: share of the N*K top-k assignments routed to e (no gradient, as in Switch);
        # P_e: mean router probability (carries the gradient). Perfect balance gives E * sum(1/E * 1/E) = 1.
        dispatch_frac_E = tokens_per_expert_E.float() / (N * K)
        balance_loss = E * (dispatch_frac_E * probs_NE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        aux_loss = self.loss_scale * (self.balance_loss_weight * balance_loss + self.z_loss_weight * z_loss)

        if self.training and self.balance_bias_E is not None:
            with torch.no_grad():  # raise the bias of under-loaded experts, lower it for over-loaded ones
                self.balance_bias_E += self.bias_balance_rate * torch.sign(dispatch_frac_E.mean() - dispatch_frac_E)

        with torch.no_grad():
            entropy_N = -(probs_NE * torch.log(probs_NE.clamp_min(1e-9))).sum(dim=-1)
            stats = {
                "moe/balance_loss": balance_loss.detach(),
                "moe/z_loss": z_loss.detach(),
                "moe/router_entropy": entropy_N.mean(),
                "moe/dropped_frac": 1.0 - kept_per_expert_E.sum().float() / (N * K),
                "moe/experts_used_frac": (tokens_per_expert_E > 0).float().mean(),
                "moe/max_load_over_mean": dispatch_frac_E.max() * E,
            }
        return self.dropout(y_ND.view(B, T, D)), aux_loss, stats

    def _run_experts(self, x_AD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Each expert's contiguous block of sorted assignments through its FFN: one matmul per projection."""
        dtype = torch.get_autocast_dtype(x_AD.device.type) if torch.is_autocast_enabled(x_AD.device.type) else None
        up_EDF, down_EFD = self.up_EDF, self.down_EFD
        if dtype is not None:  # what autocast would do to each matmul, done once for all experts
            x_AD, up_EDF, down_EFD = x_AD.to(dtype), up_EDF.to(dtype), down_EFD.to(dtype)
        return _ExpertFFN.apply(x_AD, up_EDF, down_EFD, tokens_per_expert, self.activation)

    def expert_params(self) -> int:
        """Parameters in all experts together (the part of the layer a token only partly uses)."""
        return self.up_EDF.numel() + self.down_EFD.numel()

    def active_matmul_params(self) -> int:
        """Matmul parameters one token passes through: the router plus ``top_k`` experts."""
        return self.router.weight.numel() + self.expert_params() * self.top_k // self.n_experts


class _MoveRows(torch.autograd.Function):
    """``out[s] = x[src_S[s]]``, with a zero row where ``src_S[s] == len(x)``, for a one-to-one ``src_S``.

    The backward moves the gradient rows back with the inverse map ``inv_R`` (``inv_R[r] = s``, or ``len(out)``
    for a row nobody took). ``index_select``'s own backward is an ``index_add`` that must allow repeated indices,
    which on CPU is a serial scatter-accumulate about 100x slower than this gather. ``src_has_zero``/``inv_has_zero``
    say whether a map points at the zero row (the caller knows from its counts, without a pass over the map).
    """

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, src_S: torch.Tensor, inv_R: torch.Tensor, src_has_zero: bool,
                inv_has_zero: bool) -> torch.Tensor:
        ctx.save_for_backward(inv_R)
        ctx.inv_has_zero = inv_has_zero
        return _take_rows(x_RD, src_S, src_has_zero)

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):
        (inv_R,) = ctx.saved_tensors
        return _take_rows(grad_SD, inv_R, ctx.inv_has_zero), None, None, None, None


def _take_rows(x_RD: torch.Tensor, src_S: torch.Tensor, has_zero: bool) -> torch.Tensor:
    if has_zero:
        x_RD = torch.cat([x_RD, x_RD.new_zeros(1, x_RD.size(1))])
    return x_RD.index_select(0, src_S)


# Expert blocks are all padded to the largest one while that adds at most this share of rows (1.15 = 15%): one
# batched matmul per projection over all experts instead of one matmul per expert makes a bf16 training step 1.05x
# at hmst-micro and hmst-tiny and 1.00x at hmst-source-tiny (bench/bench_moe_bmm.py). Padded rows are computed for
# nothing, so a skewed routing (the meta-controller steering a batch towards one expert) keeps per-expert matmuls.
EQUAL_BLOCKS_MAX_ROWS = 1.15


def _row_bucket(x_ND: torch.Tensor) -> int:
    """Expert blocks are padded to a multiple of this many rows. oneDNN, which runs bf16/fp16 matmuls on CPU,
    JIT-compiles a kernel per matmul shape; expert block sizes change every step, so unpadded each step compiles
    ~150 kernels (at the HMST benchmark shape that was ~0.2 s of a 1.0 s bf16 step). Multiples of 32 rows keep the
    shapes few (cache hits after warm-up) for ~3% padding at 512 rows per expert. fp32 CPU matmuls and GPU
    matmuls do not compile per shape: no padding."""
    device = x_ND.device.type
    if device == "cpu" and torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.float32:
        return 32
    return 32 if device == "cpu" and x_ND.dtype in (torch.bfloat16, torch.float16) else 1


class _ExpertFFN(torch.autograd.Function):
    """``act(x_e @ up[e]) @ down[e]`` for each expert's row block ``x_e``, forward and backward by hand.

    Equal blocks run as batched matmuls over all experts (the rows viewed as ``(E, R, D)``). Otherwise every
    matmul writes straight into its slice of one preallocated output or gradient (``out=``), so there is no
    per-expert ``cat`` of outputs and no ``stack`` of per-expert weight gradients: autograd through slices of
    the stacked weights would materialise both, a copy of all expert weights per layer and step.
    """

    @staticmethod
    def forward(ctx, x_AD, up_EDF, down_EFD, tokens_per_expert: list[int], activation: str):
        with torch.autocast(x_AD.device.type, enabled=False):
            E, A, F_ = up_EDF.size(0), x_AD.size(0), up_EDF.size(2)
            bounds = _block_bounds(tokens_per_expert)
            equal = len(set(tokens_per_expert)) == 1
            if equal:
                h_AF = torch.bmm(x_AD.view(E, -1, x_AD.size(1)), up_EDF).view(A, F_)
            else:
                h_AF = x_AD.new_empty(A, F_)
                for e, (lo, hi) in enumerate(bounds):
                    torch.mm(x_AD[lo:hi], up_EDF[e], out=h_AF[lo:hi])
            a_AF = F.gelu(h_AF) if activation == "gelu" else F.relu(h_AF)
            if equal:
                y_AD = torch.bmm(a_AF.view(E, -1, F_), down_EFD).view(A, -1)
            else:
                y_AD = x_AD.new_empty(A, down_EFD.size(2))
                for e, (lo, hi) in enumerate(bounds):
                    torch.mm(a_AF[lo:hi], down_EFD[e], out=y_AD[lo:hi])
        ctx.save_for_backward(x_AD, up_EDF, down_EFD, h_AF, a_AF)
        ctx.bounds, ctx.equal, ctx.activation = bounds, equal, activation
        return y_AD

    @staticmethod
    def backward(ctx, grad_y_AD):
        x_AD, up_EDF, down_EFD, h_AF, a_AF = ctx.saved_tensors
        grad_y_AD = grad_y_AD.to(a_AF.dtype).contiguous()
        if ctx.equal:
            E = up_EDF.size(0)
            x_ERD, h_ERF, a_ERF = (t.view(E, -1, t.size(1)) for t in (x_AD, h_AF, a_AF))
            grad_y_ERD = grad_y_AD.view(E, -1, grad_y_AD.size(1))
            grad_down_EFD = torch.bmm(a_ERF.transpose(1, 2), grad_y_ERD)
            grad_a_ERF = torch.bmm(grad_y_ERD, down_EFD.transpose(1, 2))
            grad_h_ERF = _activation_backward(grad_a_ERF, h_ERF, ctx.activation)
            grad_up_EDF = torch.bmm(x_ERD.transpose(1, 2), grad_h_ERF)
            grad_x_AD = torch.bmm(grad_h_ERF, up_EDF.transpose(1, 2)).view_as(x_AD)
            return grad_x_AD, grad_up_EDF, grad_down_EFD, None, None
        grad_down_EFD, grad_a_AF = torch.empty_like(down_EFD), torch.empty_like(a_AF)
        for e, (lo, hi) in enumerate(ctx.bounds):  # an expert with no tokens gets an all-zero gradient
            torch.mm(a_AF[lo:hi].t(), grad_y_AD[lo:hi], out=grad_down_EFD[e])
            torch.mm(grad_y_AD[lo:hi], down_EFD[e].t(), out=grad_a_AF[lo:hi])
        grad_h_AF = _activation_backward(grad_a_AF, h_AF, ctx.activation)
        grad_up_EDF, grad_x_AD = torch.empty_like(up_EDF), torch.empty_like(x_AD)
        for e, (lo, hi) in enumerate(ctx.bounds):
            torch.mm(x_AD[lo:hi].t(), grad_h_AF[lo:hi], out=grad_up_EDF[e])
            torch.mm(grad_h_AF[lo:hi], up_EDF[e].t(), out=grad_x_AD[lo:hi])
        return grad_x_AD, grad_up_EDF, grad_down_EFD, None, None


def _activation_backward(grad_a: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    return gelu_backward(grad_a, h) if activation == "gelu" else grad_a * (h > 0)


def _block_bounds(tokens_per_expert: list[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(tokens_per_expert))
    return list(zip([0] + ends[:-1], ends))
