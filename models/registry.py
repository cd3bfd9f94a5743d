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
import typing
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


def check_overrides(name: str, overrides: dict):
    """``model_config(name, **overrides)`` for overrides read from a file or the command line, where a value can
    have the wrong type: also refuses a value that is not of its field's type, naming the field and the valid
    fields.

    Example::

        >>> check_overrides("tgsmn-sparse-tiny", {"n_layers": 2}).n_layers
        2
        >>> check_overrides("tgsmn-sparse-tiny", {"n_layers": 2.5})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        models.common.errors.ModelError: field n_layers of model 'tgsmn-sparse-tiny' must be int, got 2.5 (float); ...
    """
    hints = typing.get_type_hints(type(model_config(name)))
    for key, value in overrides.items():
        if key in hints and not _fits(value, hints[key]):  # model_config names the unknown ones
            raise ModelError(f"field {key} of model {name!r} must be {hints[key].__name__}, got {value!r} "
                             f"({type(value).__name__}); valid fields: {', '.join(sorted(hints))}")
    return model_config(name, **overrides)


def _fits(value, expected) -> bool:
    """Whether a value read from YAML fits a field's type: an int is a valid float, a list a valid tuple."""
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(expected) is tuple:  # tuple[int, ...]
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(expected)[0]) for v in value)
    return isinstance(value, expected)


def build_model(name: str, **overrides) -> nn.Module:
    """Build preset ``name`` with config ``overrides`` (for example ``vocab_size=...``)."""
    cfg = model_config(name, **overrides)
    return _presets()[name].build(cfg)


def count_params(model: nn.Module) -> dict[str, int]:
    """``{"total", "active"}`` parameters of a model (a tied head counted once).

    "active" is what one token uses, from the model's ``active_params()`` (a model with sparse experts leaves out
    those it is not routed to); a model without that method is dense: active == total.

    Example::

        >>> counts = count_params(build_model("hmst-micro", vocab_size=64))
        >>> counts["active"] < counts["total"]
        True
    """
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "active": model.active_params() if hasattr(model, "active_params") else total}


def param_counts(name: str, **overrides) -> dict[str, int]:
    """``count_params`` of preset ``name`` with config ``overrides``, built on the meta device (no memory is
    allocated, so hmst-large can be counted on a laptop)."""
    with torch.device("meta"):
        return count_params(build_model(name, **overrides))
