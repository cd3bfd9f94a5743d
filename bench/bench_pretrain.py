"""Pretraining throughput: a plain in-process PyTorch loop vs Ray Train with 1 and 2 workers, same model and batch.

    python bench/bench_pretrain.py            # about 4 minutes on 2 CPU cores

Prints tokens/s of each, the Ray/plain ratios, and MFU against the fp32 matmul peak measured in this process.
The model is the dense TG-SMN LM at a CPU benchmark shape: d_model 256, 4 layers, d_ff 1024, 4096-token BPE
vocabulary, 4096 tokens per optimizer step (16 x 256).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.registry import build_model
from orchestration.allocator import keep_freed_memory
from orchestration.config import load_config
from orchestration.data.sources import TokenWindows, WindowOrder, prepare_data
from orchestration.training.flops import measure_matmul_peak
from orchestration.training.pretrain import PretrainConfig, lr_at, param_groups, pretrain
from orchestration.storage import Location, read_metrics

MODEL = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024)
SEQ, GLOBAL_BATCH = 256, 16


def config(out: str, workers: int, steps: int) -> PretrainConfig:
    return load_config(PretrainConfig, overrides=[
        f"output={out}", "data.vocab_size=4096", f"data.seq_len={SEQ}", f"workers={workers}",
        f"cpus_per_worker={2 / workers}", f"batch_size={GLOBAL_BATCH // workers}", f"max_steps={steps}",
        "log_every=5", f"eval_every={steps}", f"checkpoint_every={steps}", "eval_batches=1",
        *[f"model_overrides.{k}={v}" for k, v in MODEL.items()]])


def plain_loop(cfg: PretrainConfig, steps: int) -> float:
    """The same model, batch, optimizer and schedule in a bare loop; tokens/s after 5 warm-up steps."""
    torch.set_num_threads(2)
    data = prepare_data(cfg.data, Location(cfg.output))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=data.vocab_size, **cfg.model_overrides)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=True)
    windows = TokenWindows(data.shard_paths(cfg.data.cache_dir)["train"], SEQ)
    order = WindowOrder(windows.n_windows, 0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = windows.batch(order.take(step * GLOBAL_BATCH, GLOBAL_BATCH))
        model(x, y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return GLOBAL_BATCH * SEQ / statistics.median(times[5:])


def ray_run(out: str, workers: int, steps: int) -> float:
    pretrain(config(out, workers, steps))
    rates = [r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r]
    return statistics.median(rates[1:])  # the first window includes warm-up


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    keep_freed_memory()  # as every training process of memtrain does (orchestration/allocator.py)
    from orchestration.runtime import ensure_ray

    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    cfg = config(str(tmp / "plain"), 1, args.steps)
    torch.set_num_threads(2)
    model = build_model(cfg.model, vocab_size=4096, **cfg.model_overrides)
    flops_per_token = model.flops_per_token(SEQ)
    runs = [("plain (2 threads)", lambda: plain_loop(cfg, args.steps)),
            ("ray train, 1 worker (2 CPUs)", lambda: ray_run(str(tmp / "ray1"), 1, args.steps)),
            ("ray train, 2 workers (1 CPU each)", lambda: ray_run(str(tmp / "ray2"), 2, args.steps)),
            ("plain (2 threads)", lambda: plain_loop(cfg, args.steps)),  # again, to bracket the Ray runs
            ("ray train, 1 worker (2 CPUs)", lambda: ray_run(str(tmp / "ray1b"), 1, args.steps))]
    results: dict[str, list[float]] = {}
    peaks = []
    for name, run in runs:
        # a peak is an upper bound: the highest one measured between runs is the best estimate of the machine's
        peaks.append(measure_matmul_peak.__wrapped__("cpu", torch.float32, seconds=1.0))
        results.setdefault(name, []).append(run())
    peak = max(peaks)
    plain = statistics.median(results["plain (2 threads)"])
    print(f"\nmodel {cfg.model} {MODEL}, {model.num_params():,} params, {GLOBAL_BATCH}x{SEQ} tokens/step, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token; fp32 matmul peak (2 threads, best of {len(peaks)} measured between "
          f"runs): {peak / 1e9:.0f} GFLOP/s")
    print(f"{'run':<36}{'tokens/s':>10}{'vs plain':>10}{'MFU':>8}   (each run)")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"{name:<36}{rate:>10,.0f}{rate / plain:>10.2f}{rate * flops_per_token / peak:>8.1%}   "
              f"{', '.join(f'{r:,.0f}' for r in rates)}")


if __name__ == "__main__":
    main()
