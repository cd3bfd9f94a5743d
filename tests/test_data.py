import json

import numpy as np
import pytest

from orchestration.data import (DataConfig, TokenWindows, WindowOrder, builtin_documents, load_corpus,
                                lines_to_documents, prepare_data)
from orchestration.errors import DataError
from orchestration.storage import Location


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
    from orchestration.tokenizers import load_tokenizer

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
