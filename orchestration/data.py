"""Corpora -> documents -> tokenizer -> token shards (memory-mapped) -> per-worker batches.

Sources (``DataConfig.source``):

- ``builtin``: an offline corpus of text that ships with Python (``pydoc_data`` help topics and standard-library
  docstrings, about 1 MB), so the default run needs no network;
- ``wikitext2``, ``ptb``, ``agnews``: Hugging Face hub datasets read as parquet files (what ``datasets>=4`` wants);
- a local file or folder of ``.txt``, ``.csv``, ``.parquet`` or ``.jsonl`` files. In a folder, files whose names
  contain ``train``, ``valid``/``dev`` or ``test`` form those splits.

- a URI of a file or folder of those (``s3://bucket/corpus/``), copied to the driver first.

The driver reads the corpus, fixes the tokenizer (saved in the run folder) and writes the token shards: ``.npy``
arrays (uint16 when the vocabulary fits) in a bundle named by a hash of the tokenizer and the text. The bundle
is built once in the node's cache (``data.cache_dir``), published to shared storage (``data.store``, by default
``<output>/data``), and each worker node copies it once into its own cache (``orchestration.storage.bundles``), so
no worker ever opens a file that only exists on the driver's disk. Workers memory-map the shards and read only
their own windows.

Example::

    >>> cfg = DataConfig(source="builtin", tokenizer="bytes", seq_len=64)
    >>> data = prepare_data(cfg, Location(tempfile.mkdtemp()))                # doctest: +SKIP
    >>> paths = data.shard_paths(cfg.cache_dir)        # on any node: its own copy  # doctest: +SKIP
    >>> x_BT, y_BT = TokenWindows(paths["train"], 64).batch(np.arange(8))    # doctest: +SKIP
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import logging
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from orchestration.errors import DataError
from orchestration.storage import BundleRef, Location, build_bundle, fetch_bundle, is_uri, local_copy, publish_bundle
from orchestration.tokenizers import (TOKENIZER_FILE, ByteTokenizer, TextTokenizer, load_tokenizer, token_dtype,
                                      tokenizer_from_json, train_bpe)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class DataConfig:
    source: str = "builtin"
    """Corpus: builtin (offline), a hub name (wikitext2, ptb, agnews), or a local .txt/.csv/.parquet/.jsonl file or folder."""
    text_column: str = "text"
    """Column holding the text in local .csv/.parquet/.jsonl files (CSV files without it join their text fields)."""
    tokenizer: str = "bpe"
    """bpe (train a byte-level BPE on the training split), bytes (raw UTF-8), or a path to a saved tokenizer.json / run dir."""
    vocab_size: int = 4096
    """Vocabulary size of a newly trained BPE tokenizer."""
    seq_len: int = 128
    """Tokens per training sequence (each window holds seq_len + 1 tokens: inputs and shifted targets)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation when the source has no validation split (chosen by a hash of each
    document's text, so the split is stable and never overlaps training)."""
    max_documents: int = 0
    """Use at most this many documents per split (0 = all); handy for quick runs on big corpora."""
    cache_dir: str = "~/.cache/memtrain/shards"
    """This node's cache of token shards (each node keeps its own copy, keyed by a hash of tokenizer and text)."""
    store: str = ""
    """Shared storage the token shards are published to for the workers of every node: a URI or a folder every
    node mounts ("" = <output>/data)."""

    def __post_init__(self):
        if self.seq_len < 2:
            raise DataError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_documents < 0:
            raise DataError(f"data.max_documents must be >= 0 (0 = all), got {self.max_documents}")


# --- sources ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub, read as parquet files."""
    repo: str
    files: dict  # split -> glob of parquet files inside the repo
    text_column: str
    rows_are_lines: bool  # rows are lines of running text (grouped into paragraphs), not whole documents
    revision: str = "main"


HUB_SOURCES = {
    "wikitext2": HubSource("Salesforce/wikitext", {s: f"wikitext-2-raw-v1/{s}-*.parquet" for s in SPLITS}, "text", True),
    "ptb": HubSource("FALcon6/ptb_text_only", {s: f"penn_treebank/{s}/*.parquet" for s in SPLITS}, "sentence", True),
    "agnews": HubSource("fancyzhx/ag_news", {"train": "data/train-*.parquet", "test": "data/test-*.parquet"},
                        "text", False),
}
NAMED_SOURCES = ("builtin", *HUB_SOURCES)
LOCAL_SUFFIXES = (".txt", ".csv", ".parquet", ".jsonl")
LINES_PER_DOCUMENT = 20  # sentence-per-line corpora (PTB) are grouped into documents of this many lines


@dataclass
class Corpus:
    """Documents per split; an empty validation split is filled from train by ``ensure_validation``."""
    name: str
    splits: dict[str, list[str]] = field(default_factory=dict)


def lines_to_documents(lines: list[str]) -> list[str]:
    """Group lines into documents: blank lines separate paragraphs; long paragraphs (one sentence a line) are chunked."""
    docs, paragraph = [], []

    def flush():
        # a paragraph of more than 50 lines is a sentence-per-line corpus: cut it into documents
        size = LINES_PER_DOCUMENT if len(paragraph) > 50 else max(len(paragraph), 1)
        for i in range(0, len(paragraph), size):
            docs.append("\n".join(paragraph[i:i + size]) + "\n")
        paragraph.clear()

    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        else:
            flush()
    flush()
    return docs


def builtin_documents() -> list[str]:
    """Python's help topics and the module/class/function docstrings of the top-level standard library (offline)."""
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:  # skip one-liners: they are mostly boilerplate
                    docs.append(doc + "\n")
    return docs


def _read_csv(path: Path, text_column: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    if text_column in rows[0]:
        col = rows[0].index(text_column)
        return [row[col] for row in rows[1:] if len(row) > col and row[col].strip()]
    # no header naming the text column (AG News style): join the fields that are not bare numbers (labels, ids)
    return [". ".join(v for v in row if v.strip() and not v.strip().lstrip("-").isdigit()) for row in rows]


def _read_column(path: Path, rows: list[dict], text_column: str) -> list[str]:
    if rows and text_column not in rows[0]:
        raise DataError(f"{path} has no column {text_column!r} (columns: {', '.join(rows[0])}); "
                        f"set data.text_column to the one holding the text")
    return [r[text_column] for r in rows if isinstance(r.get(text_column), str)]


def read_local_file(path: Path, text_column: str) -> list[str]:
    """Documents of one local file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return lines_to_documents(path.read_text(encoding="utf-8").splitlines())
        if suffix == ".csv":
            return _read_csv(path, text_column)
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return _read_column(path, rows, text_column)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_column not in table.column_names:
                raise DataError(f"{path} has no column {text_column!r} (columns: {', '.join(table.column_names)}); "
                                "set data.text_column to the one holding the text")
            return [t for t in table.column(text_column).to_pylist() if isinstance(t, str) and t.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    raise DataError(f"unsupported file type {path.suffix!r} for {path}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _has_split_tag(path: Path) -> bool:
    return any(tag in path.stem.lower() for tag in ("train", "valid", "dev", "val", "test"))


def _split_of(path: Path) -> str:
    name = path.stem.lower()
    if "test" in name:
        return "test"
    if any(tag in name for tag in ("valid", "dev", "val")):
        return "validation"
    return "train"


def load_local(path: Path, text_column: str) -> Corpus:
    if path.is_file():
        return Corpus(str(path), {"train": read_local_file(path, text_column)})
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"folder {str(path)!r} holds no {', '.join(LOCAL_SUFFIXES)} files")
    tagged = [f for f in files if _has_split_tag(f)]
    corpus = Corpus(str(path), {})
    # a folder with train/valid/test files: other files in it (a README, AG News' classes.txt) are not corpus
    for f in tagged or files:
        corpus.splits.setdefault(_split_of(f), []).extend(read_local_file(f, text_column))
    return corpus


def load_hub(name: str) -> Corpus:
    """Read a named hub dataset through parquet files (network); an unreachable hub says how to use a local copy."""
    src = HUB_SOURCES[name]
    data_files = {split: f"hf://datasets/{src.repo}@{src.revision}/{glob}" for split, glob in src.files.items()}
    try:
        import datasets

        loaded = datasets.load_dataset("parquet", data_files=data_files)
    except Exception as exc:  # network, auth and hub errors come in many types
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
            f"If the hub is unreachable, download the dataset elsewhere and point at a local copy: "
            f"--data /path/to/{name}/ (a folder with train/valid/test .txt, .csv, .parquet or .jsonl files); "
            f"or --data builtin for the offline corpus") from None
    corpus = Corpus(name, {})
    for split in loaded:
        texts = [t for t in loaded[split][src.text_column] if isinstance(t, str)]
        corpus.splits[split] = lines_to_documents(texts) if src.rows_are_lines else [t for t in texts if t.strip()]
    return corpus


def _stable_fraction(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def check_source(source: str) -> str:
    """The kind of a corpus source (builtin, hub, uri or local); an unknown name or a missing local path raises
    DataError here, before any work starts."""
    if source == "builtin":
        return "builtin"
    if source in HUB_SOURCES:
        return "hub"
    if is_uri(source):
        return "uri"
    if Path(source).expanduser().exists():
        return "local"
    if any(ch in source for ch in "/\\."):
        raise DataError(f"no such file or folder: {source!r}; --data takes a path to a .txt/.csv/.parquet/.jsonl "
                        f"file or folder, a URI of one (s3://...), or one of {', '.join(NAMED_SOURCES)}")
    raise DataError(f"unknown dataset {source!r}; named sources: {', '.join(NAMED_SOURCES)}; "
                    "or give a path to a local file or folder")


def load_corpus(cfg: DataConfig) -> Corpus:
    """Documents of every split of ``cfg.source``, with a validation split carved from train when missing."""
    source = cfg.source
    kind = check_source(source)
    if kind == "builtin":
        corpus = Corpus("builtin", {"train": builtin_documents()})
    elif kind == "hub":
        corpus = load_hub(source)
    elif kind == "uri":
        try:
            with local_copy(Location(source), verify=False) as path:
                corpus = load_local(path, cfg.text_column)
        except FileNotFoundError:
            raise DataError(f"no such file or folder: {source!r}") from None
        corpus.name = source
    else:
        corpus = load_local(Path(source).expanduser(), cfg.text_column)
    train = corpus.splits.get("train", [])
    if not any(doc.strip() for doc in train):
        raise DataError(f"corpus {corpus.name!r} is empty: its training split holds no text. "
                        "Check the path, the file contents, or data.text_column")
    if not corpus.splits.get("validation"):
        # hold out documents by a hash of their text: stable across runs and orderings, disjoint from train
        held = [_stable_fraction(doc) < cfg.val_fraction for doc in train]
        corpus.splits["validation"] = [d for d, h in zip(train, held) if h]
        corpus.splits["train"] = [d for d, h in zip(train, held) if not h]
        if not corpus.splits["validation"]:  # a tiny corpus: hold out its last document
            corpus.splits["validation"] = corpus.splits["train"][-1:]
            corpus.splits["train"] = corpus.splits["train"][:-1]
        if not corpus.splits["train"]:
            raise DataError(f"corpus {corpus.name!r} has too few documents to hold out a validation split; "
                            "add text or provide a separate validation file")
    if cfg.max_documents:
        corpus.splits = {k: v[:cfg.max_documents] for k, v in corpus.splits.items()}
    return corpus


# --- tokenizer and shards ---------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    """What a training worker needs, on any node: the published bundle of token shards and tokenizer."""
    bundle: BundleRef
    """train.npy, validation.npy (and test.npy when the corpus has it) and tokenizer.json, in shared storage."""
    vocab_size: int
    n_tokens: dict[str, int]
    """Tokens per split."""

    def shard_paths(self, cache_dir: str) -> dict[str, str]:
        """Split -> path of its shard in this node's cache (copied there once per node)."""
        folder = fetch_bundle(self.bundle, cache_dir)
        return {split: str(folder / f"{split}.npy") for split in self.n_tokens}

    def tokenizer_json(self, cache_dir: str) -> str:
        return (fetch_bundle(self.bundle, cache_dir) / TOKENIZER_FILE).read_text()


def resolve_tokenizer(cfg: DataConfig, corpus: Corpus, run: Location) -> TextTokenizer:
    """The run's tokenizer: the one saved in the run folder (a resumed run), a given file, or a newly trained one
    (then saved in the run folder)."""
    saved = run / TOKENIZER_FILE
    if saved.is_file():
        return tokenizer_from_json(saved.read_text())
    if cfg.tokenizer == "bytes":
        tok = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", cfg.vocab_size,
                 len(corpus.splits["train"]))
        tok = train_bpe(corpus.splits["train"], cfg.vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    saved.write_text(tok.to_json())
    return tok


def _encode_split(tok: TextTokenizer, docs: list[str]) -> np.ndarray:
    """Concatenate the documents' tokens, each followed by the end-of-document token."""
    dtype = token_dtype(tok.vocab_size)
    pieces = []
    batch = 512
    for i in range(0, len(docs), batch):
        for ids in tok.encode_batch(docs[i:i + batch]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(np.asarray([tok.eos_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def prepare_data(cfg: DataConfig, run: Location) -> PreparedData:
    """Load the corpus, fix the tokenizer (saved in the run folder), build the token shards in this node's cache
    (or reuse them) and publish them to shared storage for the workers."""
    corpus = load_corpus(cfg)
    tok = resolve_tokenizer(cfg, corpus, run)
    digest = hashlib.sha256(tok.to_json().encode())
    for split in sorted(corpus.splits):
        digest.update(split.encode())
        for doc in corpus.splits[split]:
            digest.update(hashlib.sha1(doc.encode("utf-8")).digest())
    name = f"shards-{digest.hexdigest()[:24]}"

    def build(folder: Path) -> None:
        for split, docs in corpus.splits.items():
            np.save(folder / f"{split}.npy", _encode_split(tok, docs))
        (folder / TOKENIZER_FILE).write_text(tok.to_json())

    local = build_bundle(cfg.cache_dir, name, build)
    counts = {split: int(np.load(local / f"{split}.npy", mmap_mode="r").shape[0]) for split in corpus.splits}
    store = Location(cfg.store) if cfg.store else run / "data"
    bundle = publish_bundle(local, store / name)
    log.info("data %s: %s tokens, vocab %d, shards in %s", corpus.name,
             ", ".join(f"{k} {v:,}" for k, v in counts.items()), tok.vocab_size, bundle.uri)
    return PreparedData(bundle, tok.vocab_size, counts)


# --- reading windows --------------------------------------------------------------------------------------------

class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a memory-mapped shard (window i starts at i*seq_len)."""

    def __init__(self, path: str, seq_len: int):
        self.tokens = np.load(path, mmap_mode="r")
        self.seq_len = seq_len
        self.n_windows = (len(self.tokens) - 1) // seq_len
        self._offsets = np.arange(seq_len + 1)

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (len(window_ids), seq_len) int64."""
        rows = self.tokens[window_ids[:, None] * self.seq_len + self._offsets]
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class WindowOrder:
    """A reproducible stream of window ids: a fresh permutation per epoch, addressed by a global sample index.

    The data position of a run is one integer (samples consumed so far by all workers together), so a resumed
    run continues exactly where it stopped: nothing repeated, nothing skipped.
    """

    def __init__(self, n_windows: int, seed: int):
        self.n_windows, self.seed = n_windows, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Window ids of global samples ``start .. start + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.n_windows)
            n = min(count - filled, self.n_windows - offset)
            out[filled:filled + n] = self._permutation(epoch)[offset:offset + n]
            filled += n
        return out
