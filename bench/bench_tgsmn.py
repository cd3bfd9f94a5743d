"""TG-SMN sparse-expert memory LM: layer and training-step speed against dense and the source's algorithm.

One command (about 1 minute on 2 quiet cores, several under load; prints markdown tables)::

    python bench/bench_tgsmn.py

1. FFN layer, forward + backward on 32 x 64 tokens of width 192: our sparse layer (E 256 in groups of 32,
   rank 16, k 2, noise 0.3) and the source's (``bench/source_ref/tgsmn.py``: per-token copies of the local
   router and of the experts' weights), against dense FFNs with equal active parameters (d_ff 52:
   routers plus k experts per token), the source's dense width (d_ff 768) and equal total parameters (d_ff 4,228).
2. Whole training step (forward, backward, clip 1.0, AdamW) at the shape of the original TG-SMN code's step
   benchmark (vocabulary 8,176, batch 32 x 64): tgsmn-dense-small and tgsmn-sparse-small with the pretraining
   loop's optimizer (fused AdamW), and the source's dense and sparse models with the source's step, re-implemented in
   ``bench/source_ref/tgsmn.py``. Sparse runs at the source's fixed controller (k 2, noise 0.3, temperature 1.0).
   Every "x the source" figure is a ratio of steps timed in this run.

Variants run interleaved, one repeat of each in turn, and report medians, so load from other processes on
the shared host hits them alike; the ratios are the robust numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from source_ref import tgsmn as source
from timing import interleaved
from torch import nn

from models.common.transformer import MLP
from models.registry import build_model
from models.tgsmn.sparse import HierarchicalSparseExperts, RoutingKnobs, SparseLMConfig
from orchestration.allocator import keep_freed_memory

ACCEPT_SPARSE_TOKENS_PER_S = 5_700  # issue 5's target for the sparse step on a quiet host
V, B, T = 8_176, 32, 64


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_layer(reps: int) -> None:
    d = 192
    cfg = SparseLMConfig(d_model=d, n_layers=4, n_heads=4, activation="relu", n_experts=256, group_size=32,
                         expert_rank=16, max_k=2)
    knobs = RoutingKnobs(k=2, noise=0.3, temperature=1.0)
    torch.manual_seed(0)
    sparse = HierarchicalSparseExperts(cfg, knobs).train()
    theirs = source.SourceSparseLayer()
    theirs.set_routing(knobs.k, knobs.noise, knobs.temperature)
    G, M = cfg.n_experts // cfg.group_size, cfg.group_size
    active = d * (G + M) + knobs.k * 2 * d * cfg.expert_rank  # the same routing structure in both
    # name -> (x_BTD -> (y_BTD, auxiliary loss or None), total params, active params per token)
    layers = {
        "sparse, ours (batched dispatch)": (lambda x_BTD: sparse(x_BTD)[:2], n_params(sparse), active),
        "sparse, the source's layer (per-token gather)": (
            lambda x_BTD: (theirs(x_BTD.reshape(-1, d)).view_as(x_BTD), None), n_params(theirs), active),
    }
    for label, d_ff in (("dense, equal active params", active // (2 * d)), ("dense, source width", 4 * d),
                        ("dense, equal total params", n_params(sparse) // (2 * d))):
        mlp = MLP(d, d_ff, "relu", 0.0, False)
        layers[f"{label} (d_ff {d_ff:,})"] = (lambda x_BTD, mlp=mlp: mlp(x_BTD)[:2], 2 * d * d_ff, 2 * d * d_ff)
    x_BTD = torch.randn(B, T, d, requires_grad=True)

    def fwd_bwd(forward):
        def run():
            y_BTD, aux = forward(x_BTD)
            loss = y_BTD.square().mean() + (aux if aux is not None else 0.0)
            loss.backward()
        return run

    times = interleaved({name: fwd_bwd(forward) for name, (forward, _, _) in layers.items()}, reps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ours = medians["sparse, ours (batched dispatch)"]
    print(f"\n### FFN layer, forward + backward, {B * T:,} tokens x d {d} (median of {reps}, min)\n")
    print("| layer | total params | active params/token | ms (median) | ms (min) | time / ours |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, total, act) in layers.items():
        print(f"| {name} | {total:,} | {act:,} | {medians[name] * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | "
              f"{medians[name] / ours:.2f} |")


def bench_step(reps: int) -> None:
    x_BT = torch.randint(0, V, (B, T))
    y_BT = torch.randint(0, V, (B, T))

    def ours(name: str):
        torch.manual_seed(0)
        model = build_model(name, vocab_size=V).train()
        if hasattr(model, "set_routing"):
            model.set_routing(2, 0.3, 1.0)  # the source's fixed controller
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

        def step():
            out = model(x_BT, y_BT)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return model, step

    torch.manual_seed(0)
    runs = {"tgsmn-dense-small": ours("tgsmn-dense-small"), "tgsmn-sparse-small": ours("tgsmn-sparse-small"),
            "the source's dense": source.trainer(V, False, x_BT, y_BT),
            "the source's sparse": source.trainer(V, True, x_BT, y_BT)}
    times = interleaved({name: step for name, (_, step) in runs.items()}, reps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    tok_s = {name: B * T / s for name, s in medians.items()}
    dense, sparse = tok_s["tgsmn-dense-small"], tok_s["tgsmn-sparse-small"]
    # the fastest step of each is the nearest to a quiet machine when other jobs come and go during the run
    best = {name: min(ts) for name, ts in times.items()}
    print(f"\n### Training step (fwd + bwd + clip + AdamW), V {V:,}, batch {B} x {T} (median of {reps}, min)\n")
    print("| model | params | ms/step (median) | ms/step (min) | tokens/s (median) | vs our dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (model, _) in runs.items():
        print(f"| {name} | {n_params(model):,} | {medians[name] * 1e3:.0f} | {best[name] * 1e3:.0f} | "
              f"{tok_s[name]:,.0f} | {tok_s[name] / dense:.2f} |")
    for label, step_s in (("median", medians), ("min", best)):
        ours_dense, ours_sparse = step_s["tgsmn-dense-small"], step_s["tgsmn-sparse-small"]
        src_dense, src_sparse = step_s["the source's dense"], step_s["the source's sparse"]
        print(f"\nby {label} step: sparse / dense speed: ours {ours_dense / ours_sparse:.2f}, the source's "
              f"{src_dense / src_sparse:.2f}; ours / the source's step, same run: sparse "
              f"{src_sparse / ours_sparse:.2f}x, dense {src_dense / ours_dense:.2f}x")
    print(f"sparse = {sparse:,.0f} tokens/s (acceptance >= {ACCEPT_SPARSE_TOKENS_PER_S:,} on a quiet host: "
          f"{'met' if sparse >= ACCEPT_SPARSE_TOKENS_PER_S else 'NOT met on this run'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer-reps", type=int, default=15, help="timed repeats per layer variant")
    parser.add_argument("--step-reps", type=int, default=9, help="timed repeats per training-step variant")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every training process of memtrain does (orchestration/allocator.py)
    print(f"torch {torch.__version__}, {args.threads} threads, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    bench_layer(args.layer_reps)
    bench_step(args.step_reps)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
