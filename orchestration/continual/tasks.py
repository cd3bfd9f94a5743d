"""Task streams for continual learning: permuted-vocabulary text and multi-domain text, as token shards per task.

Two benchmarks (``StreamConfig.benchmark``):

- ``permuted``: one corpus (WikiText-2 by default) cut into ``n_tasks`` disjoint chunks of documents; task t
  reads its chunk through a permutation of the token ids (the end-of-document token stays fixed). ``unique``
  draws an independent permutation per task, ``repeat`` cycles through ``repeat_k`` of them (tasks recur), and
  ``drift`` swaps ``drift_swaps`` random pairs of the previous task's permutation (gradual, correlated change);
- ``multidomain``: tasks drawn from several corpora (``domains``) in ``round_robin`` or ``block`` order; the
  documents of a domain are dealt out to its tasks, so no document recurs in two tasks.

Every document is used once: all splits of a corpus are pooled, exact duplicates dropped, the pool shuffled
with ``task_seed`` and cut into tasks, and each task's documents split into train, validation and test. So no
text is shared between a task's train, validation and test splits (the original TG-SMN code drew validation
from the training pool). One tokenizer (trained on the tasks' training text only) serves every task.

A stream is a data bundle (``orchestration.storage.bundles``): tokenizer, shards and ``stream.json`` in this
node's ``data.cache_dir``, named by a hash of the settings and the text, so grid runs and RL envs on the same
stream tokenize once per node. ``publish_bundle`` puts it in shared storage and ``load_stream(fetch_bundle(...))``
opens it on another node (``memtrain continual-grid`` does this for its runs).

Example::

    >>> from orchestration.continual.tasks import StreamConfig, build_stream
    >>> from orchestration.data.sources import DataConfig
    >>> import tempfile
    >>> cache = tempfile.TemporaryDirectory()           # this node's cache (default ~/.cache/memtrain/shards)
    >>> stream = build_stream(StreamConfig(benchmark="permuted", n_tasks=3),
    ...                       DataConfig(source="builtin", tokenizer="bytes", seq_len=32, cache_dir=cache.name))
    >>> [t.name for t in stream.tasks]
    ['permuted-0', 'permuted-1', 'permuted-2']
    >>> cache.cleanup()
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestration.data.sources import (Corpus, DataConfig, TokenWindows, cached_bundle, count_windows,
                                        encode_with_eos, load_corpus, remember_bundle, resolve_tokenizer,
                                        source_fingerprint)
from orchestration.errors import ConfigError, DataError
from orchestration.storage import Location, build_bundle
from orchestration.data.tokenizers import TOKENIZER_FILE, token_dtype

log = logging.getLogger(__name__)

BENCHMARKS = ("permuted", "multidomain")
PERM_MODES = ("unique", "repeat", "drift")
SCHEDULES = ("round_robin", "block")
TASK_SPLITS = ("train", "validation", "test")


@dataclass
class StreamConfig:
    benchmark: str = "permuted"
    """permuted (one corpus, a token-id permutation per task) or multidomain (tasks from several corpora)."""
    n_tasks: int = 5
    """Number of tasks in the stream."""
    perm_mode: str = "unique"
    """permuted only: unique (a new permutation per task), repeat (cycle repeat_k permutations) or drift."""
    repeat_k: int = 2
    """permuted, repeat mode: distinct permutations cycled through (task t uses permutation t mod repeat_k)."""
    drift_swaps: int = 150
    """permuted, drift mode: random pairs of token ids swapped between one task's permutation and the next."""
    domains: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "agnews", "builtin"])
    """multidomain only: corpora, each a named source or a local path (--data a,b,c sets them)."""
    schedule: str = "round_robin"
    """multidomain only: round_robin (d0, d1, ..., d0, ...) or block (block_size consecutive tasks per domain)."""
    block_size: int = 0
    """multidomain, block schedule: consecutive tasks per domain (0 = n_tasks / number of domains, rounded up)."""
    val_fraction: float = 0.1
    """Share of each task's documents held out for validation (at least one document)."""
    test_fraction: float = 0.1
    """Share of each task's documents held out for test, the split of the evaluation matrix (at least one)."""
    max_docs_per_task: int = 0
    """Use at most this many documents per task (0 = all its share of the corpus); for quick runs."""
    task_seed: int = 0
    """Seed of the document split and the permutations; kept apart from the training seed so every training
    seed sees the same tasks."""

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {self.benchmark!r}; use one of {', '.join(BENCHMARKS)}")
        if self.perm_mode not in PERM_MODES:
            raise ConfigError(f"unknown stream.perm_mode {self.perm_mode!r}; use one of {', '.join(PERM_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown stream.schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.n_tasks < 1:
            raise ConfigError(f"the stream needs at least one task, got n_tasks={self.n_tasks}")
        if self.repeat_k < 1 or self.drift_swaps < 0 or self.block_size < 0 or self.max_docs_per_task < 0:
            raise ConfigError("stream.repeat_k must be >= 1 and drift_swaps, block_size, max_docs_per_task >= 0")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"stream.val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) "
                              "must each be in (0, 1) and sum to less than 1")
        if self.benchmark == "multidomain" and not self.domains:
            raise ConfigError("the multidomain benchmark needs at least one domain: --data wikitext2,ptb,agnews,builtin")


@dataclass
class Task:
    """One task of the stream: its token shards (end-of-document tokens included) and where it came from."""
    index: int
    """Position in the stream."""
    name: str
    """permuted-<t> or <domain>-<t>."""
    domain: str
    """The corpus the documents come from."""
    shards: dict[str, str]
    """Split (train, validation, test) -> path of a .npy token shard."""
    n_documents: dict[str, int]
    """Split -> documents in it."""
    permutation: int = -1
    """Index of the token permutation applied (permuted benchmark), -1 for none."""

    def windows(self, split: str, seq_len: int) -> TokenWindows:
        return TokenWindows(self.shards[split], seq_len)


@dataclass
class TaskStream:
    """The tasks in order, the tokenizer they share and the token-id permutations of the permuted benchmark."""
    tasks: list[Task]
    tokenizer_path: str
    vocab_size: int
    eos_id: int
    permutations: np.ndarray | None  # (n_permutations, vocab_size) int64; row p maps token id -> permuted id
    folder: str  # this node's bundle folder holding all of the above (publish it to share the stream)


# --- documents --------------------------------------------------------------------------------------------------

def _document_pool(source: str, text_column: str, max_documents: int) -> tuple[str, ...]:
    """Every distinct non-blank document of all splits of ``source``."""
    return _cached_pool(source, text_column, max_documents, json.dumps(source_fingerprint(source), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _cached_pool(source: str, text_column: str, max_documents: int, identity: str) -> tuple[str, ...]:
    """``_document_pool``, kept per process while the source's identity (``source_fingerprint``: file sizes and
    modification times) stays the same: the built-in corpus parses the standard library, which takes seconds."""
    corpus = load_corpus(DataConfig(source=source, text_column=text_column, max_documents=max_documents))
    seen: dict[str, None] = {}
    for split in sorted(corpus.splits):
        for doc in corpus.splits[split]:
            if doc.strip():
                seen.setdefault(doc, None)  # dict keeps first-seen order and drops exact duplicates
    return tuple(seen)


def split_documents(docs: list[str] | tuple[str, ...], n_chunks: int, cfg: StreamConfig, seed: list[int]
                    ) -> list[dict[str, list[str]]]:
    """Shuffle ``docs`` and cut them into ``n_chunks`` disjoint tasks, each split into train/validation/test.

    Raises DataError when a task would get fewer than three documents (one per split).

    Example::

        >>> cfg = StreamConfig(n_tasks=2)
        >>> parts = split_documents([f"doc {i}" for i in range(20)], 2, cfg, seed=[0])
        >>> [{k: len(v) for k, v in p.items()} for p in parts]
        [{'train': 8, 'validation': 1, 'test': 1}, {'train': 8, 'validation': 1, 'test': 1}]
    """
    docs = list(docs)
    if len(docs) < 3 * n_chunks:
        raise DataError(f"{len(docs)} distinct documents cannot make {n_chunks} tasks (each task needs at least "
                        f"3: train, validation and test); use fewer tasks (--tasks) or a larger corpus")
    order = np.random.default_rng(seed).permutation(len(docs))
    out = []
    for chunk in np.array_split(order, n_chunks):
        if cfg.max_docs_per_task:
            chunk = chunk[:cfg.max_docs_per_task]
        n_val = max(1, round(cfg.val_fraction * len(chunk)))
        n_test = max(1, round(cfg.test_fraction * len(chunk)))
        n_train = len(chunk) - n_val - n_test
        if n_train < 1:
            raise DataError(f"a task of {len(chunk)} documents leaves none for training after validation and test; "
                            "raise stream.max_docs_per_task, use fewer tasks, or lower the held-out fractions")
        ids = {"train": chunk[:n_train], "validation": chunk[n_train:n_train + n_val], "test": chunk[n_train + n_val:]}
        out.append({split: [docs[i] for i in ids[split]] for split in TASK_SPLITS})
    return out


def domain_name(source: str) -> str:
    """A short name for a corpus: the named source itself, or the last component of a path."""
    return Path(source).name or source if ("/" in source or "\\" in source) else source


def domain_schedule(cfg: StreamConfig) -> list[int]:
    """The domain index of every task."""
    n_domains = len(cfg.domains)
    if cfg.schedule == "round_robin":
        return [t % n_domains for t in range(cfg.n_tasks)]
    block = cfg.block_size or -(-cfg.n_tasks // n_domains)
    return [(t // block) % n_domains for t in range(cfg.n_tasks)]


def task_documents(cfg: StreamConfig, data: DataConfig) -> list[tuple[str, dict[str, list[str]]]]:
    """(domain, documents per split) of every task, in stream order."""
    if cfg.benchmark == "permuted":
        pool = _document_pool(data.source, data.text_column, data.max_documents)
        domain = domain_name(data.source)
        return [(domain, parts) for parts in split_documents(pool, cfg.n_tasks, cfg, [cfg.task_seed])]
    schedule = domain_schedule(cfg)
    per_domain: dict[int, list[dict[str, list[str]]]] = {}
    for d, source in enumerate(cfg.domains):
        n = schedule.count(d)
        if n:
            pool = _document_pool(source, data.text_column, data.max_documents)
            per_domain[d] = split_documents(pool, n, cfg, [cfg.task_seed, d])
    return [(domain_name(cfg.domains[d]), per_domain[d].pop(0)) for d in schedule]


# --- permutations -----------------------------------------------------------------------------------------------

def make_permutations(cfg: StreamConfig, vocab_size: int, eos_id: int) -> tuple[np.ndarray, list[int]]:
    """Token-id permutations (n, vocab_size) that fix ``eos_id``, and the permutation index of each task."""
    movable = np.delete(np.arange(vocab_size), eos_id)

    def fresh(p: int) -> np.ndarray:
        perm = np.arange(vocab_size)
        perm[movable] = movable[np.random.default_rng([cfg.task_seed, 7, p]).permutation(len(movable))]
        return perm

    if cfg.perm_mode == "unique":
        perms = [fresh(t) for t in range(cfg.n_tasks)]
        return np.stack(perms), list(range(cfg.n_tasks))
    if cfg.perm_mode == "repeat":
        n = min(cfg.repeat_k, cfg.n_tasks)
        return np.stack([fresh(p) for p in range(n)]), [t % n for t in range(cfg.n_tasks)]
    # drift: each task swaps drift_swaps disjoint random pairs of the previous task's images
    perms = [fresh(0)]
    rng = np.random.default_rng([cfg.task_seed, 8])
    n_swaps = min(cfg.drift_swaps, len(movable) // 2)
    for _ in range(1, cfg.n_tasks):
        perm = perms[-1].copy()
        a, b = rng.choice(movable, size=2 * n_swaps, replace=False).reshape(2, n_swaps)
        perm[a], perm[b] = perm[b], perm[a]
        perms.append(perm)
    return np.stack(perms), list(range(cfg.n_tasks))


# --- building the stream ----------------------------------------------------------------------------------------

STREAM_FILE = "stream.json"
STREAM_FORMAT = 2  # bump when the tasks' splitting or encoding changes, so keys of older caches miss


def build_stream(cfg: StreamConfig, data: DataConfig) -> TaskStream:
    """Load, split, tokenize and (for ``permuted``) permute every task into this node's cache, or reuse it there.

    Raises DataError when a split of a task is too short for one window of ``data.seq_len + 1`` tokens.
    """
    settings = json.dumps({"format": STREAM_FORMAT, "stream": dataclasses.asdict(cfg),
                           "tokenizer": [data.tokenizer, data.vocab_size], "text_column": data.text_column,
                           "max_documents": data.max_documents}, sort_keys=True)
    key = _stream_key(cfg, data, settings)
    local = None if data.rebuild else cached_bundle(data.cache_dir, key)
    if local is None:
        local = _build_stream(cfg, data, settings)
        remember_bundle(data.cache_dir, key, local.name)
    stream = load_stream(local, data.seq_len)
    log.info("%s stream: %d tasks, vocab %d, shards in %s", cfg.benchmark, len(stream.tasks), stream.vocab_size,
             local)
    return stream


def _stream_key(cfg: StreamConfig, data: DataConfig, settings: str) -> str | None:
    """The stream's cache key from its settings and its sources' identities (file sizes and modification times,
    hub revisions), without reading a document; None when a source has no such identity."""
    sources = [data.source] if cfg.benchmark == "permuted" else list(cfg.domains)
    fingerprints = [source_fingerprint(source) for source in sources]
    if any(f is None for f in fingerprints):
        return None
    return hashlib.sha256((settings + json.dumps(fingerprints, sort_keys=True)).encode()).hexdigest()[:32]


def _build_stream(cfg: StreamConfig, data: DataConfig, settings: str) -> Path:
    """Read, split, tokenize and permute the tasks into a bundle of this node's cache named by their contents."""
    parts = task_documents(cfg, data)
    digest = hashlib.sha256(settings.encode())
    for domain, splits in parts:
        digest.update(domain.encode())
        for split in TASK_SPLITS:
            for doc in splits[split]:
                digest.update(hashlib.sha1(doc.encode("utf-8")).digest())
    name = f"continual-{digest.hexdigest()[:24]}"

    def build(folder: Path) -> None:
        train_docs = [doc for _, splits in parts for doc in splits["train"]]
        # trained on the tasks' training text only
        tok = resolve_tokenizer(data, Corpus("continual", {"train": train_docs}), Location(folder))
        perms, perm_of_task = (make_permutations(cfg, tok.vocab_size, tok.eos_id) if cfg.benchmark == "permuted"
                               else (None, [-1] * cfg.n_tasks))
        dtype = token_dtype(tok.vocab_size)
        tasks = []
        for t, (domain, splits) in enumerate(parts):
            n_tokens = {}
            for split in TASK_SPLITS:
                # int64: the ids index the permutation table
                tokens = encode_with_eos(tok, splits[split], f"tokenizing task {t} {split}", dtype=np.int64)
                if perms is not None:
                    tokens = perms[perm_of_task[t]][tokens]
                np.save(folder / f"task{t:03d}_{split}.npy", tokens.astype(dtype))
                n_tokens[split] = len(tokens)
            name = f"permuted-{t}" if cfg.benchmark == "permuted" else f"{domain}-{t}"
            tasks.append({"index": t, "name": name, "domain": domain, "permutation": perm_of_task[t],
                          "n_documents": {s: len(splits[s]) for s in TASK_SPLITS}, "n_tokens": n_tokens})
        if perms is not None:
            np.save(folder / "permutations.npy", perms)
        (folder / STREAM_FILE).write_text(json.dumps({"benchmark": cfg.benchmark, "vocab_size": tok.vocab_size,
                                                      "eos_id": tok.eos_id, "tasks": tasks}))

    if data.rebuild:
        shutil.rmtree(Path(data.cache_dir).expanduser() / name, ignore_errors=True)
    return build_bundle(data.cache_dir, name, build)


def load_stream(folder: str | Path, seq_len: int) -> TaskStream:
    """The stream in a local bundle folder (made by ``build_stream``, or fetched from shared storage); raises
    DataError when a split of a task is too short for one window of ``seq_len + 1`` tokens."""
    folder = Path(folder)
    spec = json.loads((folder / STREAM_FILE).read_text())
    tasks = []
    for t in spec["tasks"]:
        for split, n_tokens in t["n_tokens"].items():
            if count_windows(n_tokens, seq_len) < 1:
                raise DataError(f"task {t['index']} ({t['domain']}) has only {n_tokens} {split} tokens, fewer than "
                                f"one window of data.seq_len + 1 = {seq_len + 1}; use fewer tasks (--tasks), a "
                                "shorter data.seq_len or a larger corpus")
        shards = {split: str(folder / f"task{t['index']:03d}_{split}.npy") for split in TASK_SPLITS}
        tasks.append(Task(t["index"], t["name"], t["domain"], shards, t["n_documents"], t["permutation"]))
    perms = np.load(folder / "permutations.npy") if (folder / "permutations.npy").is_file() else None
    return TaskStream(tasks, str(folder / TOKENIZER_FILE), spec["vocab_size"], spec["eos_id"], perms, str(folder))
