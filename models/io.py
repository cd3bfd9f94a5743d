"""Save and load any registry model as ``model.safetensors`` + ``model.json`` (preset name and full config).

Example::

    >>> import tempfile
    >>> from models.registry import build_model
    >>> from models.io import save_model, load_model
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_model(build_model("tgsmn-dense-tiny", vocab_size=300), "tgsmn-dense-tiny", d)
    ...     load_model(d).training      # loaded models come back in eval mode
    False
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import safetensors.torch
from torch import nn

from models.common.errors import ModelError
from models.registry import build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


def save_model(model: nn.Module, name: str, directory: str | os.PathLike) -> None:
    """Write weights (safetensors; tied weights stored once) and the config. Each file is written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / (WEIGHTS_FILE + ".tmp")
    safetensors.torch.save_model(model, str(tmp_weights))
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    tmp_config = directory / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps({"name": name, "config": dataclasses.asdict(model.cfg)}, indent=2))
    os.replace(tmp_config, directory / CONFIG_FILE)


def read_model_spec(directory: str | os.PathLike) -> tuple[str, dict]:
    """The preset name and config fields saved in ``directory``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"no {CONFIG_FILE} in {directory}: not a memtrain model directory "
                         "(point at a checkpoint directory written by memtrain pretrain or save_model)")
    spec = json.loads(path.read_text())
    return spec["name"], spec["config"]


def load_model(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild the model saved in ``directory`` and load its weights; returns it in eval mode on ``device``."""
    name, config = read_model_spec(directory)
    model = build_model(name, **config)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{weights} is missing; the checkpoint is incomplete (re-save it or use an earlier one)")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=device)
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(f"cannot read weights from {weights}: {exc}. The file is corrupt; use another checkpoint") from exc
    if missing or unexpected:
        raise ModelError(f"weights in {weights} do not match model {name!r}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()
