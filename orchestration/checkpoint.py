"""Training checkpoints: a directory with safetensors weights, optimizer state, trainer state, tokenizer and config.

Layout of one checkpoint (written complete into a temporary directory, then handed to Ray Train, which registers
it only once every file is persisted, so a crash never leaves a half-written checkpoint in use)::

    step_000200/
      model.safetensors  model.json     # models.io: weights + preset name and model config
      optimizer.pt                      # optimizer state_dict (tensors only; loaded with weights_only=True)
      trainer_state.json                # step, data position, tokens seen, early-stopping state
      tokenizer.json  config.yaml       # what the run was trained with
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from models.common.errors import ModelError
from models.io import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from orchestration.errors import CheckpointError

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


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


def save_training_checkpoint(directory: str | os.PathLike, model: nn.Module, model_name: str,
                             optimizer: torch.optim.Optimizer, state: TrainerState, run_dir: str | os.PathLike) -> None:
    directory = Path(directory)
    save_model(model, model_name, directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    for name in ("tokenizer.json", "config.yaml"):
        if (Path(run_dir) / name).is_file():
            shutil.copy2(Path(run_dir) / name, directory / name)


def load_training_checkpoint(directory: str | os.PathLike, model: nn.Module) -> TrainerState:
    """Load weights into ``model``; returns the trainer state to continue from."""
    directory = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, TRAINER_STATE_FILE) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete (missing {', '.join(missing)}); "
                              "delete it to resume from the previous one")
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
                              "or from another model, delete it to resume from the previous one") from None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    summary = path / "summary.json"
    if summary.is_file():
        ckpt = json.loads(summary.read_text()).get("checkpoint")
        if ckpt and (Path(ckpt) / WEIGHTS_FILE).is_file():
            return Path(ckpt)
    candidates = sorted((p for p in path.glob("checkpoints/step_*") if (p / TRAINER_STATE_FILE).is_file()),
                        key=lambda p: p.name)
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {str(path)!r}: pass a run directory written by "
                              "memtrain pretrain (it holds checkpoints/step_*) or a checkpoint directory")
    return candidates[-1]


def config_differences(saved: dict, current: dict, keys: list[str]) -> list[str]:
    """Dotted ``keys`` whose values differ between two config dicts, as 'key: saved -> current' lines."""
    out = []
    for key in keys:
        a, b = saved, current
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}
