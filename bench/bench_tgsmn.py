"""TG-SMN sparse-expert memory LM: layer and training-step speed against dense and the source's per-token gather.

One command (about 2-3 minutes on 2 cores; prints markdown tables)::

    python bench/bench_tgsmn.py

1. FFN layer, forward + backward on 32 x 64 tokens of width 192: the sparse layer (E 256 in groups of 32,
   rank 16, k 2, noise 0.3) with our dispatch and with the source's dispatch (a copy of the expert weights
   gathered per token, spec §5 S2), against dense FFNs with equal active parameters (d_ff 52: routers plus
   k experts per token), the source's dense width (d_ff 768) and equal total parameters (d_ff 4,228).
2. Whole training step (forward, backward, clip 1.0, AdamW foreach as the pretraining loop uses) at the
   source's benchmark shape (spec §6.2: vocabulary 8,176, batch 32 x 64): tgsmn-dense-small, tgsmn-sparse-small
   at the source's fixed controller (k 2, noise 0.3, temperature 1.0), and the same sparse model with the
   source's per-token-gather dispatch.

Variants run interleaved, one repeat of each in turn, and report medians, so load from other processes on
the shared host hits them alike; the ratios are the robust numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from timing import interleaved
from torch import nn

from models.common.transformer import MLP
from models.registry import build_model
from models.tgsmn.sparse import HierarchicalSparseExperts, RoutingKnobs, SparseLMConfig
from orchestration.allocator import keep_freed_memory

SOURCE_STEP_TOKENS_PER_S = {"dense": 5_600, "sparse": 1_900}  # spec §6.2, quiet host
ACCEPT_SPARSE_TOKENS_PER_S = 5_700  # issue 5: at least 3x the source's sparse step
V, B, T = 8_176, 32, 64


class PerTokenGatherExperts(HierarchicalSparseExperts):
    """The same layer with the source's expert computation: W1[ids], W2[ids] copied for every token-slot."""

    def experts(self, x_ND, expert_ids_NK, gate_NK):
        h_NKR = self.act(torch.einsum("nd,nkdr->nkr", x_ND, self.W1_EDR[expert_ids_NK]))
        y_NKD = torch.einsum("nkr,nkrd->nkd", h_NKR, self.W2_ERD[expert_ids_NK])
        return (y_NKD * gate_NK.unsqueeze(-1)).sum(1), torch.zeros(())


def bench_layer(reps: int) -> None:
    d = 192
    cfg = SparseLMConfig(d_model=d, n_layers=4, n_heads=4, activation="relu", n_experts=256, group_size=32,
                         expert_rank=16, max_k=2)
    knobs = RoutingKnobs(k=2, noise=0.3, temperature=1.0)
    torch.manual_seed(0)
    sparse = HierarchicalSparseExperts(cfg, knobs).train()
    gather = PerTokenGatherExperts(cfg, knobs).train()
    gather.load_state_dict(sparse.state_dict())
    sparse_params = sum(p.numel() for p in sparse.parameters())
    G, M = cfg.n_experts // cfg.group_size, cfg.group_size
    active = d * (G + M) + knobs.k * 2 * d * cfg.expert_rank
    layers: dict[str, tuple[nn.Module, int, int]] = {
        "sparse, ours (batched dispatch)": (sparse, sparse_params, active),
        "sparse, source's per-token gather": (gather, sparse_params, active),
    }
    for label, d_ff in (("dense, equal active params", active // (2 * d)), ("dense, source width", 4 * d),
                        ("dense, equal total params", sparse_params // (2 * d))):
        mlp = MLP(d, d_ff, "relu", 0.0, False)
        layers[f"{label} (d_ff {d_ff:,})"] = (mlp, 2 * d * d_ff, 2 * d * d_ff)
    x_BTD = torch.randn(B, T, d, requires_grad=True)

    def fwd_bwd(layer):
        def run():
            y_BTD, aux, _ = layer(x_BTD)
            loss = y_BTD.square().mean() + (aux if aux is not None else 0.0)
            loss.backward()
        return run

    times = interleaved({name: fwd_bwd(layer) for name, (layer, _, _) in layers.items()}, reps)
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

    def trainer(name: str, gather: bool = False):
        torch.manual_seed(0)
        model = build_model(name, vocab_size=V).train()
        if gather:  # swap in the source's dispatch, same weights and routing
            for block in model.blocks:
                block.ffn.__class__ = PerTokenGatherExperts
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

    runs = {"tgsmn-dense-small": trainer("tgsmn-dense-small"),
            "tgsmn-sparse-small": trainer("tgsmn-sparse-small"),
            "tgsmn-sparse-small, source's per-token gather": trainer("tgsmn-sparse-small", gather=True)}
    times = interleaved({name: step for name, (_, step) in runs.items()}, reps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    tok_s = {name: B * T / s for name, s in medians.items()}
    dense, sparse = tok_s["tgsmn-dense-small"], tok_s["tgsmn-sparse-small"]
    print(f"\n### Training step (fwd + bwd + clip + AdamW), V {V:,}, batch {B} x {T} (median of {reps}, min)\n")
    print("| model | params | ms/step (median) | ms/step (min) | tokens/s (median) | vs dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (model, _) in runs.items():
        print(f"| {name} | {model.num_params():,} | {medians[name] * 1e3:.0f} | {min(times[name]) * 1e3:.0f} | "
              f"{tok_s[name]:,.0f} | {tok_s[name] / dense:.2f} |")
    gather = tok_s["tgsmn-sparse-small, source's per-token gather"]
    print(f"\nsparse / dense = {sparse / dense:.2f} (source: {1900 / 5600:.2f}); "
          f"sparse / per-token-gather sparse = {sparse / gather:.2f}")
    print(f"sparse = {sparse:,.0f} tokens/s = {sparse / SOURCE_STEP_TOKENS_PER_S['sparse']:.1f}x the source's "
          f"{SOURCE_STEP_TOKENS_PER_S['sparse']:,} (acceptance >= {ACCEPT_SPARSE_TOKENS_PER_S:,}: "
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
