"""The bf16 head's softmax in one low-precision kernel against an fp32 log-softmax, side by side.

    python bench/bench_loss_bf16.py
    python bench/bench_loss_bf16.py --quality 400 --seeds 1,2,3,4   # training quality, not speed

With bf16 logits, ``linear_cross_entropy`` takes the gradient (softmax - one-hot) from one softmax kernel that reads
bf16 and writes bf16, computing in fp32 inside; the target's entry and log-probability come from the row's other
entries (see ``models/common/losses.py``). The reference is the path it replaced, which fp16 logits still take:
an fp32 log-softmax of the bf16 logits, exp in place, one-hot subtracted, cast back to bf16. Prints the bf16
training step of hmst-micro at the pipeline's per-worker shape (8 x 128, vocabulary 1,024, 1 thread), hmst-tiny
(16 x 128) and hmst-source-tiny (8 x 128, vocabulary 50,258) on 2 threads, interleaved, with the median of the
paired ratios.

``--quality STEPS`` instead trains the pipeline's model (hmst-micro, vocabulary 1,024, 8 x 128, bf16, the
pipeline's learning-rate schedule) from scratch on the builtin corpus with each path, the same seed, data order and
initialisation, and prints each run's validation cross-entropy (computed in fp32) and the paired differences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import torch
from timing import paired_bf16_steps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common import losses  # noqa: E402
from models.registry import build_model  # noqa: E402
from orchestration.allocator import keep_freed_memory  # noqa: E402
from orchestration.config import load_config  # noqa: E402
from orchestration.data.sources import TokenWindows, WindowOrder, prepare_data  # noqa: E402
from orchestration.pipeline import PipelinePretrainConfig  # noqa: E402
from orchestration.storage import Location  # noqa: E402
from orchestration.training.pretrain import clipped_step, lr_at, param_groups  # noqa: E402

# the path bf16 logits took before (and fp16 ones still take): an fp32 log-softmax, exp in place, cast back
FP32_LOG_SOFTMAX = losses._target_logp_and_logit_grad_via_fp32
BF16_SOFTMAX = losses._target_logp_and_logit_grad


def use(name: str) -> None:
    losses._target_logp_and_logit_grad = FP32_LOG_SOFTMAX if name == "fp32 log-softmax" else BF16_SOFTMAX


def validation_loss_after_training(name: str, seed: int, steps: int, cfg: PipelinePretrainConfig, vocab_size: int,
                                   train: TokenWindows, val: TokenWindows) -> float:
    """Train the pipeline's model for ``steps`` bf16 steps with loss path ``name``; fp32 validation cross-entropy."""
    use(name)
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab_size=vocab_size, **cfg.model_overrides)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)
    order = WindowOrder(train.n_windows, seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x_BT, y_BT = train.batch(order.take(step * cfg.batch_size, cfg.batch_size))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x_BT, y_BT).loss
        loss.backward()
        clipped_step(optimizer, cfg.grad_clip)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        batches = [np.arange(i, min(i + 32, val.n_windows)) for i in range(0, min(val.n_windows, 512), 32)]
        return statistics.mean(model(*val.batch(b)).lm_loss.item() for b in batches)


def quality(steps: int, seeds: list[int]) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    print(f"hmst-micro, {steps} bf16 steps of 8 x 128 on the builtin corpus; validation cross-entropy in fp32\n")
    print("| seed | fp32 log-softmax | bf16 softmax | difference |")
    print("|---|---|---|---|")
    differences = []
    with tempfile.TemporaryDirectory(prefix="bench-loss-bf16-") as out:
        cfg = load_config(PipelinePretrainConfig, overrides=[f"output={out}", f"max_steps={steps}"])
        data = prepare_data(cfg.data, Location(out))
        shards = data.shard_paths(cfg.data.cache_dir)
        windows = [TokenWindows(shards[split], cfg.data.seq_len) for split in ("train", "validation")]
        for seed in seeds:
            old, new = (validation_loss_after_training(name, seed, steps, cfg, data.vocab_size, *windows)
                        for name in ("fp32 log-softmax", "bf16 softmax"))
            differences.append(new - old)
            print(f"| {seed} | {old:.4f} | {new:.4f} | {new - old:+.4f} |", flush=True)
    print(f"\nmean difference {statistics.mean(differences):+.4f}"
          + (f" +- {statistics.stdev(differences):.4f} (sd)" if len(differences) > 1 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=int, metavar="STEPS", help="compare training quality instead of speed")
    parser.add_argument("--seeds", default="1,2,3,4")
    args = parser.parse_args()
    if args.quality:
        quality(args.quality, [int(s) for s in args.seeds.split(",")])
    else:
        paired_bf16_steps(use, "fp32 log-softmax", "bf16 softmax", "the head's softmax and gradient for bf16 logits")


if __name__ == "__main__":
    main()
