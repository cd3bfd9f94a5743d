"""glibc malloc settings for CPU training: keep freed memory for reuse instead of handing it back to the OS.

A training step frees and re-allocates the same large tensors every time (activations, logit chunks, gradients,
bf16 weight copies). glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it on ``free``,
so each step pays one page fault per 4 KB page of each such tensor, about a quarter of the step at the HMST
benchmark shape (``bench/bench_hmst.py``: 4.9M minor faults in 16 steps; 2.60 -> 2.08 s per fp32 step and 1.43 ->
1.07 s per bf16 step with this setting). jemalloc or tcmalloc through ``LD_PRELOAD`` do the same job; this needs no
extra package.

The cost: the process keeps its peak heap for its lifetime (freed memory is reused, not returned). That is what
a training process wants; set ``MEMTRAIN_KEEP_FREED_MEMORY=0`` to opt out.

Example::

    >>> from orchestration.allocator import keep_freed_memory
    >>> keep_freed_memory()   # for the rest of this process's life  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "MEMTRAIN_KEEP_FREED_MEMORY"

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc serve large allocations from its heap and never trim it; True when that is in effect.

    A no-op (False) off Linux, on a libc other than glibc, or with ``MEMTRAIN_KEEP_FREED_MEMORY=0``. Idempotent.
    Call it once per process, before training; it only affects allocations made afterwards.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has mallopt but ignores these parameters
    except (OSError, AttributeError):
        return False
    # mmap for no allocation (so freed blocks stay in the heap), and never trim the heap's top
    _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return _applied
