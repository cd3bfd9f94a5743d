"""Side-by-side timing for the benchmarks: variants run in turn, so background load hits them alike."""

from __future__ import annotations

import time


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds of one call of each; seconds per call."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
