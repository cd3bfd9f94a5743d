"""The storage layer on a local folder and on a real S3-compatible server (moto on loopback): atomic writes,
checkpoints listed by step number and checked against their manifests, metrics logs, data bundles cached once
per node, and clear errors."""

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from orchestration.errors import StorageError
from orchestration.storage import (CHECKPOINTS, MANIFEST, Location, MetricsLog, build_bundle, copy_folder,
                                   fetch_bundle, latest_checkpoint, list_checkpoints, local_copy, prune_checkpoints,
                                   publish_bundle, require_shared, staged)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An empty run folder on this machine's disk, or in the bucket of the loopback S3 server."""
    if request.param == "local":
        return Location(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return Location(f"s3://{server['bucket']}/{request.node.name.replace('[', '-').rstrip(']')}")


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def test_files_round_trip_and_missing_ones_raise_file_not_found(root):
    (root / "a" / "summary.json").write_json({"step": 3, "loss": 1.5})
    (root / "a" / "notes.txt").write_text("first\n")
    (root / "a" / "notes.txt").append_text("second\n")
    assert (root / "a" / "summary.json").read_json() == {"step": 3, "loss": 1.5}
    assert (root / "a" / "notes.txt").read_text() == "first\nsecond\n"
    assert root.listdir() == ["a"] and (root / "a").listdir() == ["notes.txt", "summary.json"]
    assert (root / "a").is_dir() and (root / "a" / "notes.txt").is_file() and not (root / "b").exists()
    assert (root / "a").files() == {"notes.txt": 13, "summary.json": len((root / "a" / "summary.json").read_bytes())}
    with pytest.raises(FileNotFoundError):
        (root / "a" / "missing.json").read_json()
    with pytest.raises(StorageError, match="not valid JSON"):
        (root / "a" / "notes.txt").read_json()
    with pytest.raises(ValueError):  # strict JSON: a NaN would make the file unreadable by other tools
        (root / "bad.json").write_json({"x": float("nan")})
    (root / "a").remove()
    assert not (root / "a").exists() and root.listdir() == []
    (root / "a").remove()  # a missing folder is fine


def test_local_writes_replace_atomically_and_leave_no_temporary_files(tmp_path):
    target = Location(tmp_path) / "config.yaml"
    for i in range(5):
        target.write_text(f"value: {i}\n")
    assert target.read_text() == "value: 4\n" and os.listdir(tmp_path) == ["config.yaml"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target.uri).st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_upload_and_download_folders(root, tmp_path):
    src = make_folder(tmp_path / "src", {"model.bin": b"w" * 1000, "sub/state.json": b"{}"})
    (root / "ckpt").upload(src)
    assert (root / "ckpt").files() == {"model.bin": 1000, "sub/state.json": 2}
    out = (root / "ckpt").download(tmp_path / "back")
    assert (out / "model.bin").read_bytes() == b"w" * 1000 and (out / "sub" / "state.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        (root / "nothing").download(tmp_path / "nothing")


def test_checkpoints_are_ordered_by_step_number_and_incomplete_ones_are_skipped(root, tmp_path):
    for step in (999_999, 1_000_000, 5):
        src = make_folder(tmp_path / f"c{step}", {"weights.bin": bytes([step % 251]) * 100, "state.json": b"{}"})
        copy_folder(src, root / CHECKPOINTS / f"step_{step:06d}")
    # a crash while writing step 500,000: its manifest lists a file that never arrived whole
    torn = root / CHECKPOINTS / "step_500000"
    (torn / "weights.bin").write_bytes(b"x" * 10)
    (torn / MANIFEST).write_json({"files": {"weights.bin": {"size": 100, "sha256": "0"}}})
    (root / CHECKPOINTS / "step_3000000" / "weights.bin").write_bytes(b"x")  # no manifest yet
    (root / CHECKPOINTS / "step_000007.tmp" / "weights.bin").write_bytes(b"x")  # not a checkpoint name
    assert [c.step for c in list_checkpoints(root, "step_")] == [5, 999_999, 1_000_000]
    assert latest_checkpoint(root, "step_").location == root / CHECKPOINTS / "step_1000000"
    assert latest_checkpoint(root, "iter_") is None
    prune_checkpoints(root, "step_", keep=2)
    # the oldest complete one and the torn one older than the newest complete one are gone; a folder newer
    # than every complete checkpoint may still be being written, so it stays
    assert (root / CHECKPOINTS).listdir() == ["step_000007.tmp", "step_1000000", "step_3000000", "step_999999"]


def test_local_copy_checks_a_folder_against_its_manifest(root, tmp_path):
    src = make_folder(tmp_path / "src", {"model.bin": b"m" * 64, "config.json": b'{"a": 1}'})
    copy_folder(src, root / "ckpt")
    with local_copy(root / "ckpt") as path:
        assert (path / "model.bin").read_bytes() == b"m" * 64
    (root / "ckpt" / "model.bin").write_bytes(b"M" * 64)  # same size, other bytes
    with pytest.raises(StorageError, match=r"is damaged: model.bin"):
        with local_copy(root / "ckpt"):
            pass


def test_staged_folder_ends_up_in_storage(root):
    with staged(root / "policy") as folder:
        (folder / "policy.json").write_text('{"env": "thermo"}')
    assert (root / "policy" / "policy.json").read_json() == {"env": "thermo"}


def test_metrics_log_appends_keeps_and_skips_a_torn_line(root):
    log = MetricsLog(root / "metrics.jsonl")
    assert log.rows() == []
    for step in (10, 20, 30):
        log.append({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in MetricsLog(root / "metrics.jsonl").rows()] == [10, 20, 30]
    assert [r["step"] for r in log.keep(lambda r: r["step"] <= 20)] == [10, 20]
    log.append({"step": 30, "loss": 0.5})
    assert [r["step"] for r in MetricsLog(root / "metrics.jsonl").rows()] == [10, 20, 30]
    (root / "metrics.jsonl").append_text('{"step": 40, "lo')  # a crash in the middle of an append
    assert [r["step"] for r in MetricsLog(root / "metrics.jsonl").rows()] == [10, 20, 30]


def _fetch_in_process(ref, cache, queue):
    folder = fetch_bundle(ref, cache)
    queue.put((str(folder), (folder / "train.npy").read_bytes()))


def test_bundles_are_built_once_published_and_fetched_once_per_node(root, tmp_path):
    calls = []

    def build(folder: Path):
        calls.append(folder)
        (folder / "train.npy").write_bytes(b"t" * 5000)
        (folder / "tokenizer.json").write_text("{}")

    driver_cache = tmp_path / "driver-cache"
    local = build_bundle(driver_cache, "d1g35t", build)
    assert build_bundle(driver_cache, "d1g35t", build) == local and len(calls) == 1
    ref = publish_bundle(local, root / "data" / "d1g35t")
    assert publish_bundle(local, root / "data" / "d1g35t") == ref  # already there: nothing copied again
    # another node: four processes fetch at once; each gets the whole bundle from one node-local folder
    node_cache = tmp_path / "node-cache"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(ref, str(node_cache), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert {folder for folder, _ in results} == {str(node_cache / "d1g35t")}
    assert all(data == b"t" * 5000 for _, data in results)
    assert sorted(p.name for p in node_cache.iterdir()) == ["d1g35t", "d1g35t.lock"]  # no leftover temporaries


def test_a_damaged_published_bundle_is_refused(root, tmp_path):
    local = build_bundle(tmp_path / "cache", "abc", lambda d: (d / "train.npy").write_bytes(b"x" * 100))
    ref = publish_bundle(local, root / "data" / "abc")
    (root / "data" / "abc" / "train.npy").write_bytes(b"y" * 100)
    with pytest.raises(StorageError, match=r"bundle .* is damaged or incomplete \(train.npy\)"):
        fetch_bundle(ref, tmp_path / "other-node")
    (root / "data" / "abc").remove()
    with pytest.raises(StorageError, match="does not exist"):
        fetch_bundle(ref, tmp_path / "other-node")


def test_bad_locations_say_what_to_do(tmp_path):
    with pytest.raises(StorageError, match="neither pyarrow nor fsspec knows the scheme 'nosuchfs'"):
        Location("nosuchfs://bucket/run").exists()
    with pytest.raises(StorageError, match="options in the URI are not supported"):
        Location("s3://bucket/run?endpoint_override=x")
    with pytest.raises(StorageError, match="empty path"):
        Location("")
    assert Location("file://" + str(tmp_path)) == Location(tmp_path)
    assert Location("runs/x").uri == os.path.abspath("runs/x")


def test_unreachable_bucket_is_named_with_the_credentials_hint(s3_server):
    with pytest.raises((StorageError, FileNotFoundError)):
        Location("s3://no-such-bucket-here/run/summary.json").read_json()
    with pytest.raises(StorageError, match=r"cannot write 's3://no-such-bucket-here/run/summary.json'.*AWS_"):
        Location("s3://no-such-bucket-here/run/summary.json").write_json({})


def test_require_shared_passes_on_a_one_node_cluster(ray_session, tmp_path):
    require_shared(Location(tmp_path / "out"), "output")
    require_shared(Location("s3://bucket/out"), "output")
    assert json.loads(json.dumps(os.listdir(tmp_path))) == []  # no probe left behind, the folder not even made
