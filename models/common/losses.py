"""The LM head and its cross-entropy in one pass, without keeping the (tokens x vocabulary) logits for backward.

``F.cross_entropy(h @ W.T, y)`` materialises the logits, then a log-softmax of the same size, then (in backward) a
gradient of the same size again; at the TG-SMN shape (2,048 tokens x 8,176 words) each is 67 MB of memory
traffic, and the head + loss is the largest single cost of a training step. ``linear_cross_entropy`` computes
the loss and both gradients in the forward pass, chunk by chunk over tokens, turning each chunk's log-softmax into
its gradient in place (softmax - one-hot), so only the (tokens x d_model) and (vocabulary x d_model) gradients
are kept. The matmuls run under the ambient autocast (bf16 on CPU or GPU); the softmax computes in fp32 (for bf16
logits inside the softmax kernels, which round their output once).

Example::

    >>> import torch, torch.nn.functional as F
    >>> h_ND, w_VD, y_N = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, -100, 5, 9])
    >>> reference = F.cross_entropy(h_ND @ w_VD.T, y_N)
    >>> bool(torch.allclose(linear_cross_entropy(h_ND, w_VD, y_N), reference))
    True
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100  # as in F.cross_entropy: targets with this value add no loss and no gradient
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB in fp32): 1,335 rows at V = 50k, 8,208 at V = 8k


def _target_logp_and_logit_grad(logits_CV: torch.Tensor, t_C1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-probability of its target (C x 1, fp32 or fp64) and d(-logp_t)/d logits = softmax - one-hot
    (in the logits' dtype)."""
    if logits_CV.dtype == torch.bfloat16:
        return _target_logp_and_logit_grad_bf16(logits_CV, t_C1)
    # fp32 and fp64 as they are; fp16 (whose range is too narrow for the probabilities) through fp32
    return _target_logp_and_logit_grad_via_fp32(logits_CV, t_C1)


def _target_logp_and_logit_grad_via_fp32(logits_CV: torch.Tensor,
                                          t_C1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A log-softmax in fp32 (or wider), its exp turned into the gradient in place, rounded back to the logits' dtype
    once."""
    logp_CV = torch.log_softmax(logits_CV, dim=-1, dtype=torch.promote_types(logits_CV.dtype, torch.float32))
    logp_t_C1 = logp_CV.gather(1, t_C1)
    g_CV = logp_CV.exp_().scatter_add_(1, t_C1, torch.full_like(t_C1, -1.0, dtype=logp_CV.dtype))
    return logp_t_C1, g_CV.to(logits_CV.dtype)


def _target_logp_and_logit_grad_bf16(logits_CV: torch.Tensor,
                                      t_C1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax that reads the bf16 logits, computes in fp32 and writes bf16. The fp32 path makes four passes over
    an fp32 copy instead (on CPU at 1,024 x 50,258: 160 ms against about 45). The gradient is rounded once, as the
    fp32 path rounds it."""
    g_CV = torch.softmax(logits_CV, dim=-1)
    C, V = g_CV.shape
    target_C = torch.arange(C, device=g_CV.device) * V + t_C1[:, 0]  # in the flat view (scatter_ into bf16 is
    g_V = g_CV.view(-1)                                               # 10,000x slower than this indexing on CPU)
    p_t_C = g_V[target_C].float()
    # p_t - 1 as minus the other entries' total: a rounded p_t minus 1 cancels near p_t = 1 (bf16 steps by 2^-8
    # there), while the total of the others, small for a confident row, keeps its relative precision
    g_V[target_C] = 0
    rest_C = g_CV.sum(dim=-1).float()  # accumulated in fp32
    g_V[target_C] = (-rest_C).to(g_CV.dtype)
    # log p_t from whichever of p_t and 1 - p_t is the smaller, so both keep bf16's relative precision; a p_t that
    # underflowed to 0 in the kernel's fp32 exp (log p_t below -87) counts as -87 (its gradient entry is exact)
    logp_t_C = torch.where(p_t_C < 0.5, p_t_C.clamp_min(torch.finfo(torch.float32).tiny).log(), torch.log1p(-rest_C))
    return logp_t_C[:, None], g_CV


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        N, V = h_ND.shape[0], w_VD.shape[0]
        # matmul inputs cast once to the autocast dtype (autocast would cast w and each chunk's gradient twice)
        device = h_ND.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_ND.dtype
        w_lp_VD = w_VD.to(dtype)
        valid_N = targets_N != IGNORE_INDEX
        count = valid_N.sum().clamp_min(1)
        safe_targets_N1 = torch.where(valid_N, targets_N, 0)[:, None]
        # d loss / d logits = (softmax - one_hot) * valid / count; the row scale is applied to h (D wide) rather
        # than to the V-wide logits, which saves a pass over them
        scale_N1 = (valid_N / count)[:, None]
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h_ND = torch.empty_like(h_ND)
        grad_w_VD = None
        rows = max(1, CHUNK_ELEMENTS // V)
        for start in range(0, N, rows):
            part = slice(start, start + rows)
            h_CD, t_C1, scale_C1 = h_ND[part].to(dtype), safe_targets_N1[part], scale_N1[part]
            logp_t_C1, g_CV = _target_logp_and_logit_grad(h_CD @ w_lp_VD.T, t_C1)
            loss -= (logp_t_C1 * scale_C1).sum()
            grad_h_ND[part] = (g_CV @ w_lp_VD).float() * scale_C1
            grad_w_CVD = g_CV.T @ (h_CD * scale_C1.to(dtype))
            grad_w_VD = grad_w_CVD.float() if grad_w_VD is None else grad_w_VD + grad_w_CVD
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h_ND, grad_w_VD = ctx.saved_tensors  # used once: scaled in place, no new (V x D) tensor
        return grad_h_ND.mul_(grad_loss), grad_w_VD.mul_(grad_loss), None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h_ND @ w_VD.T`` against ``targets_N`` (``IGNORE_INDEX`` skipped).

    Equal to ``F.cross_entropy(h_ND @ w_VD.T, targets_N)`` in value and gradients; see the module docstring for
    why it is faster. Differentiable once (the gradients are computed in the forward pass).
    """
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N)
