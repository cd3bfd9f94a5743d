"""``memtrain memory serve|stats|snapshot|search|add|stop``: run, fill and inspect a named memory (a FAISS index
in a detached Ray actor, see ``memory_service.actor``) on the current Ray cluster.

Every subcommand sets ``func(args) -> int``. ``add`` reads and checks its whole input against the memory's limits
before it sends anything, then sends batches of at most ``max_batch`` entries, each under an idempotency key made
from its position and content, so a re-run after a crash adds only the batches that had not landed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from memory_service.actor import DEFAULT_NAMESPACE, get_or_create_memory
from memory_service.config import MemoryConfig
from memory_service.errors import MemoryServiceError
from memory_service.validation import check_metadata, check_texts, check_vectors
from orchestration.config import load_config

MEMORY_HELP = """\
The shared semantic memory: a FAISS index of vectors with their texts and metadata, served by a named Ray actor
that outlives the command and keeps its data on disk (snapshots and a write-ahead log, optionally copied to shared
storage). Training runs, RL envs and `memtrain hmst` reach it by its name.

Start a Ray cluster that outlives the commands, then:

    ray start --head
    memtrain memory serve --name semantic path=semantic dim=128 metric=cosine
    memtrain memory add --name semantic --texts facts.jsonl --checkpoint runs/hf
    memtrain memory add --name semantic --vectors embeddings.npy --texts passages.parquet
    memtrain memory search --name semantic --queries q.npy --k 5
    memtrain memory stats --name semantic
    memtrain memory snapshot --name semantic
    memtrain memory stop --name semantic"""

SERVE_HELP = """\
Start the named memory on the Ray cluster, or attach to it if it runs, and print its stats as JSON. The memory
keeps its data in `path` on the node that serves it: stopping it and serving it again with the same path reopens
it. Without a running cluster (`ray start --head`) the memory lives in a local one until Ctrl-C."""

ADD_HELP = """\
Add entries to a running memory, from

  --texts FILE --checkpoint RUN      texts embedded with the semantic embedder of an HMST run (the one
                                     `memtrain hmst ask --semantic` searches with), or
  --vectors FILE.npy [--texts FILE]  your own float32 vectors, shape (N, dim), stored as they are, with the texts
                                     of N records (or empty texts).

A texts file is JSON Lines (one object per line) or parquet, with a "text" field (--text-field names another);
every other field becomes the entry's metadata. The whole input is checked before anything is sent, then the
entries go in batches, each under a key made from its position and content: running the same command again (after
a crash, say) adds only the batches that had not landed, as long as --batch-size stays the same. Prints how many
entries were added and how many were there already, as JSON."""


def register(subparsers) -> None:
    """Add the `memory` command and its subcommands to an argparse subparsers object."""
    memory = subparsers.add_parser("memory", help="the shared semantic memory (a FAISS index in a named Ray actor)",
                                   description=MEMORY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = memory.add_subparsers(dest="memory_command", required=True, metavar="COMMAND")

    def add(name: str, help: str, func, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--name", default="semantic", help="actor name of the memory (default: semantic)")
        sub.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"Ray namespace (default: {DEFAULT_NAMESPACE})")
        sub.set_defaults(func=func)
        return sub

    serve = add("serve", "start the named memory, or attach to it if it runs, and print its stats", _serve,
                SERVE_HELP)
    serve.add_argument("--config", help="YAML file of memory settings (the key=value fields)")
    serve.add_argument("overrides", nargs="*", metavar="key=value",
                       help="memory settings, e.g. path=semantic dim=128 index=ivf metric=cosine capacity=1000000 "
                            "backup=s3://bucket/memories/semantic. path is required (a relative one is under the "
                            "memory root of the actor's node: MEMTRAIN_MEMORY_ROOT, default ~/.cache/memtrain/memory); "
                            "dim is the length of your vectors (default 128)")
    add("stats", "print the memory's stats as JSON", _stats,
        "Print the memory's stats as JSON: entries, settings, totals added/evicted/removed, snapshot and recovery "
        "figures, and where it is stored.")
    add("snapshot", "write a snapshot now and print where the memory stands", _snapshot,
        "Write a snapshot now (recovery after a restart replays the log written since the last one) and print its "
        "sequence number, the entries it holds and the seconds it took, as JSON.")
    search = add("search", "search the memory with query vectors and print the hits as JSON", _search,
                 "Search the memory with query vectors and print, for each query, its k nearest entries (id, score, "
                 "text, metadata) as JSON.")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--queries", help=".npy file of float32 queries, shape (Q, dim) or (dim,)")
    queries.add_argument("--vector", help="one query as comma-separated floats")
    search.add_argument("--k", type=int, default=5, help="neighbours per query (default: 5)")
    fill = add("add", "add entries from a JSONL/parquet file of texts or a .npy file of vectors", _add, ADD_HELP)
    fill.add_argument("--texts", metavar="FILE",
                      help="JSON Lines or parquet file of records with a text field (other fields: metadata)")
    source = fill.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN",
                        help="HMST run or checkpoint (a path or a URI) whose semantic embedder embeds --texts; the "
                             "memory's dim must be the model's d_model")
    source.add_argument("--vectors", metavar="FILE.npy",
                        help=".npy file of float32 vectors, shape (N, dim), stored as they are")
    fill.add_argument("--text-field", dest="text_field", default="text",
                      help="the field (column) of --texts that holds the text (default: text)")
    fill.add_argument("--batch-size", dest="batch_size", type=int, default=1024,
                      help="entries per add; the memory's max_batch caps it (default: 1024)")
    stop = add("stop", "snapshot and stop the memory actor (its data stays on disk)", _stop,
               "Write a final snapshot and stop the memory's actor. Its data stays on disk: `memtrain memory serve` "
               "with the same path reopens it.")
    stop.add_argument("--no-snapshot", action="store_true",
                      help="stop without a final snapshot (the log is replayed when it is served again)")


def _connect(namespace: str, allow_local: bool) -> bool:
    """Join the running Ray cluster; returns True if a local one had to be started (serve only)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto", namespace=namespace, log_to_driver=False)
        return False
    except ConnectionError:
        if not allow_local:
            raise MemoryServiceError("no Ray cluster is running; start one with `ray start --head`, then "
                                     "`memtrain memory serve`") from None
    ray.init(address="local", namespace=namespace, include_dashboard=False, log_to_driver=False)
    return True


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


def _serve(args) -> int:
    config = load_config(MemoryConfig, args.config, args.overrides)
    if config.path is None:
        raise MemoryServiceError("serve needs a folder for the memory's data on the actor's node: add path=NAME (under "
                                 "that node's memory root) or path=/absolute/folder")
    local_cluster = _connect(args.namespace, allow_local=True)
    mem = get_or_create_memory(args.name, config, namespace=args.namespace)
    _print({"name": args.name, "namespace": args.namespace, **mem.stats()})
    if local_cluster:
        # A detached actor lives as long as its cluster, and this local cluster ends with this process.
        print(f"no Ray cluster was running, so memory {args.name!r} is served from a local one until Ctrl-C; "
              "run `ray start --head` first to keep it in the background", file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _print(mem.snapshot())
    return 0


def _stats(args) -> int:
    _connect(args.namespace, allow_local=False)
    _print(get_or_create_memory(args.name, namespace=args.namespace).stats())
    return 0


def _snapshot(args) -> int:
    _connect(args.namespace, allow_local=False)
    _print(get_or_create_memory(args.name, namespace=args.namespace).snapshot())
    return 0


def _search(args) -> int:
    if args.queries:
        try:
            queries = np.load(args.queries, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise MemoryServiceError(f"--queries {args.queries!r} cannot be read as a .npy array of float32 queries "
                                     f"({err}); save them with np.save(path, queries.astype(np.float32))") from None
    else:
        try:
            queries = np.array([float(v) for v in args.vector.split(",")], dtype=np.float32)
        except ValueError as err:
            raise MemoryServiceError(f"--vector must be comma-separated numbers ({err})") from None
    queries_QD = queries.reshape(1, -1) if queries.ndim == 1 else queries
    _connect(args.namespace, allow_local=False)
    hits = get_or_create_memory(args.name, namespace=args.namespace).search(queries_QD, args.k)
    _print([[hit._asdict() for hit in hits.query(q)] for q in range(len(hits.texts))])
    return 0


def read_records(path: str, text_field: str) -> tuple[list[str], list[dict | None]]:
    """Texts and metadata (every other field; None when there is none) of a JSON Lines or parquet file."""
    file = Path(path)
    if not file.is_file():
        raise MemoryServiceError(f"--texts {path!r} does not exist; give a .jsonl or .parquet file")
    if file.suffix == ".jsonl":
        rows = []
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MemoryServiceError(f"{path} line {number} is not JSON ({err}); write one object per "
                                             "line") from None
                if not isinstance(row, dict):
                    raise MemoryServiceError(f"{path} line {number} is not a JSON object; write one object per line, "
                                             f'e.g. {{"{text_field}": "..."}}')
                rows.append(row)
        where = "line"
    elif file.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(file).to_pylist()
        except (OSError, pyarrow.ArrowException) as err:
            raise MemoryServiceError(f"{path} cannot be read as parquet ({err})") from None
        where = "row"
    else:
        raise MemoryServiceError(f"--texts {path!r} is neither .jsonl nor .parquet; convert it to one of them")
    if not rows:
        raise MemoryServiceError(f"{path} holds no records")
    texts, metadata = [], []
    for number, row in enumerate(rows, 1):
        text = row.pop(text_field, None)
        if not isinstance(text, str):
            fields = ", ".join(sorted(map(str, row))) or "none"
            raise MemoryServiceError(f"{path} {where} {number} has no text in field {text_field!r} (its other fields: "
                                     f"{fields}); name the text field with --text-field")
        texts.append(text)
        metadata.append(row or None)
    return texts, metadata


def load_vectors(path: str) -> np.ndarray:
    """The (N, dim) float32 array of a .npy file."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise MemoryServiceError(f"--vectors {path!r} cannot be read as a .npy array ({err}); save your vectors "
                                 "with np.save(path, vectors.astype(np.float32))") from None
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise MemoryServiceError(f"--vectors {path!r} holds a {vectors.dtype} array of shape {vectors.shape}, not "
                                 "float32 of shape (N, dim); save it with np.save(path, vectors.astype(np.float32))")
    return vectors


def batch_key(start: int, texts: list[str], metadata: list[dict | None], content: bytes) -> str:
    """The idempotency key of one batch: its position in the input and what it holds (texts, metadata, and the
    vectors or the embedder that makes them), so the same command run again sends the same keys.

    >>> batch_key(0, ["a"], [None], b"") == batch_key(0, ["a"], [None], b"")
    True
    >>> batch_key(0, ["a"], [None], b"") == batch_key(1, ["a"], [None], b"")
    False
    """
    digest = hashlib.sha256(json.dumps([start, texts, metadata], sort_keys=True, default=str).encode())
    digest.update(content)
    return f"memory-add-{digest.hexdigest()[:40]}"


def _add(args) -> int:
    if args.batch_size < 1:
        raise MemoryServiceError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint and not args.texts:
        raise MemoryServiceError("--checkpoint embeds texts: give them with --texts FILE.jsonl (or .parquet)")
    texts, metadata = read_records(args.texts, args.text_field) if args.texts else (None, None)
    embedder = vectors_ND = None
    if args.vectors:
        vectors_ND = load_vectors(args.vectors)
        n = len(vectors_ND)
        if texts is None:
            texts, metadata = [""] * n, [None] * n
        elif len(texts) != n:
            raise MemoryServiceError(f"--vectors holds {n} vectors but --texts {len(texts)} records; give one "
                                     "record per vector, in the same order")
        dim = vectors_ND.shape[1]
    else:
        from models.hmst.engine import HMSTEngine
        from orchestration.cli.hmst import load_hmst

        blank = [i + 1 for i, text in enumerate(texts) if not text.strip()]
        if blank:
            raise MemoryServiceError(f"{args.texts} has blank texts (record(s) {blank[:10]}), which embed to nothing; "
                                     "drop them")
        embedder = HMSTEngine(*load_hmst(args.checkpoint)).embedder  # what the engine fills and searches with
        # the engine reads the signature to tell its own entries from those of another embedder
        metadata = [{**(meta or {}), "embedder": embedder.signature} for meta in metadata]
        dim = embedder.dim

    _connect(args.namespace, allow_local=False)
    memory = get_or_create_memory(args.name, namespace=args.namespace)
    config = memory.config()
    if dim != config.dim:
        made = (f"{args.vectors} holds {dim}-d vectors" if args.vectors else
                f"the embedder of {args.checkpoint} makes {dim}-d vectors")
        raise MemoryServiceError(f"memory {args.name!r} holds {config.dim}-d vectors but {made}; add them to a memory "
                                 f"served with dim={dim}")
    n = len(texts)
    texts = check_texts(texts, n, config.max_text_bytes)
    check_metadata(metadata, n, config.max_metadata_bytes)
    if vectors_ND is not None:
        vectors_ND = check_vectors(vectors_ND, dim, "vectors", config.metric == "cosine", n)

    from orchestration.progress import progress

    batch = min(args.batch_size, config.max_batch)
    first_new_id = memory.stats()["next_id"]  # ids below it answer a batch that had landed before this run
    added = present = 0
    with progress(desc=f"adding to memory {args.name}", total=n, unit="entry") as bar:
        for start in range(0, n, batch):
            texts_b, metadata_b = texts[start:start + batch], metadata[start:start + batch]
            if vectors_ND is not None:
                vectors_BD = vectors_ND[start:start + batch]
                content = vectors_BD.tobytes()
            else:
                vectors_BD = embedder.embed(texts_b)
                content = embedder.signature.encode()
            ids_B = memory.add(vectors_BD, texts_b, metadata_b, key=batch_key(start, texts_b, metadata_b, content))
            if ids_B[0] >= first_new_id:
                added += len(ids_B)
            else:
                present += len(ids_B)
            bar.update(len(ids_B))
    _print({"name": args.name, "added": added, "already_present": present, "batches": -(-n // batch),
            "count": memory.stats()["count"]})
    return 0


def _stop(args) -> int:
    _connect(args.namespace, allow_local=False)
    get_or_create_memory(args.name, namespace=args.namespace).shutdown(snapshot=not args.no_snapshot)
    print(f"memory {args.name!r} stopped; its data stays on disk, `memtrain memory serve` with the same path reopens it")
    return 0
