"""``memtrain continual`` and ``memtrain continual-grid``: continual-learning runs and grids of them.

A controller named by a path (``--controller runs/rl-thermo``) is a learned thermo policy: these commands pass
``rl.envs.thermo.learned_controller_resolver`` down to the runner and to every Ray task of a grid.
"""

from __future__ import annotations

import argparse

from orchestration.cli.common import add_address_arg, add_config_args, flag_values
from orchestration.config import load_config
from orchestration.continual.runner import ContinualConfig

CLI_FLAGS = {"model": "model", "benchmark": "stream.benchmark", "controller": "controller", "tasks": "stream.n_tasks",
             "max_steps_per_task": "max_steps_per_task", "seed": "seed", "output": "output"}


def config_from_args(args: argparse.Namespace) -> ContinualConfig:
    """The run's config: defaults, then --config, then the dedicated flags, then key=value overrides.

    ``--data`` sets data.source for the permuted benchmark and stream.domains (comma-separated) for multidomain.
    """
    flags = flag_values(args, CLI_FLAGS)
    cfg = load_config(ContinualConfig, args.config, args.overrides, **flags)
    if args.data is None:
        return cfg
    if cfg.stream.benchmark == "multidomain":
        flags.setdefault("stream", {})["domains"] = [d.strip() for d in args.data.split(",") if d.strip()]
    else:
        flags.setdefault("data", {})["source"] = args.data
    return load_config(ContinualConfig, args.config, args.overrides, **flags)


def _cmd_continual(args: argparse.Namespace) -> None:
    from orchestration.continual.runner import run_continual
    from rl.envs.thermo import learned_controller_resolver

    run_continual(config_from_args(args), learned=learned_controller_resolver)


def _cmd_grid(args: argparse.Namespace) -> None:
    from orchestration.continual.grid import GridConfig, run_grid
    from rl.envs.thermo import learned_controller_resolver

    run_grid(load_config(GridConfig, args.file, args.overrides), learned=learned_controller_resolver)


def register(subparsers) -> None:
    """Add the ``continual`` and ``continual-grid`` commands to the memtrain command line."""
    p = subparsers.add_parser(
        "continual", help="continual learning on a task stream (replay, EWC, routing knobs steered by a controller)",
        description="Train a model through a stream of tasks and report the task x task evaluation matrix, "
                    "forgetting, backward and forward transfer. Re-running with the same --output resumes.")
    p.add_argument("--model", help="registry preset, e.g. tgsmn-sparse-tiny or tgsmn-dense-tiny")
    p.add_argument("--benchmark", help="permuted or multidomain")
    p.add_argument("--data", help="permuted: one corpus (builtin, wikitext2, ptb, agnews or a path); multidomain: "
                                  "comma-separated corpora")
    p.add_argument("--controller", help="fixed, a fixed preset (fixed-noreplay, fixed-replay30, fixed-k1, ...) "
                                        "or a learned policy")
    p.add_argument("--tasks", type=int, help="number of tasks")
    p.add_argument("--max-steps-per-task", dest="max_steps_per_task", type=int, help="training steps per task")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="run directory")
    add_address_arg(p)
    add_config_args(p, example="ewc_lambda=100", configs="configs/continual/")
    p.set_defaults(func=_cmd_continual)

    g = subparsers.add_parser(
        "continual-grid", help="a grid of continual runs (variants x controllers x benchmarks x seeds) as Ray tasks",
        description="Run every combination in parallel as Ray tasks, skip runs that already have a summary, and "
                    "write one results table (results.csv, results.md) under the grid's output.")
    g.add_argument("file", help="grid YAML (see configs/continual/grid-permuted.yaml)")
    add_address_arg(g)
    g.add_argument("overrides", nargs="*", metavar="key=value", help="override grid fields, e.g. seeds=[0,1]")
    g.set_defaults(func=_cmd_grid)
