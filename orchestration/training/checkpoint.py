"""Training checkpoints: a folder with safetensors weights, optimizer state, trainer state, tokenizer, config and a
manifest (sizes and SHA-256 of every file, see ``orchestration.storage.runfiles``).

Layout of one checkpoint (written complete into a temporary folder on the worker, then handed to Ray Train, which
uploads it to the run's storage and registers it once every file is persisted)::

    <output>/checkpoints/step_000200/
      model.safetensors  model.json     # models.io: weights + preset name and model config
      optimizer.pt                      # optimizer state_dict (tensors only; loaded with weights_only=True)
      trainer_state.json                # step, data position, tokens seen, early-stopping state
      tokenizer.json  config.yaml       # what the run was trained with: every checkpoint can be used on its own
      manifest.json                     # what a complete, undamaged checkpoint holds

Example::

    >>> model, tokenizer, where = load_lm("s3://bucket/runs/x")     # newest checkpoint of a run  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.common.errors import ModelError
from models.io import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from orchestration.errors import CheckpointError, StorageError
from orchestration.storage import MANIFEST, Location, local_copy, newest_intact_checkpoint, write_manifest
from orchestration.data.tokenizers import TOKENIZER_FILE, load_tokenizer

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_PREFIX = "step_"  # checkpoints/step_000200: the optimizer step (or, for continual runs, training step)


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps taken."""
    samples: int = 0
    """Training windows consumed by all workers together: the data position a resumed run continues from."""
    tokens: int = 0
    """Training tokens consumed by all workers together."""
    best_eval_loss: float = math.inf
    """Lowest held-out loss so far (for early stopping)."""
    evals_since_best: int = 0
    """Evaluations since the best one (early stopping stops at patience)."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step`` (ordered by number when listed, whatever its width)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def save_training_checkpoint(directory: str | os.PathLike, model: nn.Module, model_name: str,
                             optimizer: torch.optim.Optimizer, state: TrainerState, tokenizer_json: str,
                             config_yaml: str) -> None:
    """Write a complete checkpoint into a local folder, its manifest last."""
    directory = Path(directory)
    save_model(model, model_name, directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    (directory / TOKENIZER_FILE).write_text(tokenizer_json)
    (directory / "config.yaml").write_text(config_yaml)
    write_manifest(directory)


def check_checkpoint(directory: str | os.PathLike) -> None:
    """Raise CheckpointError when a local checkpoint folder is incomplete or damaged (against its manifest)."""
    from orchestration.storage.runfiles import damaged_files

    directory = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, TRAINER_STATE_FILE, MANIFEST) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete (missing {', '.join(missing)})")
    try:
        bad = damaged_files(directory, json.loads((directory / MANIFEST).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        bad = [MANIFEST]
    if bad:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {', '.join(bad)} missing or not what was written")


def load_training_checkpoint(directory: str | os.PathLike, model: nn.Module) -> TrainerState:
    """Load weights into ``model`` from a local checkpoint folder; returns the trainer state to continue from."""
    directory = Path(directory)
    check_checkpoint(directory)
    try:
        loaded = load_model(directory, device="cpu")
        state = TrainerState(**json.loads((directory / TRAINER_STATE_FILE).read_text()))
    except (ModelError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {exc}") from None
    own = model.state_dict()
    theirs = loaded.state_dict()
    if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
        raise CheckpointError(f"checkpoint {directory} holds a different model architecture than this run builds; "
                              "resume with the same model settings or start a new --output")
    model.load_state_dict(theirs)
    return state


def load_optimizer_state(directory: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    try:
        optimizer.load_state_dict(torch.load(Path(directory) / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"optimizer state in {directory} cannot be loaded: {exc}; the checkpoint is corrupt "
                              "or from another model") from None


# A run folder without checkpoints of its own (a pipeline) names the sub-folder that holds its model in its
# summary.json under this key, relative to the run folder.
MODEL_RUN_KEY = "model_run"


def find_checkpoint(where: str | os.PathLike | Location) -> Location:
    """The checkpoint that ``where`` stands for, local, on a shared mount or a URI.

    ``where`` may be a checkpoint folder; a run folder of ``memtrain pretrain`` or ``memtrain continual`` (its newest
    intact checkpoint: a damaged newer one is skipped with a warning); or a run made of runs, such as a pipeline
    (the run its summary.json names under ``model_run``, else the only sub-folder holding a model). An RL run
    holds a policy, not a language model: it is refused with a pointer to the commands that play it.
    """
    location = Location(where)
    if (location / MANIFEST).is_file() or (location / WEIGHTS_FILE).is_file():
        return location
    latest = newest_intact_checkpoint(location, CHECKPOINT_PREFIX)
    if latest is not None:
        return latest.location
    if (location / "policy").is_dir():
        raise CheckpointError(f"{location.uri} is an RL run: it holds a controller policy, not a language model; "
                              "play it with `memtrain rl eval` or `memtrain continual --controller`")
    summary = location / "summary.json"
    named = (summary.read_json() or {}).get(MODEL_RUN_KEY) if summary.is_file() else None
    if named:
        return find_checkpoint(location / named)
    children = [location / name for name in location.listdir()] if location.is_dir() else []
    holders = [child for child in children if newest_intact_checkpoint(child, CHECKPOINT_PREFIX) is not None]
    if len(holders) == 1:
        return find_checkpoint(holders[0])
    if holders:
        raise CheckpointError(f"{location.uri} holds several models ({', '.join(h.name for h in holders)}); pass "
                              "the one you mean, e.g. " + holders[0].uri)
    raise CheckpointError(f"no checkpoint found in {location.uri!r}: pass a run folder written by memtrain "
                          "pretrain, continual or pipeline, or a checkpoint folder (checkpoints/step_*)")


def load_lm(where: str | os.PathLike | Location, device: str = "cpu") -> tuple[nn.Module, object, Location]:
    """The model and tokenizer of a checkpoint (or of a run's newest one), wherever it is stored, and the
    checkpoint's location."""
    checkpoint = find_checkpoint(where)
    try:
        with local_copy(checkpoint) as path:
            return load_model(path, device=device), load_tokenizer(path), checkpoint
    except StorageError as exc:
        raise CheckpointError(f"the checkpoint is corrupt: {exc}; use another checkpoint") from None
    except ModelError as exc:
        raise CheckpointError(f"checkpoint {checkpoint.uri} is corrupt: {exc}") from None


def config_differences(saved: dict, current: dict, keys: list[str]) -> list[str]:
    """Dotted ``keys`` whose values differ between two config dicts, as 'key: saved -> current' lines; a differing
    section is named field by field (ppo.lr: 0.0003 -> 0.001)."""
    out = []
    for key in keys:
        a, b = saved, current
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{line}" for line in config_differences(a, b, sorted(set(a) | set(b)))]
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
