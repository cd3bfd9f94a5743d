"""Every use memtrain makes of torch's private or undocumented functions, in one place.

Both are ATen backward kernels that torch exposes without documenting them, so a torch release may rename them or
change their arguments. Checked against torch 2.13.0 (the examples below compare each with its public closed
form; a torch upgrade re-runs them). They are plain aliases: a call costs exactly what calling torch's kernel does.

- ``softmax_backward(grad_y, y, dim, input_dtype)`` is ``torch._softmax_backward_data``: the gradient through a
  softmax from its output ``y``, ``y * (grad_y - (grad_y * y).sum(dim, keepdim=True))``, in one kernel.
  Public fallback: that expression (two more temporaries), or ``torch.autograd.grad`` through ``torch.softmax``.
- ``gelu_backward(grad_y, x)`` is ``torch.ops.aten.gelu_backward`` (the exact, erf GELU):
  ``grad_y * (Phi(x) + x * phi(x))`` with Phi and phi the standard normal CDF and density.
  Public fallback: that expression (``torch.special.ndtr`` for Phi), or ``torch.autograd.grad`` through ``F.gelu``.

Example::

    >>> import math, torch
    >>> g_NV = torch.randn(3, 5, dtype=torch.float64)
    >>> y_NV = torch.softmax(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    >>> public_NV = y_NV * (g_NV - (g_NV * y_NV).sum(-1, keepdim=True))
    >>> torch.allclose(softmax_backward(g_NV, y_NV, -1, torch.float64), public_NV)
    True
    >>> x_NV = torch.randn(3, 5, dtype=torch.float64)
    >>> phi_NV = torch.exp(-x_NV**2 / 2) / math.sqrt(2 * math.pi)
    >>> torch.allclose(gelu_backward(g_NV, x_NV), g_NV * (torch.special.ndtr(x_NV) + x_NV * phi_NV))
    True
"""

from __future__ import annotations

import torch

softmax_backward = torch._softmax_backward_data
gelu_backward = torch.ops.aten.gelu_backward
