"""`memory serve|stats|snapshot|search|stop` through argparse, against the session's Ray cluster."""

from __future__ import annotations

import argparse
import json
import uuid

import numpy as np
import pytest

from memory_service import MemoryServiceError, get_or_create_memory
from memory_service.cli import register

NAMESPACE = "memtrain-tests"


def run(capsys, *argv: str):
    parser = argparse.ArgumentParser(prog="memtrain")
    register(parser.add_subparsers())
    args = parser.parse_args(["memory", *argv])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    return json.loads(out) if out.lstrip().startswith(("{", "[")) else out


def test_memory_cli_serve_stats_search_snapshot_stop(ray_session, tmp_path, capsys):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    common = ("--name", name, "--namespace", NAMESPACE)
    served = run(capsys, "serve", *common, f"path={tmp_path / 'mem'}", "dim=4", "metric=l2")
    assert served["name"] == name and served["count"] == 0 and served["dim"] == 4
    client = get_or_create_memory(name, namespace=NAMESPACE)
    client.add(np.eye(3, 4, dtype=np.float32), ["a", "b", "c"], [{"n": 0}, None, None])
    assert run(capsys, "serve", *common, f"path={tmp_path / 'mem'}", "dim=4", "metric=l2")["count"] == 3  # attaches
    assert run(capsys, "stats", *common)["count"] == 3
    np.save(tmp_path / "q.npy", np.eye(2, 4, dtype=np.float32))
    hits = run(capsys, "search", *common, "--queries", str(tmp_path / "q.npy"), "--k", "2")
    assert [[h["text"] for h in q] for q in hits][0][0] == "a" and hits[1][0]["text"] == "b"
    assert hits[0][0]["metadata"] == {"n": 0} and hits[0][0]["id"] == 0
    assert run(capsys, "search", *common, "--vector", "0,0,1,0", "--k", "1")[0][0]["text"] == "c"
    assert run(capsys, "snapshot", *common)["count"] == 3
    assert "stopped" in run(capsys, "stop", *common)
    with pytest.raises(MemoryServiceError, match="no memory named"):
        run(capsys, "stats", *common)


def test_memory_cli_refuses_bad_config(ray_session, tmp_path, capsys):
    with pytest.raises(MemoryServiceError, match="Key 'dims' not in 'MemoryConfig'.*valid fields: dim"):
        run(capsys, "serve", "--name", "bad", f"path={tmp_path}", "dims=4")
    with pytest.raises(MemoryServiceError, match="serve needs a folder for the memory.s data on the actor.s node"):
        run(capsys, "serve", "--name", "bad", "dim=4")
