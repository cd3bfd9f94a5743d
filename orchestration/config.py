"""Typed configs from dataclasses, YAML files and ``key=value`` overrides (through OmegaConf).

The dataclasses are the single source of truth; YAML presets and command-line overrides are merged on top, and
unknown keys are refused with the list of valid ones.

Example::

    >>> from orchestration.training.pretrain import PretrainConfig
    >>> cfg = load_config(PretrainConfig, overrides=["max_steps=50", "data.seq_len=64"])
    >>> cfg.max_steps, cfg.data.seq_len
    (50, 64)
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestration.errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but for 1e-3 without a dot: YAML 1.1 makes that a string, YAML 1.2 a float."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+.0123456789"))


def _section(f: dataclasses.Field):
    """The dataclass of a nested config section, else None: declared with ``field(default_factory=Section)``, or
    with a factory that returns a Section with other defaults (``field(default_factory=lambda: Section(x=1))``)."""
    sub = f.default_factory
    if isinstance(sub, type) or sub is dataclasses.MISSING:
        return sub if isinstance(sub, type) and dataclasses.is_dataclass(sub) else None
    made = sub()
    return type(made) if dataclasses.is_dataclass(made) else None


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        section = _section(f)
        keys += _valid_keys(section, prefix + f.name + ".") if section else [prefix + f.name]
    return keys


def _check_keys(cls, values: dict, where: str, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + key!r} in {where}; valid keys: {', '.join(_valid_keys(cls, prefix))}")
        section = _section(fields[key])
        if section and isinstance(value, dict):
            _check_keys(section, value, where, prefix + key + ".")


def nest_dotted(flat: dict[str, object], into: dict | None = None) -> dict:
    """Dotted keys as nested dicts, merged into ``into`` (a new dict by default).

    >>> nest_dotted({"lr": 1e-3, "data.seq_len": 64, "data.source": "builtin"})
    {'lr': 0.001, 'data': {'seq_len': 64, 'source': 'builtin'}}
    """
    out = {} if into is None else into
    for key, value in flat.items():
        cursor = out
        *parents, last = key.split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[last] = value
    return out


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example max_steps=100)")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.load(raw, Loader=_Loader) if raw != "" else ""


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                **values) -> T:
    """Build ``cls`` from its defaults, then a YAML file, then ``values`` (already-parsed flags), then overrides."""
    layers: list[tuple[str, dict]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file (see configs/ for presets)")
        loaded = yaml.load(p.read_text(), Loader=_Loader) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
        layers.append((str(p), loaded))
    if values:
        layers.append(("command-line flags", values))
    for item in overrides or []:
        key, value = _parse_override(item)
        layers.append((f"override {item!r}", nest_dotted({key: value})))
    merged = OmegaConf.structured(cls)
    for where, layer in layers:
        _check_keys(cls, layer, where)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad value in {where}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    except ValueError as exc:  # __post_init__ checks of the dataclasses
        raise ConfigError(str(exc)) from None


def to_yaml(cfg) -> str:
    """The fully resolved config as YAML (what every run writes to ``config.yaml``)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def from_dict(cls: type[T], values: dict, where: str = "saved config") -> T:
    """Build a config from a dict of its fields (nested dicts for sections; for example ``dataclasses.asdict``
    output read back from config.yaml), checked like a loaded one; ``where`` names the dict in errors."""
    _check_keys(cls, values, where)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad value in {where}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    except ValueError as exc:  # __post_init__ checks of the dataclasses
        raise ConfigError(str(exc)) from None
