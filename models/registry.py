"""Every model preset of every family, by name.

Example::

    >>> from models.registry import build_model, list_models
    >>> "tgsmn-dense-tiny" in list_models()
    True
    >>> model = build_model("tgsmn-dense-tiny", vocab_size=512, n_layers=2)
    >>> model.cfg.n_layers
    2

A family is a module with ``PRESETS`` (name -> config field values), ``CONFIG_CLASS`` (a dataclass whose fields
are documented where declared) and ``build(config) -> nn.Module``.
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import cache

import torch
from torch import nn

from models.common.errors import ModelError

FAMILY_MODULES = (
    "models.tgsmn.dense",
    "models.hmst.model",
    "models.tgsmn.sparse",
    "models.thl.model",
)


@cache
def _presets() -> dict[str, object]:
    presets = {}
    for module_name in FAMILY_MODULES:
        family = importlib.import_module(module_name)
        for name in family.PRESETS:
            presets[name] = family
    return presets


def list_models() -> list[str]:
    return sorted(_presets())


def model_config(name: str, **overrides):
    """The typed config of preset ``name`` with ``overrides`` applied; unknown fields are refused."""
    presets = _presets()
    if name not in presets:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    family = presets[name]
    valid = {f.name for f in dataclasses.fields(family.CONFIG_CLASS)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ModelError(f"unknown config field(s) {unknown} for model {name!r}; valid fields: {', '.join(sorted(valid))}")
    return family.CONFIG_CLASS(**{**family.PRESETS[name], **overrides})


def build_model(name: str, **overrides) -> nn.Module:
    """Build preset ``name`` with config ``overrides`` (for example ``vocab_size=...``)."""
    cfg = model_config(name, **overrides)
    return _presets()[name].build(cfg)


def param_counts(name: str, **overrides) -> dict[str, int]:
    """Total and active (used per token) parameters of a preset, counted on the meta device (no memory used).

    A model with sparse experts reports its per-token count through an ``active_params()`` method.
    """
    with torch.device("meta"):
        model = build_model(name, **overrides)
    total = sum(p.numel() for p in model.parameters())
    active = model.active_params() if hasattr(model, "active_params") else total
    return {"total": total, "active": active}
