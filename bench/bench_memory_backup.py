"""What the memory's shared backup costs: the same IVF memory actor with no backup and with a backup in an S3 bucket
(moto on loopback), side by side in one command.

    python bench/bench_memory_backup.py            # about 3 minutes on 2 cores

Both memories: 100k x 128 clustered vectors, IVF, metric l2, 2 FAISS threads and 2 CPUs reserved, fsync on. Adds
alternate between the two memories batch by batch, so background load hits them alike: batches of 10k (bulk
loading) and of 100 (one agent's writes: the per-call cost). Searches: batches of 64, k=10, one call at a time
and 2 in flight, repeats interleaved, median. With the backup every acknowledged add is also one object in the
bucket (written before the add returns); searches touch nothing of the backup. Note that the S3 server here
shares the 2 cores with the actor (a real bucket does not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory import IN_FLIGHT, clustered, pipelined_qps, qps  # noqa: E402

from memory_service import MemoryConfig, get_or_create_memory  # noqa: E402
from orchestration.storage.testing import LoopbackS3  # noqa: E402

NAMESPACE = "memtrain-bench"


def timed_adds(mems: dict, vectors_ND, batch: int) -> dict[str, float]:
    """Vectors per second of each memory, adding ``vectors_ND`` in batches, alternating between the memories."""
    spent = dict.fromkeys(mems, 0.0)
    for start in range(0, len(vectors_ND), batch):
        chunk_ND = vectors_ND[start:start + batch]
        texts = [f"doc {start + i}" for i in range(len(chunk_ND))]
        for name, mem in mems.items():
            began = time.perf_counter()
            mem.add(chunk_ND, texts)
            spent[name] += time.perf_counter() - began
    return {name: len(vectors_ND) / seconds for name, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import ray

    workdir = tempfile.mkdtemp(prefix="bench-memory-backup-")
    with LoopbackS3(bucket="bench") as s3:
        os.environ.update(s3.env)  # before Ray starts, so the actors inherit them
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
                 object_store_memory=1024**3)
        try:
            backups = {"no backup": "", "S3 backup": s3.uri("memories/bench")}
            mems = {name: get_or_create_memory(f"bench-{i}", MemoryConfig(
                dim=args.dim, index="ivf", metric="l2", path=os.path.join(workdir, str(i)), backup=backup,
                faiss_threads=2, num_cpus=2, snapshot_every=0), namespace=NAMESPACE)
                for i, (name, backup) in enumerate(backups.items())}
            vectors_ND = clustered(args.n, args.dim, seed=0)
            bulk = timed_adds(mems, vectors_ND, 10_000)
            small = timed_adds(mems, clustered(10_000, args.dim, seed=2), 100)
            queries_QD = clustered(4096, args.dim, seed=1)
            one, flight = {name: [] for name in mems}, {name: [] for name in mems}
            for _ in range(args.repeats):
                for name, mem in mems.items():
                    one[name].append(qps(lambda q, m=mem: m.search(q, 10), queries_QD, 64, 60))
                    flight[name].append(pipelined_qps(mem, queries_QD, 64, 60, 10, IN_FLIGHT))
            for mem in mems.values():
                mem.shutdown(snapshot=False)
        finally:
            ray.shutdown()
    base = "no backup"
    print(f"\n{args.n:,} x {args.dim} IVF memory through the actor; ratios against {base!r}:")
    print("| memory | adds of 10k (vectors/s) | adds of 100 (vectors/s) | IVF batch-64 search, one call at a time "
          f"(q/s) | {IN_FLIGHT} in flight (q/s) |")
    print("|---|---|---|---|---|")
    for name in mems:
        a, b = statistics.median(one[name]), statistics.median(flight[name])
        ra, rb = a / statistics.median(one[base]), b / statistics.median(flight[base])
        print(f"| {name} | {bulk[name]:,.0f} ({bulk[name] / bulk[base]:.2f}) | {small[name]:,.0f} "
              f"({small[name] / small[base]:.2f}) | {a:,.0f} ({ra:.2f}) | {b:,.0f} ({rb:.2f}) |")


if __name__ == "__main__":
    main()
