"""Semantic memory benchmark: actor vs in-process FAISS, latency, add throughput, crash recovery at 1M.

Run (about 4 minutes on 2 cores)::

    python bench/bench_memory.py --out bench/results/memory.md

What it measures, all in one local Ray session:
  1. For flat and IVF memories of 100k x 128 (clustered data): search QPS through the actor (the full service
     call, texts and metadata included) against raw in-process FAISS on the *same* index (the actor's snapshot
     file, read back into this process), batches of 1 and 64, same FAISS thread count on both sides; through the
     actor from one client one call at a time, from one client with 2 searches in flight (search_async),
     and from 2 client threads at a time (the shared-use case). Repeats are
     interleaved and the median taken, because the machine is shared and noisy.
  2. p50/p95/p99 latency of single queries through the actor on the 100k IVF memory.
  3. Add throughput through the actor (batches of 10k, durable on return).
  4. Recovery: a 1M x 128 IVF memory takes a stream of adds, its actor process is SIGKILLed mid-stream, and
     we time until the restarted actor answers, then check that every acknowledged id is there.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memory_service import MemoryConfig, MemoryServiceError, get_or_create_memory  # noqa: E402
from memory_service.local import SMALL_BATCH  # noqa: E402

NAMESPACE = "memtrain-bench"
IN_FLIGHT = 2  # searches one client keeps in flight with search_async
CLIENTS = 2  # concurrent clients in the shared-use measurement


def clustered(n: int, dim: int, seed: int, centers: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers_CD = rng.standard_normal((centers, dim)).astype(np.float32) * 3
    out_ND = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # chunked so 1M does not need a float64 temporary
        stop = min(start + 100_000, n)
        out_ND[start:stop] = centers_CD[rng.integers(0, centers, stop - start)]
        out_ND[start:stop] += rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out_ND


def fill(mem, vectors_ND: np.ndarray, batch: int) -> float:
    """Add everything in batches; returns vectors per second."""
    started = time.perf_counter()
    for start in range(0, len(vectors_ND), batch):
        chunk_ND = vectors_ND[start:start + batch]
        mem.add(chunk_ND, [f"doc {start + i}" for i in range(len(chunk_ND))])
    return len(vectors_ND) / (time.perf_counter() - started)


def qps(search, queries_QD: np.ndarray, batch: int, calls: int) -> float:
    started = time.perf_counter()
    for c in range(calls):
        start = (c * batch) % (len(queries_QD) - batch)
        search(queries_QD[start:start + batch])
    return calls * batch / (time.perf_counter() - started)


def pipelined_qps(mem, queries_QD: np.ndarray, batch: int, calls: int, k: int, depth: int) -> float:
    """q/s of one client keeping `depth` searches in flight with `search_async`."""
    pending: collections.deque = collections.deque()
    started = time.perf_counter()
    for c in range(calls):
        start = (c * batch) % (len(queries_QD) - batch)
        pending.append(mem.search_async(queries_QD[start:start + batch], k))
        if len(pending) == depth:
            pending.popleft().result()
    while pending:
        pending.popleft().result()
    return calls * batch / (time.perf_counter() - started)


def concurrent_qps(search, queries_QD: np.ndarray, batch: int, calls: int, clients: int) -> float:
    """Total q/s of `clients` threads, each making `calls` searches on its own share of the queries (the way
    several trainers or env runners use one memory)."""
    share = len(queries_QD) // clients
    threads = [threading.Thread(target=qps, args=(search, queries_QD[i * share:(i + 1) * share], batch, calls))
               for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * calls * batch / (time.perf_counter() - started)


def search_comparison(index: str, vectors_ND, queries_QD, workdir: str, threads: int, repeats: int, rows: list) -> object:
    config = MemoryConfig(dim=vectors_ND.shape[1], index=index, metric="l2", path=os.path.join(workdir, index),
                          faiss_threads=threads, num_cpus=threads, snapshot_every=0)
    mem = get_or_create_memory(f"bench-{index}", config, namespace=NAMESPACE)
    add_rate = fill(mem, vectors_ND, 10_000)
    snap = mem.snapshot()
    stats = mem.stats()
    # The very index the actor serves, read back into this process.
    local = faiss.read_index(os.path.join(config.path, "snapshots", f"index-{snap['snapshot_seq']:012d}.faiss"))
    if stats["nlist"]:
        faiss.ParameterSpace().set_index_parameter(local, "nprobe", stats["nprobe"])
    k = 10
    for batch, calls in ((1, 400), (64, 12 if index == "flat" else 60)):
        # The service runs batches under SMALL_BATCH on one FAISS thread; give in-process FAISS the same setting.
        faiss.omp_set_num_threads(1 if batch < SMALL_BATCH else threads)
        inproc, actor, in_flight, shared = [], [], [], []
        for _ in range(repeats):  # interleaved, so both sides see the same background load
            inproc.append(qps(lambda q: local.search(q, k), queries_QD, batch, calls))
            actor.append(qps(lambda q: mem.search(q, k), queries_QD, batch, calls))
            in_flight.append(pipelined_qps(mem, queries_QD, batch, calls, k, IN_FLIGHT))
            shared.append(concurrent_qps(lambda q: mem.search(q, k), queries_QD, batch, calls, CLIENTS))
        a, b, p, c = (statistics.median(v) for v in (inproc, actor, in_flight, shared))
        rows.append((f"{index} (nlist={stats['nlist']}, nprobe={stats['nprobe']})" if stats["nlist"] else index,
                     batch, a, b, p, c))
        print(f"{index:5s} batch {batch:2d}: in-process {a:6.0f} q/s | actor: one call at a time {b:6.0f} ({b / a:.2f}), "
              f"{IN_FLIGHT} in flight {p:6.0f} ({p / a:.2f}), {CLIENTS} clients {c:6.0f} ({c / a:.2f})", flush=True)
    return mem, add_rate


def latency(mem, queries_QD: np.ndarray, n: int) -> tuple[list[float], list[float]]:
    """(p50, p95, p99) ms of single-query searches, and of a no-op actor call interleaved with them (the floor
    Ray and the machine's load set for any call)."""
    search_ms, noop_ms = [], []
    for i in range(n):
        started = time.perf_counter()
        mem.search(queries_QD[i % len(queries_QD)][None], 10)
        search_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        mem.pid()
        noop_ms.append((time.perf_counter() - started) * 1000)
    return [float(v) for v in np.percentile(search_ms, [50, 95, 99])], [float(v) for v in np.percentile(noop_ms, [50, 95, 99])]


def recovery(n: int, dim: int, workdir: str) -> dict:
    vectors_ND = clustered(n, dim, seed=7)
    config = MemoryConfig(dim=dim, index="ivf", metric="l2", path=os.path.join(workdir, "recovery"), num_cpus=2,
                          faiss_threads=2)
    mem = get_or_create_memory("bench-recovery", config, namespace=NAMESPACE)
    build_rate = fill(mem, vectors_ND[: n - 100_000], 20_000)
    # Stream the last 100k in small batches and kill the actor's process in the middle of the stream.
    pid = mem.pid()
    acked = np.zeros(0, np.int64)
    killed_at: list[float] = []

    def kill_mid_stream():
        while acked.size < 30_000:
            time.sleep(0.001)
        killed_at.append(time.perf_counter())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_stream)
    killer.start()
    start = n - 100_000
    answered_at = None
    while killer.is_alive():
        chunk_ND = vectors_ND[start:start + 1000]
        try:
            ids = mem.add(chunk_ND, [f"doc {start + i}" for i in range(len(chunk_ND))])
        except MemoryServiceError:
            break  # the in-flight add was interrupted; it is not acknowledged
        acked = np.concatenate([acked, ids])
        start += len(chunk_ND)
    killer.join()
    stats = mem.stats()  # retries until the restarted actor answers
    answered_at = time.perf_counter()
    recovered = answered_at - killed_at[0]
    # Nothing acknowledged lost: every id acknowledged before the kill (build + stream) is retrievable.
    all_acked = np.concatenate([np.arange(n - 100_000, dtype=np.int64), acked])
    found = sum(len(mem.get(all_acked[i:i + 200_000])) for i in range(0, all_acked.size, 200_000))
    probe = mem.search(vectors_ND[acked[-5:]], 1)
    result = {"n_before_kill": int(all_acked.size), "count_after": stats["count"], "found": found,
              "recovery_s": recovered, "actor_recovery_s": stats["last_recovery_seconds"],
              "replayed": stats["last_recovery_replayed_vectors"], "build_rate": build_rate,
              "probe_ok": bool((probe.ids_QK[:, 0] == acked[-5:]).all()), "pid_changed": mem.pid() != pid}
    mem.shutdown(snapshot=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the search benchmark")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--recovery-n", type=int, default=1_000_000, help="vectors in the recovery benchmark (0 skips it)")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads, in-process and in the actor")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": always a private cluster, never one that other work on this machine is using.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
             object_store_memory=1024**3)
    workdir = tempfile.mkdtemp(prefix="bench-memory-")
    try:
        vectors_ND = clustered(args.n, args.dim, seed=0)
        queries_QD = clustered(4096, args.dim, seed=1)
        rows, adds = [], {}
        mems = {}
        for index in ("flat", "ivf"):
            mems[index], adds[index] = search_comparison(index, vectors_ND, queries_QD, workdir, args.threads,
                                                         args.repeats, rows)
        lat, noop = latency(mems["ivf"], queries_QD, 3000)
        print("ivf single-query latency through the actor: p50 {:.2f} ms  p95 {:.2f} ms  p99 {:.2f} ms".format(*lat))
        print("no-op actor call, interleaved:              p50 {:.2f} ms  p95 {:.2f} ms  p99 {:.2f} ms".format(*noop))
        load = os.getloadavg()[0]
        print(f"1-min load average at the end: {load:.1f} on {os.cpu_count()} CPUs", flush=True)
        for mem in mems.values():
            mem.shutdown(snapshot=False)
        rec = recovery(args.recovery_n, args.dim, workdir) if args.recovery_n else None
        if rec:
            print(f"recovery of {rec}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        write_report(args, rows, adds, lat, noop, load, rec)


def write_report(args, rows, adds, lat, noop, load, rec) -> None:
    lines = [
        "# Semantic memory benchmark",
        "",
        "Reproduce (from the repo root; ~4 min on this 2-core box, shared with other work, so ±30% noise):",
        "",
        "```",
        "python bench/bench_memory.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Data: {args.n:,} x {args.dim} clustered float32, metric l2, k=10, FAISS threads {args.threads} on both sides. "
        f"Batches under {SMALL_BATCH} queries run FAISS on one thread on both sides. In-process = raw `faiss` search on the actor's own snapshot file; actor = `MemoryClient.search` (Ray call; "
        f"texts and metadata from the store's in-memory mirror, sent as compact `PackedHits` and expanded by the client). Median of {args.repeats} interleaved repeats.",
        "",
        f"Through the actor three ways: one client, one call at a time (`search`); one client keeping {IN_FLIGHT} "
        f"searches in flight (`search_async`); {CLIENTS} client threads searching at once. Cells: q/s (ratio to "
        "in-process).",
        "",
        f"| index | batch | in-process q/s | actor, one call at a time | actor, {IN_FLIGHT} in flight | "
        f"actor, {CLIENTS} clients |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {batch} | {a:,.0f} | {b:,.0f} ({b / a:.2f}) | {p:,.0f} ({p / a:.2f}) | {c:,.0f} ({c / a:.2f}) |"
              for name, batch, a, b, p, c in rows]
    lines += [
        "",
        f"Single-query latency through the actor, 100k IVF: p50 {lat[0]:.2f} ms, p95 {lat[1]:.2f} ms, "
        f"**p99 {lat[2]:.2f} ms** (3000 sequential calls). A no-op actor call interleaved with them: p50 {noop[0]:.2f} ms, "
        f"p95 {noop[1]:.2f} ms, p99 {noop[2]:.2f} ms. 1-min load average at the end of the latency run: {load:.1f} on "
        f"{os.cpu_count()} CPUs.",
        "",
        f"Add throughput through the actor (batches of 10k, durable on return, fsync on): flat {adds['flat']:,.0f} "
        f"vectors/s, IVF {adds['ivf']:,.0f} vectors/s (includes the automatic IVF trainings).",
    ]
    if rec:
        lines += [
            "",
            f"Recovery, {args.recovery_n:,} x {args.dim} IVF: SIGKILL of the actor process in the middle of a stream of "
            f"1k-vector adds; restarted actor answered **{rec['recovery_s']:.1f} s** after the kill "
            f"(its own load: snapshot + replay of {rec['replayed']:,} logged vectors + store scan = "
            f"{rec['actor_recovery_s']:.1f} s; the rest is Ray noticing the death and starting a worker). "
            f"Acknowledged before the kill: {rec['n_before_kill']:,}; found after: {rec['found']:,}; count after: "
            f"{rec['count_after']:,}; new pid: {rec['pid_changed']}; last acknowledged vectors find themselves: "
            f"{rec['probe_ok']}. Build rate for the first {args.recovery_n - 100_000:,} (batches of 20k, with auto-snapshots "
            f"every 200k and IVF retrains): {rec['build_rate']:,.0f} vectors/s.",
        ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
