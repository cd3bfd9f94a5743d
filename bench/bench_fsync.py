"""What durability costs: fsync on and off, side by side in one command, for the two writes that happen most.

    python bench/bench_fsync.py            # about 1 minute

1. Memory adds: two in-process memories (100k x 128, flat, metric l2), one with ``fsync=True`` (every acknowledged
   write survives power loss) and one with ``fsync=False`` (it survives a killed process only); adds alternate
   between them batch by batch, in batches of 100 and of 10,000.
2. A training checkpoint (the real files of ``memtrain pretrain --model tgsmn-dense-tiny``: weights, AdamW state,
   trainer state, tokenizer, config, manifest) copied into a run folder on this disk as Ray Train copies it
   (``shutil.copytree``), with and without what pretraining adds after that copy on a local disk (fsync of every
   file and folder), alternating, median of 25. With a checkpoint every 50 steps it is paid once per 50 steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory import clustered  # noqa: E402

from memory_service import LocalMemory, MemoryConfig  # noqa: E402
from orchestration.storage import Location  # noqa: E402


def memory_adds(workdir: str, n: int, dim: int, batch: int) -> dict[str, float]:
    """Vectors per second with fsync on and off, adds alternating between the two memories."""
    vectors_ND = clustered(n, dim, seed=batch)
    mems = {name: LocalMemory(MemoryConfig(dim=dim, metric="l2", path=os.path.join(workdir, f"{name}-{batch}"),
                                           fsync=name == "fsync on", snapshot_every=0))
            for name in ("fsync on", "fsync off")}
    spent = dict.fromkeys(mems, 0.0)
    for start in range(0, n, batch):
        chunk_ND, texts = vectors_ND[start:start + batch], [f"doc {start + i}" for i in range(batch)]
        for name, mem in mems.items():
            began = time.perf_counter()
            mem.add(chunk_ND, texts)
            spent[name] += time.perf_counter() - began
    for mem in mems.values():
        mem.close()
    return {name: n / seconds for name, seconds in spent.items()}


def training_checkpoint(folder: str) -> int:
    """The files of a tgsmn-dense-tiny training checkpoint in ``folder``; returns its size in bytes."""
    import torch

    from models.registry import build_model
    from orchestration.training.checkpoint import TrainerState, save_training_checkpoint
    from orchestration.data.tokenizers import ByteTokenizer

    model = build_model("tgsmn-dense-tiny", vocab_size=4096)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 4096, (2, 16)), torch.randint(0, 4096, (2, 16))).loss.backward()
    optimizer.step()  # AdamW's moments exist only after a step
    save_training_checkpoint(folder, model, "tgsmn-dense-tiny", optimizer, TrainerState(step=50),
                             ByteTokenizer().to_json(), "model: tgsmn-dense-tiny\n")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-fsync-", dir=os.path.expanduser("~"))  # the real disk, not a tmpfs
    try:
        print("memory adds, vectors/s (fsync on / fsync off):")
        for n, batch in ((20_000, 100), (100_000, 10_000)):
            rates = memory_adds(workdir, n, 128, batch)
            print(f"  batches of {batch:>6,}: {rates['fsync on']:>9,.0f} / {rates['fsync off']:>9,.0f} vectors/s "
                  f"({rates['fsync on'] / rates['fsync off']:.2f})", flush=True)
        source = os.path.join(workdir, "checkpoint")
        size = training_checkpoint(source)
        times: dict[str, list[float]] = {"durable": [], "plain": []}
        for r in range(args.repeats):
            for name in ("durable", "plain") if r % 2 == 0 else ("plain", "durable"):
                target = os.path.join(workdir, "run", f"{name}-{r}")
                began = time.perf_counter()
                shutil.copytree(source, target)  # Ray Train's copy of a reported checkpoint
                if name == "durable":
                    Location(target).fsync()  # what pretraining adds after it
                times[name].append(time.perf_counter() - began)
        durable, plain = statistics.median(times["durable"]), statistics.median(times["plain"])
        print(f"training checkpoint of {size / 1e6:.1f} MB: durable copy {1000 * durable:.1f} ms, plain copy "
              f"{1000 * plain:.1f} ms: durability adds {1000 * (durable - plain):.1f} ms per checkpoint")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
