"""DDP options of pretraining, side by side: two gloo processes of 1 thread each, hmst-micro 8 x 128 bf16 steps.

    python bench/bench_ddp_options.py

The pipeline's pretraining workers have this shape: 2 workers of 1 CPU, a 1.45M-parameter model, so every step
all-reduces 5.8 MB of fp32 gradients and the step is short enough for DDP's own overheads to show. Variants, each
in a fresh pair of processes, in turn: no DDP (the two processes train alone: the floor), DDP with its defaults,
and DDP without the buffer sync before every forward (hmst-micro has no persistent buffer) combined with the two
ways torch 2.13 offers to avoid copying every gradient into the all-reduce buckets and back. Prints the median
step of rank 0 over the last 50 of 60 steps.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (DDP keyword arguments or None for no DDP, zero_grad's set_to_none)
VARIANTS = {
    "two processes, no DDP (no communication)": (None, True),
    "DDP defaults": ({}, True),
    "buffers not synced": ({"forward_sync_buffers": False}, True),
    "buffers not synced, gradients as bucket views": ({"forward_sync_buffers": False,
                                                        "gradient_as_bucket_view": True}, True),
    "buffers not synced, gradients as bucket views, zero_grad keeps them": (
        {"forward_sync_buffers": False, "gradient_as_bucket_view": True}, False),
    "buffers not synced, batched gradient copy": ({"forward_sync_buffers": False, "batched_grad_copy": True}, True),
}


def worker(rank: int, port: int, ddp_kwargs: dict | None, set_to_none: bool, results) -> None:
    from models.registry import build_model
    from orchestration.allocator import keep_freed_memory
    from orchestration.training.pretrain import clipped_step

    torch.set_num_threads(1)
    keep_freed_memory()
    if ddp_kwargs is not None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model("hmst-micro", vocab_size=1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if ddp_kwargs is not None:
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    ids_BT = torch.randint(0, 1024, (8, 129), generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(60):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids_BT[:, :-1], ids_BT[:, 1:])
        out.loss.backward()
        clipped_step(optimizer, 1.0)
        optimizer.zero_grad(set_to_none=set_to_none)
        times.append(time.perf_counter() - start)
    if rank == 0:
        results.put(statistics.median(times[10:]))
    if ddp_kwargs is not None:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ctx = mp.get_context("spawn")
    print(f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}\n")
    print("| variant | ms per step (rank 0, median) |")
    print("|---|---|")
    for name, (kwargs, set_to_none) in VARIANTS.items():
        results, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=worker, args=(rank, port, kwargs, set_to_none, results)) for rank in range(2)]
        for proc in procs:
            proc.start()
        step = results.get()  # before join: a process that put into a queue exits once it is read
        for proc in procs:
            proc.join()
        print(f"| {name} | {step * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
