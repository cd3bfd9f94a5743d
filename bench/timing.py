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


def lm_train_step(model, ids_BT, bf16: bool):
    """One training step of an LM on the windows ``ids_BT`` (B, T + 1), as memtrain's pretraining runs it: forward
    (bf16 autocast or fp32), backward, fused AdamW with the gradients clipped to 1.0 in its pass. Returns a callable
    that runs one step."""
    import torch

    from orchestration.training.pretrain import clipped_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    inputs_BT, targets_BT = ids_BT[:, :-1], ids_BT[:, 1:]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs_BT, targets_BT)
        out.loss.backward()
        clipped_step(optimizer, 1.0)
        optimizer.zero_grad(set_to_none=True)
    return run
