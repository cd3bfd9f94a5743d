"""Corpora -> documents -> tokenizer -> token shards (memory-mapped) -> per-worker batches.

Sources (``DataConfig.source``):

- ``builtin``: an offline corpus of text that ships with Python (``pydoc_data`` help topics and standard-library
  docstrings, about 1 MB), so the default run needs no network;
- ``wikitext2``, ``ptb``, ``agnews``: Hugging Face hub datasets read as parquet files (what ``datasets>=4`` wants);
- a local file or folder of ``.txt``, ``.csv``, ``.parquet`` or ``.jsonl`` files, read by the ``datasets``
  library's ``text``, ``csv``, ``parquet`` and ``json`` loaders (which keep an Arrow copy in their own cache,
  ``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``). In a folder, files whose names contain
  ``train``, ``valid``/``dev`` or ``test`` form those splits;
- a URI of a file or folder of those (``s3://bucket/corpus/``), copied to the driver first.

The driver reads the corpus, fixes the tokenizer (saved in the run folder) and writes the token shards: ``.npy``
arrays (uint16 when the vocabulary fits) in a bundle named by a hash of the tokenizer and the text. The bundle
is built once in the node's cache (``data.cache_dir``), published to shared storage (``data.store``, by default
``<output>/data``), and each worker node copies it once into its own cache (``orchestration.storage.bundles``), so
no worker ever opens a file that only exists on the driver's disk. Workers memory-map the shards and read only
their own windows.

A later run finds the bundle without reading the corpus: the cache maps a key made of what identifies the
documents (local files: paths, sizes and modification times; hub datasets: repository, revision and files;
builtin: its version and Python's) and the tokenizer settings to the bundle's name. ``data.rebuild`` reads,
trains and tokenizes afresh.

Example::

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> cfg = DataConfig(source="builtin", tokenizer="bytes", seq_len=64, cache_dir=f"{tmp.name}/cache")
    >>> data = prepare_data(cfg, Location(f"{tmp.name}/run"))     # publishes the shards to run/data
    >>> paths = data.shard_paths(cfg.cache_dir)                     # on any node: its own copy
    >>> x_BT, y_BT = TokenWindows(paths["train"], 64).batch(np.arange(8))
    >>> x_BT.shape, data.vocab_size
    (torch.Size([8, 64]), 257)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Iterator

import numpy as np
import torch

from orchestration.errors import DataError
from orchestration.progress import progress, progress_enabled
from orchestration.storage import BundleRef, Location, build_bundle, fetch_bundle, is_uri, local_copy, publish_bundle
from orchestration.data.tokenizers import (TOKENIZER_FILE, ByteTokenizer, TextTokenizer, load_tokenizer, token_dtype,
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
    """This node's cache of token shards (each node keeps its own copy, named by a hash of tokenizer and text) and of
    the keys that find them without reading the corpus (keys/)."""
    store: str = ""
    """Shared storage the token shards are published to for the workers of every node: a URI or a folder every
    node mounts ("" = <output>/data)."""
    rebuild: bool = False
    """Read the corpus, train the BPE tokenizer and tokenize again even when this node's cache holds shards for the
    same files (a resumed run keeps its saved tokenizer): after an edit that kept a file's size and modification
    time, or when a hub dataset changed upstream."""

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
# the datasets loader of each local file type, and what a readable file of that type is (for error messages)
LOADERS = {".txt": "text", ".csv": "csv", ".parquet": "parquet", ".jsonl": "json"}
FILE_KINDS = {".txt": "UTF-8 text", ".csv": "UTF-8 CSV with one record a row",
              ".parquet": "a Parquet file", ".jsonl": "UTF-8 JSON Lines (one JSON object a line)"}
LOCAL_SUFFIXES = tuple(LOADERS)
LINES_PER_DOCUMENT = 20  # sentence-per-line corpora (PTB) are grouped into documents of this many lines
# what builtin_documents picks: part of the shard cache key (with Python's version, which decides the text)
BUILTIN_VERSION = 1


@dataclass
class Corpus:
    """Documents per split (``load_corpus`` fills a missing validation split from train)."""
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


# --- local files, through the datasets loaders -------------------------------------------------------------------

@contextlib.contextmanager
def _library_bars() -> Iterator[None]:
    """The datasets and huggingface_hub libraries draw their own bars (generating a split, downloading): they follow
    memtrain's rule (orchestration.progress) for the block."""
    import datasets.utils as datasets_bars
    import huggingface_hub.utils as hub_bars

    silenced = [lib for lib in (datasets_bars, hub_bars)
                if not progress_enabled() and not lib.are_progress_bars_disabled()]
    for lib in silenced:
        lib.disable_progress_bars()
    try:
        yield
    finally:
        for lib in silenced:
            lib.enable_progress_bars()


def _has_split_tag(path: PurePath) -> bool:
    return any(tag in path.stem.lower() for tag in ("train", "valid", "dev", "val", "test"))


def _split_of(path: PurePath) -> str:
    name = path.stem.lower()
    if "test" in name:
        return "test"
    if any(tag in name for tag in ("valid", "dev", "val")):
        return "validation"
    return "train"


def _by_split(files: list) -> dict[str, list]:
    """Corpus files of a folder by split: names containing train, valid/dev/val or test are those splits, and the
    folder's other files (a README, AG News' classes.txt) are not corpus; with no such names all are training text."""
    tagged = [f for f in files if _has_split_tag(f)]
    splits: dict[str, list] = {}
    for f in tagged or files:
        splits.setdefault(_split_of(f), []).append(f)
    return splits


def corpus_files(path: Path) -> dict[str, list[Path]]:
    """The files of a local source by split (a single file is the training split)."""
    if path.is_file():
        if path.suffix.lower() not in LOADERS:
            raise DataError(f"unsupported file type {path.suffix!r} for {path}; use one of {', '.join(LOCAL_SUFFIXES)}")
        return {"train": [path]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS)
    if not files:
        raise DataError(f"folder {str(path)!r} holds no {', '.join(LOCAL_SUFFIXES)} files")
    return _by_split(files)


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # the loaders wrap the parser's error in their own
        exc = exc.__cause__
    return f"{type(exc).__name__}: {str(exc).strip()[:200]}"


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(f"cannot read {path} ({_cause(exc)}); it must be {FILE_KINDS[path.suffix.lower()]}: fix the "
                     "file or move it out of the corpus")


def _require_column(path: Path, columns: list[str], text_column: str) -> None:
    if text_column not in columns:
        raise DataError(f"{path} has no column {text_column!r} (columns: {', '.join(map(str, columns))}); "
                        "set data.text_column to the one holding the text")


def _string_features(names: list[str]):
    import datasets

    return datasets.Features({name: datasets.Value("string") for name in names})


def _loader_options(path: Path, text_column: str) -> dict | None:
    """Options of the datasets loader for one file, from its header, schema or first record (so a missing text
    column is named before anything is loaded); None for a file that holds no records."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return {"sample_by": "document"}  # a row per file: lines are grouped into documents within their file
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_metadata(path)
            _require_column(path, meta.schema.to_arrow_schema().names, text_column)
            return {"columns": [text_column]} if meta.num_rows else None
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                line = next((line for line in f if line.strip()), None)
            if line is None:
                return None
            first = json.loads(line)
            if not isinstance(first, dict):
                raise ValueError("its first line is not a JSON object")
            _require_column(path, list(first), text_column)
            return {}
        import pandas as pd

        head = pd.read_csv(path, nrows=1)
    except DataError:
        raise
    except Exception as exc:  # the parsers (pyarrow, json, pandas) raise errors of many types
        raise _unreadable(path, exc) from None
    header = [str(name) for name in head.columns]
    # every field is read as the text it is (no numbers, no NaN for empty fields), as the csv module would
    if text_column in header:
        return ({"usecols": [text_column], "features": _string_features([text_column]), "na_filter": False}
                if len(head) else None)
    # no header naming the text column (AG News style): every row is a record, its text fields joined
    names = [f"field{i}" for i in range(len(header))]
    return {"header": None, "names": names, "features": _string_features(names), "na_filter": False,
            "skip_blank_lines": False}


def _documents(dataset, path: Path, options: dict, text_column: str) -> list[str]:
    """Documents of a loaded dataset of files of ``path``'s type (a column read whole, [:], decodes the values
    the json loader keeps as JSON when a column mixes types)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [doc for text in dataset["text"][:] for doc in lines_to_documents(text.splitlines())]
    if "names" in options:  # a CSV without a header: join the fields that are not bare numbers (labels, ids)
        rows = zip(*(dataset[name][:] for name in options["names"]))
        return [". ".join(v for v in row if isinstance(v, str) and v.strip() and not v.strip().lstrip("-").isdigit())
                for row in rows]
    texts = dataset[text_column][:]
    if suffix == ".jsonl":
        return [t for t in texts if isinstance(t, str)]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _read_files(files: list[Path], split: str, options: dict, text_column: str, rebuild: bool) -> list[str]:
    """Documents of files of one type and layout, in order: one datasets loader call (cached by the library under
    the files' paths and modification times; ``rebuild`` reads them again)."""
    import datasets

    with _library_bars():
        try:
            loaded = datasets.load_dataset(LOADERS[files[0].suffix.lower()], split=split,
                                           data_files={split: [str(f) for f in files]},
                                           download_mode="force_redownload" if rebuild else None, **options)
        except Exception as exc:  # the loaders wrap parser errors of pandas, pyarrow and json in their own
            failure = exc
        else:
            return _documents(loaded, files[0], options, text_column)
    if len(files) == 1:
        raise _unreadable(files[0], failure) from None
    # one file is unreadable (its own call names it), or the files differ in other columns' types (JSON Lines):
    # then they cannot form one dataset, and are read one by one
    return [doc for f in files for doc in _read_files([f], split, options, text_column, rebuild)]


def load_local(path: Path, text_column: str, rebuild: bool = False) -> Corpus:
    """Documents of a local file or folder, by split: one loader call per run of files of one type and layout, in
    file order."""
    corpus = Corpus(str(path), {})
    for split, files in corpus_files(path).items():
        docs = corpus.splits.setdefault(split, [])
        options = [(f, _loader_options(f, text_column)) for f in files if f.stat().st_size]  # empty: no documents
        readable = [(f, o) for f, o in options if o is not None]
        for (_, group_options), run in itertools.groupby(readable, key=lambda fo: (fo[0].suffix.lower(), fo[1])):
            docs.extend(_read_files([f for f, _ in run], split, group_options, text_column, rebuild))
    return corpus


def load_hub(name: str, rebuild: bool = False) -> Corpus:
    """Read a named hub dataset through parquet files (network); an unreachable hub says how to use a local copy."""
    src = HUB_SOURCES[name]
    data_files = {split: f"hf://datasets/{src.repo}@{src.revision}/{glob}" for split, glob in src.files.items()}
    try:
        import datasets

        with _library_bars():
            loaded = datasets.load_dataset("parquet", data_files=data_files,
                                           download_mode="force_redownload" if rebuild else None)
    except Exception as exc:  # network, auth and hub errors come in many types
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
            f"If the hub is unreachable, download the dataset elsewhere and point at a local copy: "
            f"--data /path/to/{name}/ (a folder with train/valid/test .txt, .csv, .parquet or .jsonl files); "
            f"or --data builtin for the offline corpus") from None
    corpus = Corpus(name, {})
    for split in loaded:
        texts = [t for t in loaded[split][src.text_column][:] if isinstance(t, str)]
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
        corpus = load_hub(source, cfg.rebuild)
    elif kind == "uri":
        try:
            with local_copy(Location(source), verify=False) as path:
                corpus = load_local(path, cfg.text_column, cfg.rebuild)
        except FileNotFoundError:
            raise DataError(f"no such file or folder: {source!r}") from None
        corpus.name = source
    else:
        corpus = load_local(Path(source).expanduser(), cfg.text_column, cfg.rebuild)
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


# --- the cache key: what identifies the documents without reading them ------------------------------------------

def _uri_fingerprint(where: Location) -> list | None:
    """[path, size, mtime_ns] of the corpus files below a URI (None when the store gives no modification times or
    cannot be listed: the documents are then read, which reports what is wrong)."""
    import pyarrow.fs as pafs

    try:
        info = where.fs.get_file_info(where.fs_path)
        infos = ([info] if info.type == pafs.FileType.File else
                 where.fs.get_file_info(pafs.FileSelector(where.fs_path, recursive=True, allow_not_found=True)))
    except OSError:
        return None
    files = {PurePosixPath(i.path): i for i in infos
             if i.type == pafs.FileType.File and PurePosixPath(i.path).suffix.lower() in LOADERS}
    chosen = [files[p] for paths in _by_split(sorted(files)).values() for p in paths]
    if not chosen or any(i.mtime_ns is None for i in chosen):
        return None
    return [[i.path, i.size, i.mtime_ns] for i in chosen]


def source_fingerprint(source: str) -> dict | None:
    """What identifies the documents of ``source`` without reading them: local files' paths, sizes and
    modification times; a hub dataset's repository, revision and files; builtin's version and Python's. None when
    nothing short of the documents does (a URI whose store gives no modification times)."""
    kind = check_source(source)
    if kind == "builtin":
        return {"builtin": BUILTIN_VERSION, "python": sys.version}
    if kind == "hub":
        return {"hub": dataclasses.asdict(HUB_SOURCES[source])}
    if kind == "uri":
        files = _uri_fingerprint(Location(source))
        return None if files is None else {"uri": source, "files": files}
    path = Path(source).expanduser().resolve()
    stats = [(f, f.stat()) for files in corpus_files(path).values() for f in files]
    return {"files": [[str(f), st.st_size, st.st_mtime_ns] for f, st in stats]}


# bump when the shards or the reading of documents change, so keys of older caches miss
SHARD_FORMAT = 2


def shard_key(cfg: DataConfig, tokenizer: TextTokenizer | None) -> str | None:
    """The cache key of the token shards of ``cfg`` with ``tokenizer`` (None: a BPE still to be trained with
    ``cfg.vocab_size``), made without reading the corpus; None when the source has no such identity."""
    source = source_fingerprint(cfg.source)
    if source is None:
        return None
    tok = ({"bpe": cfg.vocab_size} if tokenizer is None else
           {"json": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()})
    payload = {"format": SHARD_FORMAT, "source": source, "text_column": cfg.text_column,
               "val_fraction": cfg.val_fraction, "max_documents": cfg.max_documents, "tokenizer": tok}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


KEYS_DIR = "keys"  # <cache_dir>/keys/<shard key> holds the name of the bundle built for that key


class _NotCached(Exception):
    """The bundle a key names is not complete in this node's cache."""


def _refuse(folder: Path) -> None:
    raise _NotCached


def cached_bundle(cache_dir: str, key: str | None) -> Path | None:
    """The complete bundle this node's cache holds for ``key``, or None."""
    if key is None:
        return None
    try:
        name = (Path(cache_dir).expanduser() / KEYS_DIR / key).read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return build_bundle(cache_dir, name, _refuse)  # returns a complete bundle as it is, never builds
    except _NotCached:
        return None


def remember_bundle(cache_dir: str, key: str | None, name: str) -> None:
    """Record in this node's cache that ``key`` names the bundle ``name`` (a key of None records nothing)."""
    if key is None:
        return
    folder = Path(cache_dir).expanduser() / KEYS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp-{os.getpid()}"
    tmp.write_text(name)
    os.replace(tmp, folder / key)  # atomic: a concurrent reader sees the old name or the new one


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


def _fixed_tokenizer(cfg: DataConfig, run: Location) -> TextTokenizer | None:
    """The run's tokenizer when it is known without the corpus: saved in the run folder (a resumed run), bytes, or
    a given file; None for a BPE still to be trained."""
    saved = run / TOKENIZER_FILE
    if saved.is_file():
        return tokenizer_from_json(saved.read_text())
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return None
    return load_tokenizer(cfg.tokenizer)


def resolve_tokenizer(cfg: DataConfig, corpus: Corpus, run: Location) -> TextTokenizer:
    """The run's tokenizer: the one saved in the run folder (a resumed run), a given file, or a newly trained one
    (then saved in the run folder)."""
    saved = run / TOKENIZER_FILE
    tok = _fixed_tokenizer(cfg, run)
    if tok is None:
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", cfg.vocab_size,
                 len(corpus.splits["train"]))
        tok = train_bpe(corpus.splits["train"], cfg.vocab_size)
    if not saved.is_file():
        saved.write_text(tok.to_json())
    return tok


ENCODE_BATCH = 512  # documents per encode_batch call (the tokenizers library encodes a batch in parallel)


def encode_documents(tok: TextTokenizer, docs: list[str], desc: str) -> Iterator[list[int]]:
    """Token ids of each document, in order, with a progress bar named ``desc``."""
    with progress(total=len(docs), desc=desc, unit="doc") as bar:
        for i in range(0, len(docs), ENCODE_BATCH):
            batch = docs[i:i + ENCODE_BATCH]
            yield from tok.encode_batch(batch)
            bar.update(len(batch))


def encode_with_eos(tok: TextTokenizer, docs: list[str], desc: str, dtype: np.dtype | None = None) -> np.ndarray:
    """The documents' tokens concatenated, each document followed by the end-of-document token (``dtype``, by
    default the smallest that holds the vocabulary)."""
    dtype = dtype or token_dtype(tok.vocab_size)
    eos = np.asarray([tok.eos_id], dtype=dtype)
    pieces = []
    for ids in encode_documents(tok, docs, desc):
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _shards_name(tok: TextTokenizer, corpus: Corpus) -> str:
    """The bundle's name: a hash of the tokenizer and every document (so equal names mean equal shards)."""
    digest = hashlib.sha256(tok.to_json().encode())
    for split in sorted(corpus.splits):
        digest.update(split.encode())
        for doc in corpus.splits[split]:
            digest.update(hashlib.sha1(doc.encode("utf-8")).digest())
    return f"shards-{digest.hexdigest()[:24]}"


def prepare_data(cfg: DataConfig, run: Location) -> PreparedData:
    """Fix the tokenizer (saved in the run folder), find the token shards in this node's cache by the source's key
    or read the corpus and build them, and publish them to shared storage for the workers."""
    saved = run / TOKENIZER_FILE
    known = _fixed_tokenizer(cfg, run)
    key = shard_key(cfg, known)
    local = None if cfg.rebuild else cached_bundle(cfg.cache_dir, key)
    if local is not None:
        tok_json = (local / TOKENIZER_FILE).read_text()
        if not saved.is_file():  # the tokenizer these shards were made with becomes the run's
            saved.write_text(tok_json)
        vocab_size, how = tokenizer_from_json(tok_json).vocab_size, "found in this node's cache"
    else:
        corpus = load_corpus(cfg)
        tok = resolve_tokenizer(cfg, corpus, run)
        name = _shards_name(tok, corpus)

        def build(folder: Path) -> None:
            for split, docs in corpus.splits.items():
                np.save(folder / f"{split}.npy", encode_with_eos(tok, docs, f"tokenizing {split}"))
            (folder / TOKENIZER_FILE).write_text(tok.to_json())

        if cfg.rebuild:
            shutil.rmtree(Path(cfg.cache_dir).expanduser() / name, ignore_errors=True)
        local = build_bundle(cfg.cache_dir, name, build)
        remember_bundle(cfg.cache_dir, key, name)
        if known is None:  # a resumed run (its trained tokenizer saved) finds the shards too
            remember_bundle(cfg.cache_dir, shard_key(cfg, tok), name)
        vocab_size, how = tok.vocab_size, f"read from {corpus.name}"
    counts = {split: int(np.load(local / f"{split}.npy", mmap_mode="r").shape[0])
              for split in SPLITS if (local / f"{split}.npy").is_file()}
    store = Location(cfg.store) if cfg.store else run / "data"
    bundle = publish_bundle(local, store / local.name)
    log.info("data %s (%s): %s tokens, vocab %d, shards in %s", cfg.source, how,
             ", ".join(f"{k} {v:,}" for k, v in counts.items()), vocab_size, bundle.uri)
    return PreparedData(bundle, vocab_size, counts)


# --- reading windows --------------------------------------------------------------------------------------------

def count_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens (inputs plus the next-token target) that ``n_tokens`` tokens hold, when
    window i starts at i * seq_len.

    >>> count_windows(129, 64), count_windows(128, 64)
    (2, 1)
    """
    return max(n_tokens - 1, 0) // seq_len


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a memory-mapped shard (window i starts at i*seq_len)."""

    def __init__(self, path: str, seq_len: int):
        self.tokens = np.load(path, mmap_mode="r")
        self.seq_len = seq_len
        self.n_windows = count_windows(len(self.tokens), seq_len)
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
