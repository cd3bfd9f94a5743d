"""``memtrain pretrain``, ``memtrain generate`` and ``memtrain models``: train a model, sample from it, list presets."""

from __future__ import annotations

import sys

from orchestration.cli.common import add_address_arg, add_config_args, flag_values
from orchestration.errors import MemtrainError

PRETRAIN_FLAGS = {"model": "model", "data": "data.source", "workers": "workers", "output": "output",
                  "max_steps": "max_steps", "max_tokens": "max_tokens", "precision": "precision", "seed": "seed"}


def _cmd_pretrain(args):
    from orchestration.config import load_config
    from orchestration.training.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides, **flag_values(args, PRETRAIN_FLAGS))
    pretrain(cfg)


def register_pretrain(sub):
    p = sub.add_parser("pretrain", help="pretrain a model on Ray Train (DDP workers, checkpoints, resume)",
                       description="Pretrain any registry model with Ray Train. Re-running with the same --output "
                                   "resumes from its newest checkpoint.")
    p.add_argument("--model", help="registry preset (memtrain models lists them)")
    p.add_argument("--data", help="builtin, wikitext2, ptb, agnews, or a local file/folder")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--output", help="run directory")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="token budget (0 = none)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="training precision (bf16: mixed, on hardware "
                                                                 "that has it)")
    p.add_argument("--seed", type=int, help="seed of the model's initialisation and the data order")
    add_address_arg(p)
    add_config_args(p)
    p.set_defaults(func=_cmd_pretrain)


# --- generate -----------------------------------------------------------------------------------------------------

def _cmd_generate(args):
    import torch

    from models.common.sampling import SamplingConfig, generate
    from models.io import CONFIG_FILE
    from orchestration.training.checkpoint import load_lm

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


def register_generate(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache; greedy/temperature/top-k/top-p)",
                       description="Continue a prompt with a trained model and print the prompt and the continuation "
                                   "(which checkpoint was used goes to stderr). Example: memtrain generate "
                                   "--checkpoint runs/x --prompt 'The' --temperature 0")
    p.add_argument("--checkpoint", required=True,
                   help="run folder (its newest checkpoint) or checkpoint folder: a path or a URI (s3://...)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64,
                   help="tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", dest="top_k", type=int, default=0,
                   help="sample among the k most likely tokens only, 0 = all (default: 0)")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0,
                   help="sample among the most likely tokens that make up this probability, 1 = all (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a fresh one each run)")
    p.set_defaults(func=_cmd_generate)


# --- models -------------------------------------------------------------------------------------------------------

def _cmd_models(args):
    from models.registry import list_models, param_counts

    print(f"{'model':<24}{'parameters':>16}{'active/token':>16}  (at vocab_size={args.vocab_size})")
    for name in list_models():
        counts = param_counts(name, vocab_size=args.vocab_size)
        print(f"{name:<24}{counts['total']:>16,}{counts['active']:>16,}")


def register_models(sub):
    p = sub.add_parser("models", help="list model presets with their parameter counts",
                       description="List the model presets --model takes, with their total parameters and the "
                                   "parameters active per token (sparse models use a few experts per token).")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=4096,
                   help="vocabulary size the counts assume (the embeddings depend on it; default: 4096)")
    p.set_defaults(func=_cmd_models)
