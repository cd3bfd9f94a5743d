"""`memory serve|stats|snapshot|search|add|stop` through argparse, against the session's Ray cluster."""

from __future__ import annotations

import argparse
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memory_service import MemoryServiceError, get_or_create_memory
from models.hmst.engine import LexicalEmbedder
from models.io import save_model
from models.registry import build_model
from orchestration.cli.memory import register
from orchestration.data.tokenizers import ByteTokenizer
from orchestration.errors import ConfigError

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
    with pytest.raises(ConfigError, match="unknown config key 'dims' in override 'dims=4'; valid keys: dim, index"):
        run(capsys, "serve", "--name", "bad", f"path={tmp_path}", "dims=4")
    (tmp_path / "memory.yaml").write_text("dim: 4\nmetric: hamming\n")
    with pytest.raises(ConfigError, match="MemoryConfig.metric='hamming' is invalid: choose one of cosine, ip, l2"):
        run(capsys, "serve", "--name", "bad", "--config", str(tmp_path / "memory.yaml"), f"path={tmp_path}")
    with pytest.raises(MemoryServiceError, match="serve needs a folder for the memory.s data on the actor.s node"):
        run(capsys, "serve", "--name", "bad", "dim=4")


@pytest.fixture
def served(ray_session, tmp_path, capsys):
    """Serve a fresh memory with the given settings; returns (its --name/--namespace arguments, a client). Stopped at
    the end of the test."""
    names = []

    def serve(*settings: str):
        names.append(f"add-{uuid.uuid4().hex[:8]}")
        common = ("--name", names[-1], "--namespace", NAMESPACE)
        run(capsys, "serve", *common, f"path={tmp_path / names[-1]}", *settings)
        return common, get_or_create_memory(names[-1], namespace=NAMESPACE)

    yield serve
    for name in names:
        get_or_create_memory(name, namespace=NAMESPACE).shutdown(snapshot=False)


@pytest.fixture
def hmst_checkpoint(tmp_path):
    """A checkpoint folder of an untrained hmst-micro with the byte tokenizer (what `memtrain pretrain` writes)."""
    folder = tmp_path / "hmst-ckpt"
    save_model(build_model("hmst-micro", vocab_size=257), "hmst-micro", folder)
    ByteTokenizer().save(folder)
    return folder


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


FACTS = [{"text": f"the color of {name} is {color}.", "entity": name}
         for name, color in [("Bavik", "red"), ("Olun", "blue"), ("Tessa", "green"), ("Marek", "white"),
                             ("Irvo", "black")]]


def test_add_embeds_texts_with_the_checkpoints_embedder_in_batches_once(served, hmst_checkpoint, tmp_path, capsys):
    common, client = served("dim=128", "max_batch=2")
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    # a first run that "crashed" after two batches: it sent the first four records
    first = run(capsys, "add", *common, "--texts", write_jsonl(tmp_path / "part.jsonl", FACTS[:4]),
                "--checkpoint", str(hmst_checkpoint))
    assert (first["added"], first["batches"], first["count"]) == (4, 2, 4)  # max_batch 2 caps --batch-size 1024
    done = run(capsys, "add", *common, "--texts", facts, "--checkpoint", str(hmst_checkpoint))
    assert (done["added"], done["already_present"], done["count"]) == (1, 4, 5)
    again = run(capsys, "add", *common, "--texts", facts, "--checkpoint", str(hmst_checkpoint))
    assert (again["added"], again["already_present"], again["count"]) == (0, 5, 5)

    # the engine of that checkpoint finds each fact with the question's embedding, metadata kept and signed
    embedder = LexicalEmbedder(ByteTokenizer(), 257, 128)
    for fact in FACTS:
        hits = client.search(embedder.embed([f"what is the color of {fact['entity']}?"]), 1)
        assert hits.texts[0] == [fact["text"]]
        assert hits.metadata[0][0] == {"entity": fact["entity"], "embedder": embedder.signature}


def test_add_stores_vectors_from_npy_with_parquet_texts(served, tmp_path, capsys):
    common, client = served("dim=4", "metric=l2")
    vectors = np.eye(3, 4, dtype=np.float32)
    np.save(tmp_path / "v.npy", vectors)
    pq.write_table(pa.table({"passage": ["a", "b", "c"], "doc": [7, 8, 9]}), tmp_path / "t.parquet")
    done = run(capsys, "add", *common, "--vectors", str(tmp_path / "v.npy"), "--texts", str(tmp_path / "t.parquet"),
               "--text-field", "passage", "--batch-size", "2")
    assert (done["added"], done["batches"], done["count"]) == (3, 2, 3)
    hits = client.search(vectors[[2, 0]], 1)
    assert [t[0] for t in hits.texts] == ["c", "a"] and hits.metadata[0][0] == {"doc": 9}
    # vectors alone: empty texts
    np.save(tmp_path / "w.npy", np.full((2, 4), 5.0, np.float32))
    assert run(capsys, "add", *common, "--vectors", str(tmp_path / "w.npy"))["count"] == 5
    assert client.search(np.full((1, 4), 5.0, np.float32), 1).texts == [[""]]


def test_add_checks_the_whole_input_before_it_sends_anything(served, hmst_checkpoint, tmp_path, capsys):
    common, client = served("dim=4", "max_text_bytes=64")
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "v5.npy", np.ones((3, 5), np.float32))
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "x" * 65}])
    refusals = [
        (["--vectors", str(tmp_path / "v5.npy")], "holds 4-d vectors but .*v5.npy holds 5-d vectors; add them to a "
                                                   "memory served with dim=5"),
        (["--vectors", str(tmp_path / "v.npy"), "--texts", texts, "--batch-size", "1"],
         r"texts\[2\] has 65 bytes, more than the 64"),  # the third batch would fail: none is sent
        (["--vectors", str(tmp_path / "v.npy"), "--texts", write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}] * 2)],
         "holds 3 vectors but --texts 2 records"),
        (["--vectors", str(tmp_path / "v.npy"), "--texts", write_jsonl(tmp_path / "n.jsonl", [{"body": "a"}] * 3)],
         "n.jsonl line 1 has no text in field 'text' \\(its other fields: body\\); name the text field with "
         "--text-field"),
        (["--checkpoint", str(hmst_checkpoint), "--texts", texts], "holds 4-d vectors but the embedder of .* makes "
                                                                   "128-d vectors"),
        (["--checkpoint", str(hmst_checkpoint)], "--checkpoint embeds texts: give them with --texts"),
        (["--vectors", str(tmp_path / "missing.npy")], "cannot be read as a .npy array"),
    ]
    for argv, message in refusals:
        with pytest.raises(MemoryServiceError, match=message):
            run(capsys, "add", *common, *argv)
    assert client.stats()["count"] == 0
    with pytest.raises(MemoryServiceError, match="no memory named"):
        run(capsys, "add", "--name", "nobody", "--namespace", NAMESPACE, "--vectors", str(tmp_path / "v.npy"))
