"""Fault injection: kill -9 during a checkpoint write and during a memory snapshot, a full disk (a small tmpfs
mount) during a checkpoint and during memory adds, and every bad input of the command line. Each ends with the run
or the memory usable and nothing acknowledged lost, or with a clear error before anything was written. (Corrupt
and truncated checkpoints, snapshots and metrics files, and kill -9 during adds, are in test_pretrain.py,
test_memory_service.py and test_storage.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from memory_service import LocalMemory, MemoryConfig, MemoryServiceError
from orchestration.cli import main
from orchestration.errors import StorageError
from orchestration.storage import CHECKPOINTS, Location, copy_folder, latest_checkpoint, newest_intact_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(code: str, *args: str) -> subprocess.Popen:
    """A Python child process running ``code`` (its stdout line by line is how it tells what it has done)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})


def make_checkpoint(folder, files: int, size: int, fill: int) -> None:
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"part{i:03d}.bin").write_bytes(bytes([fill]) * size)


# ----- kill -9 ----------------------------------------------------------------------------------------------------
WRITE_CHECKPOINT = """
    import sys
    from pathlib import Path
    from orchestration.storage import CHECKPOINTS, Location, copy_folder
    run, source = Location(sys.argv[1]), Path(sys.argv[2])
    print("writing", flush=True)
    copy_folder(source, run / CHECKPOINTS / "step_000002")
    print("done", flush=True)
"""


def test_kill9_during_a_checkpoint_write_leaves_the_previous_checkpoint_in_use(tmp_path):
    run = Location(tmp_path / "run")
    make_checkpoint(tmp_path / "c1", files=2, size=1000, fill=1)
    copy_folder(tmp_path / "c1", run / CHECKPOINTS / "step_000001")
    make_checkpoint(tmp_path / "c2", files=200, size=256 * 1024, fill=2)  # 50 MB, each file fsynced: takes a while
    proc = child(WRITE_CHECKPOINT, run.uri, str(tmp_path / "c2"))
    assert proc.stdout.readline().strip() == "writing"
    target = tmp_path / "run" / CHECKPOINTS / "step_000002"
    deadline = time.monotonic() + 30
    while len(list(target.glob("part*.bin"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(list(target.glob("part*.bin"))) < 200  # it died in the middle of the copy
    for find in (latest_checkpoint, newest_intact_checkpoint):
        assert find(run, "step_").step == 1  # the half-written one is never taken
    copy_folder(tmp_path / "c2", run / CHECKPOINTS / "step_000002")  # the next write replaces the debris
    assert newest_intact_checkpoint(run, "step_").step == 2


SNAPSHOT_LOOP = """
    import sys
    import numpy as np
    from memory_service import LocalMemory, MemoryConfig
    mem = LocalMemory(MemoryConfig(dim=64, metric="l2", path=sys.argv[1], snapshot_every=0))
    rng = np.random.default_rng(0)
    for batch in range(10_000):
        ids = mem.add(rng.standard_normal((2000, 64)).astype(np.float32), [f"b{batch}-{j}" for j in range(2000)])
        print("acked", batch, ids[0], ids[-1], flush=True)
        print("snapshotting", flush=True)
        mem.snapshot()
"""


def test_kill9_during_a_memory_snapshot_keeps_every_acknowledged_write(tmp_path):
    proc = child(SNAPSHOT_LOOP, str(tmp_path))
    acked, snapshots = [], 0
    for line in proc.stdout:
        if line.startswith("acked"):
            acked.append(tuple(map(int, line.split()[1:])))
        elif line.startswith("snapshotting"):
            snapshots += 1
            if snapshots == 4:  # the index of 8,000 vectors is being written: kill it there
                time.sleep(0.01)
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    with LocalMemory(MemoryConfig(dim=64, metric="l2", path=str(tmp_path), snapshot_every=0)) as mem:
        for batch, first, last in acked:
            texts = [text for text, _ in mem.get(np.arange(first, last + 1))]
            assert texts == [f"b{batch}-{j}" for j in range(2000)]
        assert mem.stats()["count"] >= len(acked) * 2000


# ----- a full disk ------------------------------------------------------------------------------------------------
class SmallDisk:
    """A tmpfs of a few megabytes mounted under the test's folder (the machine's real disk never fills)."""

    def __init__(self, path):
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "memtrain-test-disk", str(path)], check=True)

    def remount(self, size: str) -> None:
        """Give it more room, as an operator freeing space would."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.unmount()


def test_a_full_disk_during_a_checkpoint_write_is_reported_and_the_previous_one_stays(tmp_path, small_disk):
    run = Location(small_disk.path / "run")
    make_checkpoint(tmp_path / "c1", files=2, size=100_000, fill=1)
    copy_folder(tmp_path / "c1", run / CHECKPOINTS / "step_000010")
    make_checkpoint(tmp_path / "c2", files=6, size=1_000_000, fill=2)  # 6 MB into what is left of 4 MB
    with pytest.raises(StorageError, match=r"cannot write .*step_000020.* free disk space"):
        copy_folder(tmp_path / "c2", run / CHECKPOINTS / "step_000020")
    assert newest_intact_checkpoint(run, "step_").step == 10  # a resume would continue from the one before
    small_disk.remount("64m")
    copy_folder(tmp_path / "c2", run / CHECKPOINTS / "step_000020")
    assert newest_intact_checkpoint(run, "step_").step == 20


def test_a_full_disk_during_memory_adds_loses_nothing_acknowledged(small_disk):
    config = MemoryConfig(dim=64, metric="l2", path=str(small_disk.path / "memory"), snapshot_every=0)
    rng = np.random.default_rng(0)
    acked: dict[int, str] = {}
    with LocalMemory(config) as mem:
        with pytest.raises(MemoryServiceError, match=r"could not write .* check free disk space .* nothing of this "
                                                     r"call was written"):
            for batch in range(1000):  # 128 KB of vectors a batch (twice: log and mirror) until the disk is full
                texts = [f"b{batch}-{j}" for j in range(500)]
                ids = mem.add(rng.standard_normal((500, 64)).astype(np.float32), texts)
                acked.update(zip(ids.tolist(), texts))
        assert acked and mem.stats()["count"] == len(acked)  # the refused add left no trace
        small_disk.remount("64m")
        more = mem.add(np.ones((3, 64), np.float32), ["x", "y", "z"])  # with room again, it goes on
        assert more.tolist() == [len(acked), len(acked) + 1, len(acked) + 2]
    with LocalMemory(config) as mem:
        ids_N = np.array(sorted(acked))
        assert [text for text, _ in mem.get(ids_N)] == [acked[i] for i in ids_N.tolist()]


# ----- bad input at the command line -------------------------------------------------------------------------
BAD_INPUTS = [
    (["pretrain", "lr=0"], "lr must be > 0"),
    (["pretrain", "weight_decay=-1"], "weight_decay must be >= 0"),
    (["pretrain", "beta1=1.0"], r"beta1 must be in \[0, 1\)"),
    (["pretrain", "max_tokens=-1"], "max_tokens must be >= 0"),
    (["pretrain", "early_stop_patience=-2"], "early_stop_patience must be >= 0"),
    (["pretrain", "grad_clip=-0.5"], "grad_clip must be >= 0"),
    (["pretrain", "gpus_per_worker=-1"], "gpus_per_worker must be >= 0"),
    (["pretrain", "data.max_documents=-1"], "data.max_documents must be >= 0"),
    (["pretrain", "fail_at_step=3"], "fail_at_step=3 is a reliability drill"),
    (["pretrain", "--data", "no/such/corpus.txt"], "no such file or folder"),
    (["continual", "grad_clip=-1"], "grad_clip must be >= 0"),
    (["continual", "interrupt_at_step=2"], "interrupt_at_step=2 is a reliability drill"),
    (["rl", "train", "thermo", "ppo.lr=0"], "ppo.lr must be > 0"),
    (["rl", "train", "thermo", "ppo.minibatch_size=500"], r"ppo.minibatch_size \(500\) must not exceed"),
    (["rl", "train", "thermo", "ppo.gamma=1.5"], r"ppo.gamma must be in \[0, 1\]"),
    (["rl", "eval", "thermo", "--policy", "{out}", "--seeds", "0"], "--seeds and --episodes must be >= 1"),
    (["rl", "eval", "thermo", "--policy", "{out}", "--episodes", "0"], "--seeds and --episodes must be >= 1"),
    (["memory", "search", "--queries", "{out}/missing.npy"], "cannot be read as a .npy array"),
    (["sweep", os.path.join(REPO_ROOT, "configs/sweeps/pretrain-lr.yaml"), "interrupt_after_trials=1"],
     "interrupt_after_trials=1 is a reliability drill"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a[:3]) + " " + a[-1] for a, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_the_fix_and_nothing_is_written(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("MEMTRAIN_DRILLS", raising=False)
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in argv]
    if argv[0] in ("pretrain", "continual") or argv[:2] == ["rl", "train"]:
        argv += ["--output", str(out)]
    elif argv[0] == "sweep":
        argv += [f"output={out}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("memtrain: error: ") and len(err.splitlines()) == 1  # one line, no traceback
    assert re.search(message, err), err
    assert not out.exists()  # refused before anything was written
