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


# (model, batch, threads, vocabulary or None for the preset's, paired repeats): a pipeline worker, then the HMST
# shapes of the bf16 benches on 2 threads
BF16_STEP_SHAPES = (("hmst-micro", 8, 1, 1024, 15), ("hmst-tiny", 16, 2, None, 9), ("hmst-source-tiny", 8, 2, None, 7))


def paired_bf16_steps(use, reference: str, candidate: str, title: str) -> None:
    """Print a markdown table of bf16 training steps (x 128 positions) at ``BF16_STEP_SHAPES``, ``reference``
    against ``candidate`` interleaved, with the median of the paired ratios. ``use(name)`` switches the code under
    test to variant ``name`` before each step; it is left on ``candidate``."""
    import os
    import statistics

    import torch

    from models.registry import build_model
    from orchestration.allocator import keep_freed_memory

    keep_freed_memory()  # as every training process of memtrain does
    print(f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}; {title}\n")
    print(f"| model, batch, threads | {reference} step (ms) | {candidate} step (ms) | speedup (median of pairs) |")
    print("|---|---|---|---|")
    for shape, batch, threads, vocab, repeats in BF16_STEP_SHAPES:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_model(shape, **({"vocab_size": vocab} if vocab else {}))
        step = lm_train_step(model, torch.randint(0, model.cfg.vocab_size, (batch, 129)), bf16=True)

        def variant(name: str, step=step):
            def run():
                use(name)
                step()
            return run
        times = interleaved({name: variant(name) for name in (reference, candidate)}, repeats, warmup=3)
        use(candidate)
        ratio = statistics.median(a / b for a, b in zip(times[reference], times[candidate]))
        print(f"| {shape}, {batch} x 128, {threads} | {statistics.median(times[reference]) * 1e3:.0f} | "
              f"{statistics.median(times[candidate]) * 1e3:.0f} | {ratio:.3f} |", flush=True)
