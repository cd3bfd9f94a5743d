"""Where a training step's time goes: torch.profiler over bf16 (and fp32) steps, self time per category.

    python bench/profile_train_step.py                              # hmst-source-tiny, 8 x 128, bf16 and fp32
    python bench/profile_train_step.py --model hmst-tiny --batch 16 --seq 128 --dtypes bf16
    python bench/profile_train_step.py --model hmst-micro --set vocab_size=1024 --threads 1 --dtypes bf16   # a pipeline worker
    python bench/profile_train_step.py --model tgsmn-dense-tiny --batch 16 --seq 256 \
        --set vocab_size=4096 --set d_model=256 --set d_ff=1024                        # bench/bench_pretrain.py's model

Categories (by op name): matmul (mm, addmm, bmm, linear and their backward), attention (scaled dot product
attention), MoE dispatch (the row moves, sorts, scatters and gathers of routing), norms and activations, loss
(every op but the matmuls inside the fused head + cross-entropy, with its weight cast and softmax; log-softmax,
cross-entropy and NLL elsewhere), optimizer (the fused AdamW and gradient clipping), embedding, and the rest
(elementwise ops not named above, copies, casts). The in-run matmul peak of each dtype is measured in the same
process, so the matmul share can be read against what the machine offers. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from timing import lm_train_step
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.registry import build_model  # noqa: E402
from orchestration.allocator import keep_freed_memory  # noqa: E402

# first match wins; op names are lower-cased aten/autograd names (e.g. "aten::mm", "mmbackward0")
CATEGORIES = [
    ("optimizer", ("adamw", "_fused_adam", "clip_grad", "_foreach_norm", "_foreach_mul", "linalg_vector_norm",
                   "optimizer.step")),
    ("attention", ("scaled_dot_product", "_flash_attention", "attention")),
    ("loss", ("log_softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("embedding", ("embedding",)),
    ("MoE dispatch", ("_moverows", "index_select", "index_add", "index_put", "scatter", "gather", "argsort", "sort",
                      "bincount", "repeat_interleave", "topk", "cumsum", "_expertffn")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mmbackward",
                "addmmbackward", "bmmbackward", "aten::_addmm_activation")),
    ("norms and activations", ("layer_norm", "rms_norm", "gelu", "silu", "relu", "softmax", "rsqrt", "tanh",
                               "sigmoid")),
    ("casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous",
                          "aten::cat", "aten::stack")),
]


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(key in low for key in keys):
            return label
    return "other elementwise and bookkeeping"


def inside_fused_loss(event) -> bool:
    """Whether a profiler event ran inside the fused head + cross-entropy (its softmax, casts, indexing)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "_LinearCrossEntropy":
            return True
        parent = parent.cpu_parent
    return False


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def profile_step(model_name: str, batch: int, seq: int, bf16: bool, steps: int,
                 overrides: dict) -> tuple[dict, float, float]:
    torch.manual_seed(0)
    model = build_model(model_name, **overrides)
    step = lm_train_step(model, torch.randint(0, model.cfg.vocab_size, (batch, seq + 1)), bf16)

    for _ in range(2):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        label = category(event.name)
        if label != "matmul" and inside_fused_loss(event):
            label = "loss"
        totals[label] += event.self_cpu_time_total / 1e6 / steps
    return totals, wall, model.flops_per_token(seq) * batch * seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hmst-source-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                        help="an integer model config field, e.g. vocab_size=1024 (repeatable)")
    args = parser.parse_args()
    overrides = {key: int(value) for key, value in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every training process of memtrain does
    shape = "".join(f", {key} {value:,}" for key, value in overrides.items())
    print(f"# Training step profile: {args.model}{shape}, batch {args.batch} x {args.seq}, torch {torch.__version__}, "
          f"{args.threads} threads, load average at start {os.getloadavg()[0]:.1f}\n")
    for dtype in args.dtypes.split(","):
        bf16 = dtype == "bf16"
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        totals, wall, flops = profile_step(args.model, args.batch, args.seq, bf16, args.steps, overrides)
        profiled = sum(totals.values())
        print(f"## {dtype}: step {wall * 1e3:.0f} ms (profiled), {flops / wall / 1e9:,.0f} GFLOP/s model FLOPs = "
              f"MFU {flops / wall / peak:.0%} of the in-run {dtype} matmul peak {peak / 1e9:,.0f} GFLOP/s; "
              f"a step at that peak would take {flops / peak * 1e3:.0f} ms\n")
        print("| category | ms per step | share of op time |")
        print("|---|---|---|")
        for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {seconds * 1e3:.1f} | {seconds / profiled:.0%} |")
        print(f"| (op time total; wall {wall * 1e3:.0f} ms) | {profiled * 1e3:.1f} | |\n")


if __name__ == "__main__":
    main()
