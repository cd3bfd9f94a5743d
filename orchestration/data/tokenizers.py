"""Tokenizers: a byte-level BPE trained with Hugging Face ``tokenizers``, and raw bytes. Both round-trip text exactly.

Both save to one ``tokenizer.json`` in a folder (local, a shared mount or a URI) and load back with
``load_tokenizer(folder)``.

Example::

    >>> tok = train_bpe(["hello world", "hello there"] * 50, vocab_size=300)
    >>> tok.decode(tok.encode("hello  wörld\\n")) == "hello  wörld\\n"
    True
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from orchestration.errors import DataError
from orchestration.progress import progress_enabled
from orchestration.storage import Location

TOKENIZER_FILE = "tokenizer.json"
EOS = "<|endoftext|>"


class TextTokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str | os.PathLike | Location) -> None: ...
    def to_json(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"memtrain_tokenizer": "bytes"})

    def save(self, directory: str | os.PathLike | Location) -> None:
        (Location(directory) / TOKENIZER_FILE).write_text(self.to_json())


class BPETokenizer:
    """Byte-level BPE (GPT-2 style byte alphabet, no prefix space, so decode(encode(t)) == t for any text)."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        # "<|endoftext|>" inside a document is ordinary text; the EOS id comes only from explicit appends
        self._tok.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        eos = tokenizer.token_to_id(EOS)
        if eos is None:
            raise DataError(f"BPE tokenizer has no {EOS} token; train it with memtrain (train_bpe)")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, directory: str | os.PathLike | Location) -> None:
        (Location(directory) / TOKENIZER_FILE).write_text(self.to_json())


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` tokens (256 byte tokens + merges + the end-of-document token),
    showing the tokenizers library's own progress bars under memtrain's rule (orchestration.progress)."""
    if vocab_size < 258:
        raise DataError(f"BPE vocab_size must be at least 258 (256 bytes + EOS + 1 merge), got {vocab_size}; "
                        "use tokenizer=bytes for a pure byte vocabulary")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=progress_enabled(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def tokenizer_from_json(text: str) -> TextTokenizer:
    payload = json.loads(text)
    if payload.get("memtrain_tokenizer") == "bytes":
        return ByteTokenizer()
    return BPETokenizer(Tokenizer.from_str(text))


def load_tokenizer(path: str | os.PathLike | Location) -> TextTokenizer:
    """Load a tokenizer saved by memtrain: a folder holding tokenizer.json (a run, a checkpoint), or the file."""
    where = Location(path)
    file = where / TOKENIZER_FILE if where.is_dir() else where
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise DataError(f"no tokenizer at {where.uri!r}: expected a {TOKENIZER_FILE} written by a memtrain run "
                        "(for example runs/x/tokenizer.json), or use tokenizer=bpe / tokenizer=bytes to make one") from None
    try:
        return tokenizer_from_json(text)
    except (ValueError, Exception) as exc:  # tokenizers raises plain Exception on a malformed file
        raise DataError(f"cannot read tokenizer {file.uri!r}: {exc}") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (halves shard size and memory bandwidth for small vocabularies)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


