"""The semantic memory suite, run against both LocalMemory and the Ray actor (real FAISS, real SQLite, real Ray)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from memory_service import LocalMemory, MemoryClient, MemoryConfig, MemoryServiceError, get_or_create_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMESPACE = "memtrain-tests"


class Backend:
    """Opens memories of one implementation and cleans them up; `reopen` simulates a restart of the service."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.opened: list = []
        if kind == "actor":
            request.getfixturevalue("ray_session")

    def open(self, config: MemoryConfig, name: str | None = None):
        if self.kind == "local":
            mem = LocalMemory(config)
        else:
            mem = get_or_create_memory(name or f"t-{uuid.uuid4().hex[:10]}", config, namespace=NAMESPACE)
        self.opened.append(mem)
        return mem

    def reopen(self, mem, config: MemoryConfig):
        """Close without a final snapshot (so the log must be replayed) and open the same path again."""
        if self.kind == "local":
            mem.close()
            return self.open(config)
        name = mem.name
        mem.shutdown(snapshot=False)
        return self.open(config, name=name)

    def close_all(self) -> None:
        for mem in self.opened:
            try:
                mem.close() if self.kind == "local" else mem.shutdown(snapshot=False)
            except Exception:  # already closed/killed by the test itself
                pass


@pytest.fixture(params=["local", "actor"])
def backend(request):
    b = Backend(request.param, request)
    yield b
    b.close_all()


def clustered(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers_CD = rng.standard_normal((centers, dim)).astype(np.float32) * 4
    labels_N = rng.integers(0, centers, n)
    return (centers_CD[labels_N] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def brute_force(vectors_ND: np.ndarray, queries_QD: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids_QK, scores_QK) by numpy, the reference every flat search must equal."""
    if metric == "cosine":
        vectors_ND = vectors_ND / np.linalg.norm(vectors_ND, axis=1, keepdims=True)
        queries_QD = queries_QD / np.linalg.norm(queries_QD, axis=1, keepdims=True)
    if metric == "l2":
        scores_QN = ((queries_QD[:, None, :] - vectors_ND[None, :, :]) ** 2).sum(-1)
        ids_QK = np.argsort(scores_QN, axis=1)[:, :k]
    else:
        scores_QN = queries_QD @ vectors_ND.T
        ids_QK = np.argsort(-scores_QN, axis=1)[:, :k]
    return ids_QK, np.take_along_axis(scores_QN, ids_QK, axis=1)


def recall_at_k(found_QK: np.ndarray, truth_QK: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_QK.tolist(), truth_QK.tolist())]))


# ----- search quality -------------------------------------------------------------------------------------------
def test_hits_carry_texts_metadata_and_padding_exactly(backend, tmp_path):
    # Mixed metadata (dicts and None), non-ASCII and separator-like texts, and k above the entry count, so rows
    # end in padding (id -1, NaN score, None text and metadata).
    mem = backend.open(MemoryConfig(dim=4, index="flat", metric="l2", path=str(tmp_path)))
    texts = ["plain", "naïve ☃ text", "", "with\nnewline, \"quotes\" and \x00"]
    metadata = [{"a": [1, 2]}, None, {"nested": {"b": "ü"}}, None]
    mem.add(np.eye(4, dtype=np.float32), texts, metadata)
    hits = mem.search(np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]], k=6)
    assert hits.ids_QK.shape == hits.scores_QK.shape == (5, 6)
    for q, own in enumerate([0, 1, 2, 3, 0]):
        assert hits.ids_QK[q, 0] == own and hits.texts[q][0] == texts[own] and hits.metadata[q][0] == metadata[own]
        assert hits.ids_QK[q, 4:].tolist() == [-1, -1] and np.isnan(hits.scores_QK[q, 4:]).all()
        assert hits.texts[q][4:] == [None, None] and hits.metadata[q][4:] == [None, None]
        assert [hits.texts[q][j] for j in range(4)] == [texts[i] for i in hits.ids_QK[q, :4]]
    hits.metadata[0][0]["a"].append(3)  # every hit gets its own dict: editing one changes no other
    assert hits.metadata[4][0] == {"a": [1, 2]}
    assert mem.get([0]) == [("plain", {"a": [1, 2]})]


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_equals_numpy_brute_force(backend, tmp_path, metric):
    rng = np.random.default_rng(0)
    vectors_ND = rng.standard_normal((3000, 32)).astype(np.float32)
    queries_QD = rng.standard_normal((25, 32)).astype(np.float32)
    mem = backend.open(MemoryConfig(dim=32, index="flat", metric=metric, path=str(tmp_path)))
    ids_N = mem.add(vectors_ND, [f"doc {i}" for i in range(3000)], [{"i": i} for i in range(3000)])
    assert ids_N.tolist() == list(range(3000))
    hits = mem.search(queries_QD, k=10)
    truth_QK, truth_scores_QK = brute_force(vectors_ND, queries_QD, 10, metric)
    assert recall_at_k(hits.ids_QK, truth_QK) == 1.0
    np.testing.assert_allclose(hits.scores_QK, truth_scores_QK, rtol=1e-4, atol=1e-3)
    assert hits.texts[3] == [f"doc {i}" for i in hits.ids_QK[3]]
    assert hits.metadata[3] == [{"i": int(i)} for i in hits.ids_QK[3]]
    ids, scores, texts, metadata = hits  # the DESIGN contract: a (ids, scores, texts, metadata) tuple
    assert ids.shape == scores.shape == (25, 10) and len(texts) == len(metadata) == 25


def test_ivf_recall_on_clustered_data_at_defaults(backend, tmp_path):
    vectors_ND = clustered(20_000, 32, centers=64, seed=1)
    queries_QD = clustered(200, 32, centers=64, seed=1)[:200] + 0.1
    mem = backend.open(MemoryConfig(dim=32, index="ivf", metric="l2", path=str(tmp_path)))
    # Below the training threshold a flat index serves, and it is exact.
    mem.add(vectors_ND[:1000], ["x"] * 1000)
    assert mem.stats()["index"] == "ivf-untrained"
    for start in range(1000, 20_000, 4750):
        mem.add(vectors_ND[start:start + 4750], [f"v{i}" for i in range(start, min(start + 4750, 20_000))])
    stats = mem.stats()
    assert stats["index"] == "ivf" and stats["nlist"] >= 39 and stats["count"] == 20_000
    hits = mem.search(queries_QD.astype(np.float32), k=10)
    truth_QK, _ = brute_force(vectors_ND, queries_QD.astype(np.float32), 10, "l2")
    assert recall_at_k(hits.ids_QK, truth_QK) >= 0.95
    # Training and retraining kept the id -> text mapping exact.
    top_ids = hits.ids_QK[:, 0]
    assert [t[0] for t in hits.texts] == [("x" if i < 1000 else f"v{i}") for i in top_ids]


def test_hnsw_remove_uses_tombstones_then_rebuilds(backend, tmp_path):
    rng = np.random.default_rng(2)
    vectors_ND = rng.standard_normal((400, 16)).astype(np.float32)
    mem = backend.open(MemoryConfig(dim=16, index="hnsw", metric="l2", path=str(tmp_path), hnsw_rebuild_fraction=0.5))
    ids_N = mem.add(vectors_ND, [str(i) for i in range(400)])
    mem.remove(ids_N[:50])
    assert mem.stats()["tombstones"] == 50
    hits = mem.search(vectors_ND[:50], k=5)
    assert not np.isin(hits.ids_QK, ids_N[:50]).any()  # searches skip tombstones
    mem.remove(ids_N[50:200])  # 200 of 400 are tombstones: the graph is rebuilt without them
    stats = mem.stats()
    assert stats["tombstones"] == 0 and stats["count"] == 200
    assert mem.search(vectors_ND[300:310], k=1).ids_QK[:, 0].tolist() == list(range(300, 310))


# ----- durability -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_persistence_round_trip(backend, tmp_path, index):
    vectors_ND = clustered(3000, 16, centers=10, seed=3)
    config = MemoryConfig(dim=16, index=index, metric="l2", path=str(tmp_path))
    mem = backend.open(config)
    ids_N = mem.add(vectors_ND[:2000], [f"t{i}" for i in range(2000)], [{"n": i} for i in range(2000)])
    mem.remove(ids_N[:100])
    mem.snapshot()
    mem.add(vectors_ND[2000:], [f"t{i}" for i in range(2000, 3000)])  # only in the log
    mem.remove(ids_N[500:510])
    before = mem.search(vectors_ND[1000:1050], k=5)
    stats_before = mem.stats()
    mem = backend.reopen(mem, config)
    stats_after = mem.stats()
    assert stats_after["count"] == stats_before["count"] == 2890
    assert stats_after["last_recovery_replayed_vectors"] == 1000
    assert stats_after["index"] == stats_before["index"]
    after = mem.search(vectors_ND[1000:1050], k=5)
    np.testing.assert_array_equal(after.ids_QK, before.ids_QK)
    assert after.texts == before.texts and after.metadata == before.metadata
    with pytest.raises(MemoryServiceError, match="unknown id"):
        mem.get([0])
    assert mem.add(vectors_ND[:1], ["new"]).tolist() == [3000]  # ids are never reused


def test_reopen_with_different_structure_is_refused(tmp_path):
    LocalMemory(MemoryConfig(dim=8, path=str(tmp_path))).close()
    with pytest.raises(MemoryServiceError, match="dim stored=8 requested=16"):
        LocalMemory(MemoryConfig(dim=16, path=str(tmp_path)))


def test_second_opener_of_a_directory_is_refused(tmp_path):
    with LocalMemory(MemoryConfig(dim=8, path=str(tmp_path))):
        with pytest.raises(MemoryServiceError, match="already open"):
            LocalMemory(MemoryConfig(dim=8, path=str(tmp_path)))


def test_an_ephemeral_memory_deletes_its_folder_when_closed_dropped_or_left_open(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # ephemeral folders land here, where the test looks

    def folders() -> list[str]:
        return sorted(p.name for p in tmp_path.glob("memtrain-memory-*"))

    mem = LocalMemory(MemoryConfig(dim=4))
    assert folders() == [os.path.basename(mem.directory)]
    mem.close()
    assert folders() == []
    mem = LocalMemory(MemoryConfig(dim=4))
    mem.add(np.eye(1, 4, dtype=np.float32), ["x"])
    del mem  # never closed
    gc.collect()
    assert folders() == []
    child = ("import numpy as np, tempfile, sys; tempfile.tempdir = sys.argv[1]\n"
             "from memory_service import LocalMemory, MemoryConfig\n"
             "mem = LocalMemory(MemoryConfig(dim=4)); mem.add(np.eye(1, 4, dtype=np.float32), ['x'])")
    subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=REPO_ROOT, check=True, timeout=120)
    assert folders() == []  # still open when the interpreter exited

    def failing_open(self):
        raise MemoryServiceError("cannot open")

    monkeypatch.setattr(LocalMemory, "_open", failing_open)
    with pytest.raises(MemoryServiceError, match="cannot open"):
        LocalMemory(MemoryConfig(dim=4))
    assert folders() == []


CRASH_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from memory_service import LocalMemory, MemoryConfig
    mem = LocalMemory(MemoryConfig(dim=16, metric="l2", path=sys.argv[1], snapshot_every=300))
    rng = np.random.default_rng(0)
    for batch in range(100000):
        ids = mem.add(rng.standard_normal((25, 16)).astype(np.float32), [f"b{batch}-{j}" for j in range(25)])
        print(batch, ids[0], ids[-1], flush=True)  # printed only after add() returned: acknowledged
""")


def test_crash_recovery_local_kill9_in_stream_of_adds(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    acked = []
    for line in child.stdout:
        batch, first, last = map(int, line.split())
        acked.append((batch, first, last))
        if len(acked) == 60:  # several auto-snapshots have happened; adds are still streaming
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    with LocalMemory(MemoryConfig(dim=16, metric="l2", path=str(tmp_path), snapshot_every=300)) as mem:
        assert mem.stats()["count"] >= 60 * 25
        for batch, first, last in acked:
            entries = mem.get(np.arange(first, last + 1))
            assert [text for text, _ in entries] == [f"b{batch}-{j}" for j in range(25)]


def test_crash_recovery_actor_kill9_in_stream_of_adds(ray_session, tmp_path):
    config = MemoryConfig(dim=16, metric="l2", path=str(tmp_path), snapshot_every=300)
    mem = get_or_create_memory(f"crash-{uuid.uuid4().hex[:8]}", config, namespace=NAMESPACE)
    try:
        old_pid = mem.pid()
        rng = np.random.default_rng(0)
        acked: dict[int, str] = {}

        def kill_mid_stream():
            while len(acked) < 600:  # let the stream (and an auto-snapshot) get going first
                time.sleep(0.005)
            os.kill(old_pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_mid_stream)
        killer.start()
        deadline = time.monotonic() + 90
        while (killer.is_alive() or len(acked) < 2400) and time.monotonic() < deadline:
            texts = [f"t{len(acked)}-{j}" for j in range(20)]
            try:
                ids = mem.add(rng.standard_normal((20, 16)).astype(np.float32), texts)
            except MemoryServiceError as err:
                assert "not acknowledged" in str(err)  # the in-flight add: never counted as acknowledged
                continue
            acked.update(zip(ids.tolist(), texts))
        killer.join()
        assert mem.pid() != old_pid  # Ray restarted the actor, which recovered from snapshot + log
        ids_N = np.array(sorted(acked))
        assert [text for text, _ in mem.get(ids_N)] == [acked[i] for i in ids_N.tolist()]
        assert mem.stats()["count"] >= len(acked)
    finally:
        mem.shutdown(snapshot=False)


# ----- concurrency ----------------------------------------------------------------------------------------------
def _client_work(mem, client: int, batches: int, dim: int) -> tuple[list[int], int]:
    rng = np.random.default_rng(client)
    ids, searched = [], 0
    for b in range(batches):
        vectors_ND = rng.standard_normal((10, dim)).astype(np.float32)
        new = mem.add(vectors_ND, [f"c{client}-b{b}-{j}" for j in range(10)], [{"client": client}] * 10)
        ids.extend(new.tolist())
        hits = mem.search(vectors_ND, k=1)
        assert hits.ids_QK[:, 0].tolist() == new.tolist()  # each client finds what it just wrote
        searched += 10
    return ids, searched


def test_eight_concurrent_clients(backend, tmp_path):
    mem = backend.open(MemoryConfig(dim=16, metric="l2", path=str(tmp_path), snapshot_every=500))
    results: list = [None] * 8
    threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, _client_work(mem, c, 15, 16)))
               for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for ids, _ in results for i in ids]
    assert len(all_ids) == len(set(all_ids)) == 8 * 15 * 10
    stats = mem.stats()
    assert stats["count"] == stats["added_total"] == 1200
    assert stats["searched_queries"] == sum(s for _, s in results) == 1200
    entries = mem.get(all_ids)
    assert [meta["client"] for _, meta in entries] == [c for c in range(8) for _ in range(150)]


def test_client_travels_to_ray_tasks(ray_session, tmp_path):
    """A MemoryClient pickles as (name, namespace): tasks on other workers reach the same actor by name."""
    import ray

    mem = get_or_create_memory(f"tasks-{uuid.uuid4().hex[:8]}", MemoryConfig(dim=4, metric="l2", path=str(tmp_path)),
                               namespace=NAMESPACE)
    try:
        @ray.remote(num_cpus=0.25)
        def add_one(client, value: float) -> int:
            return int(client.add(np.full((1, 4), value, np.float32), [f"from task {value}"])[0])

        ids = ray.get([add_one.remote(mem, float(v)) for v in range(4)])
        assert sorted(ids) == [0, 1, 2, 3]
        hits = mem.search(np.full((1, 4), 2.0, np.float32), k=1)
        assert hits.texts[0] == ["from task 2.0"]
    finally:
        mem.shutdown(snapshot=False)


def test_search_async_keeps_searches_in_flight(ray_session, tmp_path):
    """Several searches in flight from one client give the same hits as one after another; errors surface from
    result()."""
    mem = get_or_create_memory(f"async-{uuid.uuid4().hex[:8]}", MemoryConfig(dim=8, metric="l2", path=str(tmp_path)),
                               namespace=NAMESPACE)
    try:
        vectors_ND = clustered(500, 8, centers=5, seed=6)
        mem.add(vectors_ND, [f"doc {i}" for i in range(500)])
        batches = [vectors_ND[i:i + 16] for i in range(0, 96, 16)]
        pending = [mem.search_async(q_QD, k=3) for q_QD in batches]
        for p, q_QD in zip(pending, batches):
            hits, expected = p.result(), mem.search(q_QD, k=3)
            np.testing.assert_array_equal(hits.ids_QK, expected.ids_QK)
            assert hits.texts == expected.texts
        bad = mem.search_async(np.ones((2, 5), np.float32), k=3)  # wrong dimension: refused by the actor
        with pytest.raises(MemoryServiceError, match="dimension"):
            bad.result()
    finally:
        mem.shutdown(snapshot=False)


# ----- capacity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_eviction_oldest_keeps_mapping_exact(backend, tmp_path, index):
    vectors_ND = clustered(4000, 16, centers=20, seed=4)
    mem = backend.open(MemoryConfig(dim=16, index=index, metric="l2", capacity=2500, path=str(tmp_path)))
    for start in range(0, 4000, 500):
        mem.add(vectors_ND[start:start + 500], [f"v{i}" for i in range(start, start + 500)], [{"i": i} for i in range(start, start + 500)])
    stats = mem.stats()
    assert stats["count"] == 2500 and stats["evicted_total"] == 1500
    with pytest.raises(MemoryServiceError, match="unknown id"):
        mem.get([1499])
    survivors_N = np.arange(1500, 4000)
    assert [t for t, _ in mem.get(survivors_N)] == [f"v{i}" for i in survivors_N]
    probe_N = survivors_N[::50]
    hits = mem.search(vectors_ND[probe_N], k=1)
    # Every hit's text and metadata belong to its id (after FIFO eviction the original HMST code's semantic memory
    # returned other entries' texts here: its positional ids pointed at the wrong metadata).
    for row_ids, row_texts, row_meta in zip(hits.ids_QK.tolist(), hits.texts, hits.metadata):
        assert row_ids[0] >= 1500 and row_texts[0] == f"v{row_ids[0]}" and row_meta[0] == {"i": row_ids[0]}
    assert (hits.ids_QK[:, 0] == probe_N).mean() >= 0.9


def test_eviction_lru_keeps_recently_retrieved(backend, tmp_path):
    rng = np.random.default_rng(5)
    vectors_ND = rng.standard_normal((15, 8)).astype(np.float32)
    mem = backend.open(MemoryConfig(dim=8, metric="l2", capacity=10, eviction="lru", path=str(tmp_path)))
    mem.add(vectors_ND[:10], [str(i) for i in range(10)])
    mem.search(vectors_ND[:5], k=1)  # ids 0..4 retrieved
    mem.add(vectors_ND[10:], [str(i) for i in range(10, 15)])
    survivors = sorted(i for i in range(15) if i not in range(5, 10))
    assert [t for t, _ in mem.get(survivors)] == [str(i) for i in survivors]
    assert mem.stats()["evicted_total"] == 5


# ----- bad input ------------------------------------------------------------------------------------------------
BAD_ADDS = [
    ("wrong dimension", lambda v: (v[:, :7], ["a", "b"]), "dimension 7.*dim=8"),
    ("NaN", lambda v: (np.where(np.arange(8) == 3, np.nan, v).astype(np.float32), ["a", "b"]), "NaN or infinite.*row"),
    ("inf", lambda v: (np.where(np.arange(8) == 3, np.inf, v).astype(np.float32), ["a", "b"]), "NaN or infinite"),
    ("float64", lambda v: (v.astype(np.float64), ["a", "b"]), "dtype float64.*astype\\(np.float32\\)"),
    ("int", lambda v: (v.astype(np.int32), ["a", "b"]), "dtype int32"),
    ("1-D", lambda v: (v[0], ["a"]), "reshape\\(1, -1\\)"),
    ("empty batch", lambda v: (v[:0], []), "empty batch"),
    ("list not array", lambda v: (v.tolist(), ["a", "b"]), "numpy float32 array"),
    ("texts shorter", lambda v: (v, ["a"]), "2 vectors but 1 texts"),
    ("texts a str", lambda v: (v, "ab"), "list of 2 str"),
    ("text not str", lambda v: (v, ["a", 3]), "texts\\[1\\] is int"),
    ("zero vector under cosine", lambda v: (np.zeros_like(v), ["a", "b"]), "all zeros"),
]


def test_every_bad_input_is_refused_and_nothing_is_written(backend, tmp_path):
    mem = backend.open(MemoryConfig(dim=8, metric="cosine", capacity=5, path=str(tmp_path)))
    good_ND = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    assert mem.add(good_ND, ["g0", "g1"]).tolist() == [0, 1]
    for label, make, message in BAD_ADDS:
        vectors, texts = make(good_ND.copy())
        with pytest.raises(MemoryServiceError, match=message):
            mem.add(vectors, texts)
    with pytest.raises(MemoryServiceError, match="metadata entries"):
        mem.add(good_ND, ["a", "b"], [{"x": 1}])
    with pytest.raises(MemoryServiceError, match="not JSON-serialisable"):
        mem.add(good_ND, ["a", "b"], [{"x": object()}, None])
    with pytest.raises(MemoryServiceError, match="larger than the capacity"):
        mem.add(np.ones((6, 8), np.float32), [str(i) for i in range(6)])
    for bad_k in (0, -1, 2.5, True):
        with pytest.raises(MemoryServiceError, match="k must be a positive int"):
            mem.search(good_ND, k=bad_k)
    with pytest.raises(MemoryServiceError, match="dimension 4"):
        mem.search(good_ND[:, :4].copy(), k=1)
    with pytest.raises(MemoryServiceError, match="NaN"):
        mem.search(np.full((1, 8), np.nan, np.float32), k=1)
    with pytest.raises(MemoryServiceError, match=r"unknown id\(s\) \[7, -1\]"):
        mem.remove([0, 7, -1])
    with pytest.raises(MemoryServiceError, match="duplicates"):
        mem.remove([1, 1])
    with pytest.raises(MemoryServiceError, match="integers"):
        mem.remove([0.5])
    with pytest.raises(MemoryServiceError, match="non-empty"):
        mem.remove([])
    # Nothing of any refused call was written: same count, no id consumed, both entries intact.
    stats = mem.stats()
    assert stats["count"] == 2 and stats["next_id"] == 2 and stats["evicted_total"] == 0
    assert [t for t, _ in mem.get([0, 1])] == ["g0", "g1"]
    assert mem.add(good_ND[:1], ["g2"]).tolist() == [2]


def test_bad_config_is_refused():
    with pytest.raises(MemoryServiceError, match="index='ivfpq'.*flat, ivf, hnsw"):
        MemoryConfig(index="ivfpq")
    with pytest.raises(MemoryServiceError, match="dim"):
        MemoryConfig(dim=0)
    with pytest.raises(MemoryServiceError, match="unknown MemoryConfig field.*valid fields"):
        MemoryConfig.from_dict({"dims": 3})


def test_actor_requires_a_path_and_matching_config(ray_session, tmp_path):
    with pytest.raises(MemoryServiceError, match="needs MemoryConfig.path"):
        get_or_create_memory("no-path", MemoryConfig(dim=8), namespace=NAMESPACE)
    name = f"cfg-{uuid.uuid4().hex[:8]}"
    mem = get_or_create_memory(name, MemoryConfig(dim=8, path=str(tmp_path)), namespace=NAMESPACE)
    try:
        with pytest.raises(MemoryServiceError, match="different config.*dim: running=8 requested=16"):
            get_or_create_memory(name, MemoryConfig(dim=16, path=str(tmp_path)), namespace=NAMESPACE)
        assert get_or_create_memory(name, namespace=NAMESPACE).stats()["dim"] == 8  # attach by name only
    finally:
        mem.shutdown(snapshot=False)
    with pytest.raises(MemoryServiceError, match="no memory named"):
        get_or_create_memory("never-created", namespace=NAMESPACE)


# ----- limits, idempotency, timeouts ----------------------------------------------------------------------------
def test_oversize_requests_are_refused_before_any_work(backend, tmp_path):
    mem = backend.open(MemoryConfig(dim=4, metric="l2", path=str(tmp_path), max_k=50, max_batch=100,
                                    max_text_bytes=32, max_metadata_bytes=40))
    ok_ND = np.ones((1, 4), np.float32)
    with pytest.raises(MemoryServiceError, match=r"k=1000000000 is more neighbours .*max_k=50"):
        mem.search(ok_ND, k=10**9)
    with pytest.raises(MemoryServiceError, match=r"queries hold 101 rows, more than the 100 .*max_batch"):
        mem.search(np.ones((101, 4), np.float32), k=1)
    with pytest.raises(MemoryServiceError, match=r"vectors hold 101 rows"):
        mem.add(np.ones((101, 4), np.float32), ["x"] * 101)
    with pytest.raises(MemoryServiceError, match=r"texts\[0\] has 33 bytes, more than the 32 .*max_text_bytes"):
        mem.add(ok_ND, ["é" * 16 + "x"])
    with pytest.raises(MemoryServiceError, match=r"metadata\[0\] is \d+ bytes of JSON, more than the 40"):
        mem.add(ok_ND, ["x"], [{"note": "y" * 40}])
    with pytest.raises(MemoryServiceError, match="more than one call may carry"):
        mem.remove(list(range(101)))
    assert mem.stats()["count"] == 0 and mem.stats()["next_id"] == 0  # nothing was written


def test_an_add_again_with_the_same_key_is_applied_once(backend, tmp_path):
    mem = backend.open(MemoryConfig(dim=4, metric="l2", path=str(tmp_path)))
    batch_ND = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    first = mem.add(batch_ND, ["a", "b", "c"], key="batch-1")
    again = mem.add(batch_ND, ["a", "b", "c"], key="batch-1")  # a retry after a lost answer
    assert again.tolist() == first.tolist() == [0, 1, 2] and mem.stats()["count"] == 3
    assert mem.add(batch_ND[:1], ["d"], key="batch-2").tolist() == [3]
    with pytest.raises(MemoryServiceError, match="key 'batch-1' was used for an add of 3 vectors, not 1"):
        mem.add(batch_ND[:1], ["e"], key="batch-1")
    with pytest.raises(MemoryServiceError, match="key must be None or a non-empty str"):
        mem.add(batch_ND[:1], ["e"], key="")
    reopened = backend.reopen(mem, MemoryConfig(dim=4, metric="l2", path=str(tmp_path)))
    assert reopened.add(batch_ND, ["a", "b", "c"], key="batch-1").tolist() == [0, 1, 2]  # keys survive a restart
    assert reopened.stats()["count"] == 4


def test_a_hung_actor_gives_a_timeout_error_not_a_hang(ray_session, tmp_path):
    name = f"hang-{uuid.uuid4().hex[:8]}"
    # started with the default call timeout (a start-up on a loaded machine can take more than 2 s), then called
    # through a client that waits 2 s
    mem = get_or_create_memory(name, MemoryConfig(dim=4, metric="l2", path=str(tmp_path)), namespace=NAMESPACE)
    pid = mem.pid()
    os.kill(pid, signal.SIGSTOP)  # alive but answering nothing
    try:
        with pytest.raises(MemoryServiceError, match=r"did not answer search_packed within 2 s .*hung or overloaded"):
            MemoryClient(name, NAMESPACE, call_timeout_s=2.0).search(np.ones((1, 4), np.float32), k=1)
    finally:
        os.kill(pid, signal.SIGCONT)
        mem.shutdown(snapshot=False)


# ----- the shared backup ----------------------------------------------------------------------------------------
@pytest.fixture(params=["folder", "s3"])
def backup_uri(request, tmp_path):
    """A shared backup: a folder (as a mount every node sees), or a bucket on the loopback S3 server."""
    if request.param == "folder":
        return str(tmp_path / "backup")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server['bucket']}/memories/{uuid.uuid4().hex[:8]}"


def test_a_memory_comes_back_whole_from_its_backup_on_another_disk(backup_uri, tmp_path):
    config = MemoryConfig(dim=8, metric="l2", path=str(tmp_path / "node-a"), backup=backup_uri, capacity=50)
    rng = np.random.default_rng(1)
    vectors_ND = rng.standard_normal((60, 8)).astype(np.float32)
    with LocalMemory(config) as mem:
        mem.add(vectors_ND[:20], [f"v{i}" for i in range(20)], [{"i": i} for i in range(20)], key="first")
        mem.snapshot()  # the backup gets a snapshot; the records it covers leave its log
        mem.add(vectors_ND[20:60], [f"v{i}" for i in range(20, 60)], key="second")  # evicts the 10 oldest
        mem.remove([15, 16])
        expected = mem.stats()
    # another node: an empty disk, the same backup
    other = MemoryConfig.from_dict({**config.to_dict(), "path": str(tmp_path / "node-b")})
    with LocalMemory(other) as mem:
        stats = mem.stats()
        assert stats["restored_from_backup"]["snapshot_seq"] > 0 and stats["restored_from_backup"]["log_records"] >= 2
        for key in ("count", "next_id", "evicted_total", "removed_total"):
            assert stats[key] == expected[key]
        live_N = np.array([i for i in range(10, 60) if i not in (15, 16)])
        hits = mem.search(vectors_ND[live_N], k=1)
        assert hits.ids_QK[:, 0].tolist() == live_N.tolist()  # every acknowledged vector is its own neighbour
        assert [t for t, _ in mem.get(live_N[:3])] == ["v10", "v11", "v12"] and mem.get([11])[0][1] == {"i": 11}
        assert mem.add(vectors_ND[20:60], [f"v{i}" for i in range(20, 60)], key="second").tolist() == \
            list(range(20, 60))  # the idempotency keys came back too
        assert mem.stats()["count"] == expected["count"]


def test_a_write_the_backup_did_not_take_is_not_acknowledged_and_a_retry_completes_it(tmp_path):
    backup = tmp_path / "backup"
    config = MemoryConfig(dim=4, metric="l2", path=str(tmp_path / "node-a"), backup=str(backup))
    ones_ND = np.ones((2, 4), np.float32)
    with LocalMemory(config) as mem:
        mem.add(ones_ND, ["a", "b"])
        (backup / "log").rename(tmp_path / "log-away")
        (backup / "log").write_text("not a folder")  # the backup refuses writes
        with pytest.raises(MemoryServiceError, match="not in the shared backup, so it is not acknowledged"):
            mem.add(2 * ones_ND, ["c", "d"], key="k")
        (backup / "log").unlink()
        (tmp_path / "log-away").rename(backup / "log")
        assert mem.add(2 * ones_ND, ["c", "d"], key="k").tolist() == [2, 3]  # applied once, now in the backup too
    other = MemoryConfig.from_dict({**config.to_dict(), "path": str(tmp_path / "node-b")})
    with LocalMemory(other) as mem:
        assert mem.stats()["count"] == 4 and [t for t, _ in mem.get([2, 3])] == ["c", "d"]


def test_a_failure_after_the_commit_leaves_the_memory_consistent(tmp_path, monkeypatch):
    """FAISS failing to take an add the store already committed (e.g. out of memory while retraining IVF) must not
    wedge the memory: it reloads from disk, holds the add, and names the real cause."""
    from memory_service.index import VectorIndex

    mem = LocalMemory(MemoryConfig(dim=4, metric="l2", path=str(tmp_path)))
    ones_ND = np.ones((1, 4), np.float32)
    mem.add(ones_ND, ["a"])
    real_add, failures = VectorIndex.add, []

    def add_failing_once(index, ids_N, vectors_ND):
        if not failures:
            failures.append(ids_N)
            raise MemoryError("cannot allocate the IVF training buffer")
        return real_add(index, ids_N, vectors_ND)

    monkeypatch.setattr(VectorIndex, "add", add_failing_once)
    with pytest.raises(MemoryServiceError, match=r"the add of ids 1\.\.1 was stored, but applying it to the FAISS "
                                                  r"index failed \(MemoryError: cannot allocate"):
        mem.add(2 * ones_ND, ["b"], key="k")
    assert mem.add(2 * ones_ND, ["b"], key="k").tolist() == [1]  # it is there; the retry returns its id
    assert mem.add(3 * ones_ND, ["c"]).tolist() == [2]  # and later adds go on (no primary-key wedge)
    assert mem.search(np.vstack([ones_ND, 2 * ones_ND, 3 * ones_ND]), k=1).ids_QK[:, 0].tolist() == [0, 1, 2]
    mem.close()


def test_a_damaged_snapshot_is_recovered_from_the_previous_one_and_the_log(tmp_path, caplog):
    config = MemoryConfig(dim=8, metric="l2", path=str(tmp_path), snapshot_every=0)
    vectors_ND = np.random.default_rng(4).standard_normal((30, 8)).astype(np.float32)
    with LocalMemory(config) as mem:
        mem.add(vectors_ND[:10], [f"v{i}" for i in range(10)])
        mem.snapshot()
        mem.add(vectors_ND[10:20], [f"v{i}" for i in range(10, 20)])
        current = mem.snapshot()["snapshot_seq"]
        mem.add(vectors_ND[20:], [f"v{i}" for i in range(20, 30)])
    index_file = tmp_path / "snapshots" / f"index-{current:012d}.faiss"
    data = bytearray(index_file.read_bytes())
    data[-64:] = bytes(64)  # same size, other bytes
    index_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="memory_service.local"), LocalMemory(config) as mem:
        assert f"snapshot {current} is damaged or missing" in caplog.text
        assert mem.search(vectors_ND, k=1).ids_QK[:, 0].tolist() == list(range(30))  # nothing acknowledged lost
        assert mem.stats()["snapshot_seq"] >= current  # and a good current snapshot was written at once
    with LocalMemory(config) as mem:  # the next open finds it intact
        assert mem.search(vectors_ND, k=1).ids_QK[:, 0].tolist() == list(range(30))
    for seq in (int(p.stem.split("-")[1]) for p in (tmp_path / "snapshots").glob("index-*.faiss")):
        (tmp_path / "snapshots" / f"index-{seq:012d}.faiss").write_bytes(b"not an index")
    with pytest.raises(MemoryServiceError, match="both snapshots of the memory .* are damaged or missing"):
        LocalMemory(config)
