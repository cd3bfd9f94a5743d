"""Input checks. Every call is checked in full before anything is written, so a refused batch leaves no trace."""

from __future__ import annotations

import json
import numbers

import numpy as np

from memory_service.errors import MemoryServiceError


def check_vectors(x: object, dim: int, what: str, cosine: bool, max_rows: int) -> np.ndarray:
    """A C-contiguous float32 (N, dim) array with 1 <= N <= max_rows, finite values and (for cosine) no zero rows."""
    if not isinstance(x, np.ndarray):
        hint = " (for a torch tensor: t.detach().cpu().float().numpy())" if type(x).__module__.startswith("torch") else ""
        raise MemoryServiceError(f"{what} must be a numpy float32 array of shape (n, {dim}), got {type(x).__name__}{hint}")
    if x.dtype != np.float32:
        raise MemoryServiceError(f"{what} have dtype {x.dtype}, but the memory holds float32; "
                                 f"convert with {what}.astype(np.float32)")
    if x.ndim != 2:
        hint = f"; for one vector use {what}.reshape(1, -1)" if x.ndim == 1 else ""
        raise MemoryServiceError(f"{what} must be 2-D (n, {dim}), got shape {x.shape}{hint}")
    if x.shape[1] != dim:
        raise MemoryServiceError(f"{what} have dimension {x.shape[1]}, but this memory was created with dim={dim}; "
                                 f"embed with the same model, or create a memory with dim={x.shape[1]}")
    if x.shape[0] == 0:
        raise MemoryServiceError(f"{what} is an empty batch (shape {x.shape}); pass at least one vector")
    if x.shape[0] > max_rows:
        raise MemoryServiceError(f"{what} hold {x.shape[0]} rows, more than the {max_rows} one call may carry "
                                 "(MemoryConfig.max_batch); split them into several calls")
    finite_N = np.isfinite(x).all(axis=1)
    if not finite_N.all():
        bad = np.flatnonzero(~finite_N)
        raise MemoryServiceError(f"{what} contain NaN or infinite values in row(s) {bad[:10].tolist()}"
                                 f"{' ...' if bad.size > 10 else ''}; fix or drop those rows")
    if cosine:
        zero_N = ~np.any(x != 0, axis=1)
        if zero_N.any():
            raise MemoryServiceError(f"{what} row(s) {np.flatnonzero(zero_N)[:10].tolist()} are all zeros, which have no "
                                     "direction under metric='cosine'; drop them or use metric='l2'")
    return np.ascontiguousarray(x)


def check_texts(texts: object, n: int, max_bytes: int) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise MemoryServiceError(f"texts must be a list of {n} str (one per vector), got {type(texts).__name__}; "
                                 "wrap a single text in a list")
    if len(texts) != n:
        raise MemoryServiceError(f"got {n} vectors but {len(texts)} texts; pass exactly one text per vector")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise MemoryServiceError(f"texts[{i}] is {type(text).__name__}, not str; convert it with str() or fix the data")
        if len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:  # 4 bytes per char at most
            raise MemoryServiceError(f"texts[{i}] has {len(text.encode('utf-8'))} bytes, more than the "
                                     f"{max_bytes} one entry may hold (MemoryConfig.max_text_bytes); store a shorter "
                                     "passage (and keep the full text elsewhere, e.g. its id in metadata)")
    return list(texts)


def check_metadata(metadata: object, n: int, max_bytes: int) -> list[str | None]:
    """JSON text per entry (None where there is no metadata)."""
    if metadata is None:
        return [None] * n
    if isinstance(metadata, dict) or not isinstance(metadata, (list, tuple)):
        raise MemoryServiceError(f"metadata must be None or a list of {n} dicts (one per vector), got "
                                 f"{type(metadata).__name__}; wrap a single dict in a list")
    if len(metadata) != n:
        raise MemoryServiceError(f"got {n} vectors but {len(metadata)} metadata entries; pass one dict (or None) per vector")
    encoded = []
    for i, meta in enumerate(metadata):
        if meta is None:
            encoded.append(None)
            continue
        if not isinstance(meta, dict):
            raise MemoryServiceError(f"metadata[{i}] is {type(meta).__name__}; each entry must be a dict or None")
        try:
            encoded.append(json.dumps(meta, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise MemoryServiceError(f"metadata[{i}] is not JSON-serialisable ({err}); keep to str/int/float/bool/None, "
                                     "lists and dicts") from err
        if len(encoded[-1]) > max_bytes // 4 and len(encoded[-1].encode("utf-8")) > max_bytes:
            raise MemoryServiceError(f"metadata[{i}] is {len(encoded[-1].encode('utf-8'))} bytes of JSON, more than "
                                     f"the {max_bytes} one entry may hold (MemoryConfig.max_metadata_bytes)")
    return encoded


def check_k(k: object, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
        raise MemoryServiceError(f"k must be a positive int (neighbours per query), got {k!r}")
    if k > max_k:
        raise MemoryServiceError(f"k={k} is more neighbours than a search may ask for (MemoryConfig.max_k={max_k}); "
                                 "ask for fewer, or raise max_k")
    return int(k)


def check_ids(ids: object, max_ids: int) -> np.ndarray:
    """A non-empty 1-D int64 array of at most max_ids distinct ids."""
    ids_N = np.asarray(ids)
    if ids_N.ndim == 0:
        ids_N = ids_N.reshape(1)
    if ids_N.ndim != 1 or ids_N.size == 0:
        raise MemoryServiceError(f"ids must be a non-empty 1-D sequence of ints, got shape {ids_N.shape}")
    if not np.issubdtype(ids_N.dtype, np.integer):
        raise MemoryServiceError(f"ids must be integers (the ids add() returned), got dtype {ids_N.dtype}")
    if ids_N.size > max_ids:
        raise MemoryServiceError(f"{ids_N.size} ids are more than one call may carry (MemoryConfig.max_batch={max_ids}); "
                                 "split them into several calls")
    ids_N = ids_N.astype(np.int64)
    unique_U, counts_U = np.unique(ids_N, return_counts=True)
    if (counts_U > 1).any():
        raise MemoryServiceError(f"ids contain duplicates {unique_U[counts_U > 1][:10].tolist()}; pass each id once")
    return ids_N


def check_key(key: object) -> str | None:
    """An idempotency key: None, or a non-empty str of at most 256 characters."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > 256:
        raise MemoryServiceError(f"key must be None or a non-empty str of at most 256 characters (one per batch, "
                                 f"e.g. a uuid), got {key!r}"[:300])
    return key
