"""``memtrain sweep FILE.yaml [key=value ...]``: a Ray Tune sweep over pretraining runs."""

from __future__ import annotations

from orchestration.cli.common import add_address_arg
from orchestration.errors import MemtrainError


def _cmd_sweep(args) -> None:
    from orchestration.config import load_config
    from orchestration.sweep import SweepConfig, planned_trials, sweep

    cfg = load_config(SweepConfig, args.file, args.overrides)
    rows = sweep(cfg)
    unfinished = [f"{r['trial_id']} {r['status']}" for r in rows if r["status"] not in ("completed", "stopped early")]
    if unfinished or len(rows) < planned_trials(cfg):
        raise MemtrainError(f"the sweep did not finish: {len(rows) - len(unfinished)} of {planned_trials(cfg)} "
                            f"trials finished ({', '.join(unfinished) or 'the rest never started'}); see the log "
                            "above, then run the same command again to resume it")


def register(subparsers) -> None:
    """Add ``memtrain sweep FILE.yaml [key=value ...]`` to the CLI's sub-commands."""
    p = subparsers.add_parser(
        "sweep", help="hyperparameter sweep with Ray Tune (ASHA, PBT) over pretraining runs; resumes when re-run",
        description="Run a Ray Tune sweep described by FILE.yaml (presets in configs/sweeps/). Re-running on the "
                    "same output directory resumes an interrupted sweep.")
    p.add_argument("file", metavar="FILE.yaml", help="sweep config (see configs/sweeps/)")
    add_address_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any sweep field, e.g. num_samples=8 pretrain.max_steps=400 output=runs/s2")
    p.set_defaults(func=_cmd_sweep)
