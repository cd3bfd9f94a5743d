import dataclasses
import json
import os

import numpy as np
import pytest

from orchestration.data import sources
from orchestration.data.sources import (DataConfig, TokenWindows, WindowOrder, builtin_documents, load_corpus,
                                        lines_to_documents, prepare_data, shard_key)
from orchestration.data.tokenizers import ByteTokenizer
from orchestration.errors import DataError
from orchestration.storage import Location


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The datasets library's Arrow copies of the test files go to the test's temp folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hf-datasets"


def test_builtin_corpus_is_offline_deterministic_and_split_without_overlap():
    corpus = load_corpus(DataConfig(source="builtin"))
    train, val = corpus.splits["train"], corpus.splits["validation"]
    assert sum(map(len, train)) > 500_000 and len(val) > 10
    assert not set(train) & set(val)
    assert load_corpus(DataConfig(source="builtin")).splits["validation"] == val
    assert builtin_documents()[:3] == builtin_documents()[:3]


def test_local_formats_and_folder_splits(tmp_path):
    (tmp_path / "train.txt").write_text("first paragraph line\nsecond line\n\nnext paragraph\n")
    (tmp_path / "valid.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    (tmp_path / "test.csv").write_text('"3","A title","A description"\n"1","Other","More"\n')
    corpus = load_corpus(DataConfig(source=str(tmp_path)))
    assert corpus.splits["train"] == ["first paragraph line\nsecond line\n", "next paragraph\n"]
    assert corpus.splits["validation"] == ["held out"]
    assert corpus.splits["test"] == ["A title. A description", "Other. More"]


def test_parquet_and_csv_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"doc {i} " * 20 for i in range(40)]}), tmp_path / "d.parquet")
    corpus = load_corpus(DataConfig(source=str(tmp_path / "d.parquet"), text_column="body"))
    assert len(corpus.splits["train"]) + len(corpus.splits["validation"]) == 40
    with pytest.raises(DataError, match="no column 'text'.*body.*data.text_column"):
        load_corpus(DataConfig(source=str(tmp_path / "d.parquet")))
    (tmp_path / "h.csv").write_text("id,text\n1,hello there\n2,general kenobi\n")
    assert load_corpus(DataConfig(source=str(tmp_path / "h.csv"))).splits["validation"]


def test_each_local_format_gives_its_documents(tmp_path, datasets_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sentences = "".join(f"sentence {i}\n" for i in range(60))  # one 60-line paragraph: PTB style, cut by 20 lines
    (tmp_path / "a.txt").write_text("two line\nparagraph\n\n\n" + sentences + "\nlast, without newline")
    (tmp_path / "b.csv").write_text('id,body\n1,first row\n2,""\n3,"quoted, with comma\nand a line"\n')
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                              [{"body": "one"}, {"body": 7}, {"body": "two", "x": 1}]))
    pq.write_table(pa.table({"body": ["p1", " ", None, "p2"], "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")

    def documents(name, text_column="text"):
        return sources.load_local(tmp_path / name, text_column).splits["train"]

    lines = sentences.splitlines()
    assert documents("a.txt") == ["two line\nparagraph\n"] + ["\n".join(lines[i:i + 20]) + "\n" for i in (0, 20, 40)] \
        + ["last, without newline\n"]
    assert documents("b.csv", text_column="body") == ["first row", "quoted, with comma\nand a line"]
    assert documents("c.jsonl", text_column="body") == ["one", "two"]
    assert documents("d.parquet", text_column="body") == ["p1", "p2"]
    assert list(datasets_cache.iterdir())  # read through the datasets loaders, cached in their own folder
    with pytest.raises(DataError, match="c.jsonl has no column 'text'.*body.*data.text_column"):
        documents("c.jsonl")
    # files of a folder whose other columns differ in type cannot form one dataset: they are read one by one
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "train-1.jsonl").write_text('{"text": "a", "n": 1}\n')
    (tmp_path / "mixed" / "train-2.jsonl").write_text('{"text": "b", "n": "one"}\n')
    assert documents("mixed") == ["a", "b"]
    (tmp_path / "mixed" / "train-3.jsonl").write_text('{"text": "fine"}\n{"text": not json}\n')
    with pytest.raises(DataError, match="cannot read .*train-3.jsonl .*JSON Lines"):
        documents("mixed")


def _touch(path, mtime_ns):
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_cache_key_finds_shards_without_reading_the_corpus(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"paragraph {i} about cached token shards\n\n" for i in range(60)))
    reads = []
    real_load_corpus = sources.load_corpus
    monkeypatch.setattr(sources, "load_corpus", lambda cfg: reads.append(cfg.source) or real_load_corpus(cfg))
    cfg = DataConfig(source=str(corpus), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, Location(tmp_path / "run"))
    cached_train = tmp_path / "cache" / first.bundle.digest / "train.npy"
    written = cached_train.stat().st_mtime_ns
    assert len(reads) == 1

    # unchanged files: the same run, and a new run (which gets the tokenizer the shards were made with), read nothing
    assert prepare_data(cfg, Location(tmp_path / "run")) == first
    other_run = prepare_data(cfg, Location(tmp_path / "run2"))
    assert (other_run.bundle.digest, other_run.n_tokens) == (first.bundle.digest, first.n_tokens) and len(reads) == 1
    assert (tmp_path / "run2" / "tokenizer.json").read_text() == (tmp_path / "run" / "tokenizer.json").read_text()

    # new bytes of the same size under the old modification time: the key cannot see it, so the old shards are
    # reused (the documents were not read); rebuild=true reads the file and tokenizes the new text
    stat = corpus.stat()
    corpus.write_text(corpus.read_text().replace("about", "ABOUT"))
    _touch(corpus, stat.st_mtime_ns)
    assert prepare_data(cfg, Location(tmp_path / "run")) == first and len(reads) == 1
    rebuilt = prepare_data(dataclasses.replace(cfg, rebuild=True), Location(tmp_path / "run"))
    assert len(reads) == 2 and rebuilt.bundle.digest != first.bundle.digest
    assert sorted(os.listdir(tmp_path / "run" / "data")) == sorted([first.bundle.digest, rebuilt.bundle.digest])
    assert prepare_data(cfg, Location(tmp_path / "run")) == rebuilt and len(reads) == 2  # the key now names it

    # a touched file changes the key: the documents are read again, and the same text finds the same shards
    key = shard_key(cfg, None)
    _touch(corpus, stat.st_mtime_ns + 10**9)
    assert shard_key(cfg, None) != key
    rebuilt_train = tmp_path / "cache" / rebuilt.bundle.digest / "train.npy"
    tokenized_at = rebuilt_train.stat().st_mtime_ns
    assert prepare_data(cfg, Location(tmp_path / "run")) == rebuilt and len(reads) == 3
    assert rebuilt_train.stat().st_mtime_ns == tokenized_at  # found by content, not tokenized again

    # rebuild=true with unchanged text tokenizes again into the same bundle
    again = prepare_data(dataclasses.replace(cfg, rebuild=True), Location(tmp_path / "run"))
    assert again == rebuilt and len(reads) == 4 and rebuilt_train.stat().st_mtime_ns != tokenized_at
    assert cached_train.stat().st_mtime_ns == written  # the first bundle was left alone


def test_cache_key_of_a_corpus_in_a_bucket(s3_server, tmp_path, monkeypatch):
    corpus = Location(f"s3://{s3_server['bucket']}/{tmp_path.name}/corpus")
    (corpus / "train.txt").write_text("".join(f"line {i} of a corpus in a bucket\n\n" for i in range(40)))
    (corpus / "valid.txt").write_text("held out\n")
    reads = []
    real_load_corpus = sources.load_corpus
    monkeypatch.setattr(sources, "load_corpus", lambda cfg: reads.append(cfg.source) or real_load_corpus(cfg))
    cfg = DataConfig(source=corpus.uri, tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, Location(tmp_path / "run"))
    assert prepare_data(cfg, Location(tmp_path / "run")) == first and reads == [corpus.uri]  # listed, not copied
    key = shard_key(cfg, ByteTokenizer())
    (corpus / "valid.txt").write_text("held out, rewritten\n")  # a new object: new size and modification time
    assert shard_key(cfg, ByteTokenizer()) != key
    assert prepare_data(cfg, Location(tmp_path / "run")) != first and len(reads) == 2


def test_cache_key_of_named_sources_and_settings(tmp_path):
    builtin = DataConfig(source="builtin")
    assert shard_key(builtin, None) == shard_key(DataConfig(source="builtin"), None)
    assert shard_key(builtin, None) != shard_key(DataConfig(source="builtin", vocab_size=1024), None)
    assert shard_key(builtin, None) != shard_key(DataConfig(source="builtin", max_documents=5), None)
    assert shard_key(DataConfig(source="wikitext2"), None) != shard_key(DataConfig(source="ptb"), None)
    (tmp_path / "train.txt").write_text("text\n")
    (tmp_path / "notes.md").write_text("not corpus")
    folder = DataConfig(source=str(tmp_path))
    key = shard_key(folder, None)
    (tmp_path / "README.txt").write_text("not a split file, so not corpus")
    assert shard_key(folder, None) == key
    (tmp_path / "valid.txt").write_text("a new split file\n")
    assert shard_key(folder, None) != key


def test_sentence_per_line_text_is_grouped():
    docs = lines_to_documents([f"sentence {i}" for i in range(100)])
    assert len(docs) == 5 and docs[0].count("\n") == 20


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file or folder.*builtin"):
        load_corpus(DataConfig(source=str(tmp_path / "nope.txt")))
    with pytest.raises(DataError, match="unknown dataset 'wikitext3'.*wikitext2"):
        load_corpus(DataConfig(source="wikitext3"))
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(DataConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "data.bin").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_corpus(DataConfig(source=str(tmp_path / "sub")))


def test_unreachable_hub_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load 'wikitext2'.*--data /path/to/wikitext2/"):
        load_corpus(DataConfig(source="wikitext2"))


def test_shards_are_published_once_and_read_from_each_nodes_cache(tmp_path):
    cfg = DataConfig(source="builtin", tokenizer="bpe", vocab_size=512, cache_dir=str(tmp_path / "cache"),
                     max_documents=200)
    run = Location(tmp_path / "run")
    first = prepare_data(cfg, run)
    published = (run / "data").listdir()
    paths = first.shard_paths(cfg.cache_dir)
    assert [np.load(p, mmap_mode="r").dtype for p in paths.values()] == [np.dtype(np.uint16)] * 2
    written = {name: (run / "data" / published[0] / name).local_path.stat().st_mtime_ns
               for name in ("train.npy", "manifest.json")}
    second = prepare_data(cfg, run)  # the same corpus and tokenizer: nothing tokenized or published again
    assert second == first and (run / "data").listdir() == published == [first.bundle.digest]
    assert written == {name: (run / "data" / published[0] / name).local_path.stat().st_mtime_ns for name in written}
    # a node that has never seen the data (an empty cache) copies the published bundle and reads the same tokens
    other = first.shard_paths(str(tmp_path / "other-node-cache"))
    assert other["train"] != paths["train"] and (np.load(other["train"]) == np.load(paths["train"])).all()
    windows = TokenWindows(other["train"], 32)
    x_BT, y_BT = windows.batch(np.array([0, 3]))
    assert x_BT.shape == (2, 32) and (x_BT[:, 1:] == y_BT[:, :-1]).all()
    from orchestration.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tmp_path / "run")
    assert first.tokenizer_json(cfg.cache_dir) == tok.to_json()
    text = tok.decode(np.load(paths["train"])[:200].tolist())
    assert len(text) > 100


def test_window_order_resumes_without_repeats_or_skips():
    order = WindowOrder(n_windows=10, seed=3)
    whole = order.take(0, 25)
    resumed = np.concatenate([WindowOrder(10, 3).take(0, 7), WindowOrder(10, 3).take(7, 18)])
    assert (whole == resumed).all()
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert not (whole[:10] == whole[10:20]).all()  # a fresh permutation each epoch


def _terminal_output(monkeypatch, stderr_is_terminal: bool, ci: bool) -> str:
    """What a quick loop under orchestration.progress draws on stderr: a pseudo-terminal (80 columns) or a file."""
    import fcntl
    import struct
    import sys
    import termios

    from orchestration import progress as bars

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.set_blocking(master, False)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(bars, "DELAY_S", 0.0)  # draw at once
    with open(slave, "w") as terminal, open(os.devnull, "w") as file:
        monkeypatch.setattr(sys, "stderr", terminal if stderr_is_terminal else file)
        assert bars.progress_enabled() == (stderr_is_terminal and not ci)
        for _ in bars.progress(range(3), desc="tokenizing demo", unit="doc"):
            pass
        try:
            return os.read(master, 65536).decode()  # before the terminal closes (Linux drops its output then)
        except BlockingIOError:
            return ""
        finally:
            os.close(master)


def test_progress_bars_only_on_a_terminal_outside_ci(monkeypatch):
    assert "tokenizing demo" in _terminal_output(monkeypatch, stderr_is_terminal=True, ci=False)
    assert _terminal_output(monkeypatch, stderr_is_terminal=True, ci=True) == ""
    assert _terminal_output(monkeypatch, stderr_is_terminal=False, ci=False) == ""
