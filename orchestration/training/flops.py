"""Measured matmul peak of this device, the denominator of MFU (never a hard-coded number)."""

from __future__ import annotations

import time
from functools import cache

import torch


@cache
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.5) -> float:
    """FLOP/s of repeated ``size x size`` matmuls in ``dtype`` on ``device`` with the current thread count: the best
    of 5 windows of ``seconds / 5``, so a burst of other work on the machine does not pass for a low peak (which
    would inflate MFU).

    Example::

        >>> measure_matmul_peak("cpu", torch.float32, size=256, seconds=0.05) > 0
        True
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):  # warm up kernels and caches
        a @ b
    sync()
    best = 0.0
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            if n % 4 == 0:
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / 5:
                    best = max(best, 2 * size**3 * n / elapsed)
                    break
    return best
