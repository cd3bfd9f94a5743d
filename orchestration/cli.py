"""memtrain: train memory-augmented LMs on Ray (also run as ``python -m orchestration.cli``).

Every command takes ``--config FILE.yaml`` and ``key=value`` overrides of any config field, e.g.::

    memtrain pretrain --model tgsmn-dense-tiny --data builtin --workers 2 --max-steps 200 --output runs/x lr=1e-3
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from memory_service import MemoryServiceError
from models.common.errors import ModelError
from orchestration.allocator import keep_freed_memory
from orchestration.errors import MemtrainError
from orchestration.ray_utils import add_address_arg

log = logging.getLogger("memtrain")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/); flags and key=value overrides win over it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field, e.g. lr=1e-3")


def _flags(args: argparse.Namespace, mapping: dict[str, str]) -> dict:
    """Config values given as dedicated flags (only those the user set), keyed by config path."""
    out: dict = {}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        cursor = out
        *parents, last = key.split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[last] = value
    return out


# --- pretrain -----------------------------------------------------------------------------------------------------

PRETRAIN_FLAGS = {"model": "model", "data": "data.source", "workers": "workers", "output": "output",
                  "max_steps": "max_steps", "max_tokens": "max_tokens", "precision": "precision", "seed": "seed"}


def _cmd_pretrain(args):
    from orchestration.config import load_config
    from orchestration.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides, **_flags(args, PRETRAIN_FLAGS))
    pretrain(cfg)


def _register_pretrain(sub):
    p = sub.add_parser("pretrain", help="pretrain a model on Ray Train (DDP workers, checkpoints, resume)",
                       description="Pretrain any registry model with Ray Train. Re-running with the same --output "
                                   "resumes from its newest checkpoint.")
    p.add_argument("--model", help="registry preset (memtrain models lists them)")
    p.add_argument("--data", help="builtin, wikitext2, ptb, agnews, or a local file/folder")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--output", help="run directory")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="token budget (0 = none)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int)
    add_address_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_pretrain)


# --- generate -----------------------------------------------------------------------------------------------------

def _cmd_generate(args):
    import torch

    from models.common.sampling import SamplingConfig, generate
    from models.io import CONFIG_FILE
    from orchestration.checkpoint import load_lm

    model, tok, ckpt = load_lm(args.checkpoint)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise MemtrainError("the prompt is empty; pass some text with --prompt")
    max_len = getattr(model.cfg, "max_seq_len", None)
    if max_len and len(prompt_ids) + sampling.max_new_tokens > max_len:
        raise MemtrainError(f"prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {sampling.max_new_tokens} "
                            f"exceeds the model's max_seq_len {max_len}; shorten one of them")
    new_ids = generate(model, torch.tensor([prompt_ids]), sampling)[0].tolist()
    print(f"# {(ckpt / CONFIG_FILE).read_json()['name']} from {ckpt}", file=sys.stderr)
    print(args.prompt + tok.decode(new_ids))


def _register_generate(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache; greedy/temperature/top-k/top-p)")
    p.add_argument("--checkpoint", required=True,
                   help="run folder (its newest checkpoint) or checkpoint folder: a path or a URI (s3://...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)


# --- models -------------------------------------------------------------------------------------------------------

def _cmd_models(args):
    from models.registry import list_models, param_counts

    print(f"{'model':<24}{'parameters':>16}{'active/token':>16}  (at vocab_size={args.vocab_size})")
    for name in list_models():
        counts = param_counts(name, vocab_size=args.vocab_size)
        print(f"{name:<24}{counts['total']:>16,}{counts['active']:>16,}")


def _register_models(sub):
    p = sub.add_parser("models", help="list model presets with their parameter counts")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=4096)
    p.set_defaults(func=_cmd_models)


# --- pipeline -----------------------------------------------------------------------------------------------------

def _cmd_pipeline(args):
    from orchestration.config import load_config
    from orchestration.pipeline import PROFILES, PipelineConfig, run_pipeline

    profile = "quick" if args.quick else args.profile
    cfg = load_config(PipelineConfig, args.config, PROFILES[profile] + args.overrides,
                      **_flags(args, {"output": "output"}))
    run_pipeline(cfg, profile=profile)


def _register_pipeline(sub):
    p = sub.add_parser("pipeline", help="the whole system on a local Ray cluster, with a report at the end")
    p.add_argument("--output", help="run directory (default runs/pipeline)")
    p.add_argument("--profile", choices=("quick", "default", "full"), default="default",
                   help="quick: a few steps of every stage, a smoke run that shows nothing (about 2 min); default: "
                        "every claim shown in about 10 min on 2 CPU cores; full: longer runs of every stage "
                        "(hmst-tiny, 8-task drifting streams; several hours on 2 cores)")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    add_address_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from memory_service.cli import register as _register_memory
    from orchestration.cluster import register as _register_cluster
    from orchestration.continual import register as _register_continual
    from orchestration.hmst_cli import register as _register_hmst
    from orchestration.report_cli import register as _register_report
    from orchestration.sweep import register as _register_sweep
    from rl.cli import register as _register_rl

    for register in (_register_pipeline, _register_pretrain, _register_sweep, _register_continual, _register_generate,
                     _register_models, _register_memory, _register_hmst, _register_rl, _register_report,
                     _register_cluster):
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
    except (MemtrainError, ModelError, MemoryServiceError) as exc:
        print(f"memtrain: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
