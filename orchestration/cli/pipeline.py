"""``memtrain pipeline``: the whole system on a local Ray cluster, with a report at the end."""

from __future__ import annotations

from orchestration.cli.common import add_address_arg, add_config_args, flag_values

def _cmd_pipeline(args):
    from orchestration.config import load_config
    from orchestration.pipeline import PROFILES, PipelineConfig, run_pipeline

    profile = "quick" if args.quick else args.profile
    cfg = load_config(PipelineConfig, args.config, PROFILES[profile] + args.overrides,
                      **flag_values(args, {"output": "output"}))
    run_pipeline(cfg, profile=profile)


def register(sub):
    p = sub.add_parser("pipeline", help="the whole system on a local Ray cluster, with a report at the end")
    p.add_argument("--output", help="run directory (default runs/pipeline)")
    p.add_argument("--profile", choices=("quick", "default", "full"), default="default",
                   help="quick: a few steps of every stage, a smoke run that shows nothing (about 2 min); default: "
                        "every claim shown in about 10 min on 2 CPU cores; full: longer runs of every stage "
                        "(hmst-tiny, 8-task drifting streams; several hours on 2 cores)")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    add_address_arg(p)
    add_config_args(p, example="pretrain.lr=1e-3")
    p.set_defaults(func=_cmd_pipeline)
