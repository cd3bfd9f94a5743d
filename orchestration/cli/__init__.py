"""The ``memtrain`` command line (also ``python -m orchestration.cli``): one module per command group, each with a
``register(subparsers)``; ``main`` parses, runs the command and turns memtrain's errors into one line on stderr."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from memory_service import MemoryServiceError
from models.common.errors import ModelError
from orchestration.allocator import keep_freed_memory
from orchestration.cli import cluster, continual, hmst, memory, pipeline, report, rl, sweep, train
from orchestration.errors import MemtrainError

# What the user sees when one of these reaches the top: one line on stderr and exit status 1 (a refused input or a
# failed run, named with its fix). Usage errors (an unknown flag, a missing argument) are argparse's: status 2. The
# errors of orchestration and rl (RLError) are MemtrainErrors; models and memory_service have their own.
RUNTIME_ERRORS = (MemtrainError, ModelError, MemoryServiceError)

DESCRIPTION = """\
Train memory-augmented language models (HMST, THL, TG-SMN) on a Ray cluster: pretraining, sweeps, continual
learning, the shared semantic memory, RL controllers, and the whole pipeline with a report.

Start with `memtrain pipeline` (everything on a local Ray cluster, about 10 minutes), or `memtrain COMMAND --help`.
Most commands take --config FILE.yaml (presets in configs/) and key=value overrides of any config field, e.g.

    memtrain pretrain --model tgsmn-dense-tiny --data builtin --workers 2 --max-steps 200 --output runs/x lr=1e-3

Exit status: 0 done, 1 the command was refused or failed (the reason is on stderr), 2 wrong usage."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtrain", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (pipeline.register, train.register_pretrain, sweep.register, continual.register,
                     train.register_generate, train.register_models, memory.register, hmst.register, rl.register,
                     report.register, cluster.register):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option after a positional (memtrain rl train thermo
    # --iterations 5 lr=...), so key=value words left over are overrides too
    if extra:
        if not hasattr(args, "overrides") or any("=" not in word or word.startswith("-") for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    keep_freed_memory()  # commands that train in this process (critic, memory encoder, continual) reuse memory
    try:
        args.func(args)
    except RUNTIME_ERRORS as exc:
        print(f"memtrain: error: {error_line(exc)}", file=sys.stderr)
        return 1
    return 0


def error_line(exc: BaseException) -> str:
    """An error as one line: a Ray task's error by its cause (its own text is the remote traceback), the lines of
    a multi-line message joined with '; '.

    >>> error_line(ValueError("bad value\\n    full_key: lr\\n"))
    'bad value; full_key: lr'
    """
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the task's exception here
    if isinstance(cause, BaseException):
        exc = cause
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
