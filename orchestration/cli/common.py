"""Arguments every memtrain command shares: ``--config FILE.yaml``, ``key=value`` overrides and ``--address``."""

from __future__ import annotations

import argparse

from orchestration.config import nest_dotted


def add_config_args(p: argparse.ArgumentParser, example: str = "lr=1e-3", configs: str = "configs/") -> None:
    """``--config FILE.yaml`` and the positional ``key=value`` overrides (they win over the file and the flags)."""
    p.add_argument("--config", help=f"YAML config file (presets in {configs}); flags and key=value overrides win "
                                    "over it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"override any config field, e.g. {example}")


def add_address_arg(p: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster a command joins (``main`` puts it into RAY_ADDRESS)."""
    p.add_argument("--address", help="Ray cluster to join: HOST:PORT of its head (GCS), or auto for the one "
                                     "`ray start` runs on this machine; default RAY_ADDRESS, else a new local "
                                     "cluster")


def flag_values(args: argparse.Namespace, mapping: dict[str, str]) -> dict:
    """Config values given as dedicated flags (only those the user set), nested by their dotted config path.

    >>> flag_values(argparse.Namespace(data="builtin", seed=None), {"data": "data.source", "seed": "seed"})
    {'data': {'source': 'builtin'}}
    """
    return nest_dotted({key: getattr(args, attr) for attr, key in mapping.items()
                        if getattr(args, attr, None) is not None})
