"""Typed configs from dataclasses, YAML files and ``key=value`` overrides (through OmegaConf).

The dataclasses are the single source of truth; YAML presets and command-line overrides are merged on top, and
unknown keys are refused with the list of valid ones.

Example::

    >>> from orchestration.pretrain import PretrainConfig
    >>> cfg = load_config(PretrainConfig, overrides=["max_steps=50", "data.seq_len=64"])
    >>> cfg.max_steps, cfg.data.seq_len
    (50, 64)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestration.errors import ConfigError

T = TypeVar("T")


def _section(f: dataclasses.Field):
    """The dataclass of a nested config section (declared with ``field(default_factory=Section)``), else None."""
    sub = f.default_factory
    return sub if isinstance(sub, type) and dataclasses.is_dataclass(sub) else None


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


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example max_steps=100)")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else ""


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                **values) -> T:
    """Build ``cls`` from its defaults, then a YAML file, then ``values`` (already-parsed flags), then overrides."""
    layers: list[tuple[str, dict]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file (see configs/ for presets)")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
        layers.append((str(p), loaded))
    if values:
        layers.append(("command-line flags", values))
    for item in overrides or []:
        key, value = _parse_override(item)
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        layers.append((f"override {item!r}", nested))
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


def from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a config from ``dataclasses.asdict`` output (for example one read back from config.yaml)."""
    _check_keys(cls, values, "saved config")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
