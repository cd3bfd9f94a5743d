"""``memtrain hmst ...``: the fact-recall corpus, critic and memory-encoder training, consolidation, and asking the
engine with chosen gates.

Example::

    memtrain hmst facts --output runs/facts.jsonl
    memtrain pretrain --model hmst-micro --data runs/facts.jsonl data.vocab_size=2048 max_steps=700 --output runs/hf
    memtrain hmst train-critic --checkpoint runs/hf --output runs/hf/critic
    memtrain hmst train-memory --checkpoint runs/hf --output runs/hf/memory
    memtrain hmst ask --checkpoint runs/hf --memory-path runs/facts-mem --fill-facts --semantic "what is the color of Bavik?"
    memtrain hmst consolidate --checkpoint runs/hf --memory-path runs/facts-mem --session notes.txt
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestration.errors import MemtrainError
from orchestration.ray_utils import add_address_arg
from orchestration.storage import Location, local_copy, staged


def _load_lm(checkpoint: str):
    from orchestration.checkpoint import load_lm

    model, tokenizer, ckpt = load_lm(checkpoint)
    if not hasattr(model, "set_expert_bias"):
        raise MemtrainError(f"{ckpt} holds a {type(model).__name__}, not an HMST model; pretrain one with "
                            "--model hmst-micro (or another hmst-* preset)")
    return model, tokenizer


def _memory(args, dim: int):
    """The semantic memory named by --memory-name (shared Ray actor) or --memory-path (in-process)."""
    from memory_service import LocalMemory, MemoryConfig, get_or_create_memory

    if bool(args.memory_name) == bool(args.memory_path):
        raise MemtrainError("give exactly one of --memory-name NAME (the shared Ray actor) or --memory-path DIR "
                            "(an in-process memory stored in DIR)")
    if args.memory_path:
        return LocalMemory(MemoryConfig(dim=dim, path=args.memory_path))
    from orchestration.ray_utils import ensure_ray

    ensure_ray()
    # the memory's folder is on the actor's node, under that node's memory root
    return get_or_create_memory(args.memory_name, MemoryConfig(dim=dim, path=args.memory_name), namespace=args.namespace)


# --- commands ---------------------------------------------------------------------------------------------------

def _cmd_facts(args) -> None:
    from models.hmst.facts import FactConfig, FactWorld, write_corpus
    from orchestration.config import load_config
    from orchestration.data import DataConfig, load_corpus

    cfg = load_config(FactConfig, args.config, args.overrides)
    natural = load_corpus(DataConfig(source=args.natural)).splits["train"]
    path = write_corpus(FactWorld(cfg), natural, args.output)
    print(f"[memtrain hmst] wrote {path} ({path.stat().st_size / 1e6:.1f} MB): pretrain on it with "
          f"`memtrain pretrain --model hmst-micro --data {path}`")


def _cmd_train_critic(args) -> None:
    from models.hmst.facts import FactConfig, FactWorld
    from models.hmst.training import CriticTrainConfig, save_component, train_critic
    from orchestration.config import load_config

    cfg = load_config(CriticTrainConfig, args.config, args.overrides)
    model, tokenizer = _load_lm(args.checkpoint)
    world = FactWorld(FactConfig(seed=args.fact_seed))
    critic, result = train_critic(world, tokenizer, model.cfg.vocab_size, cfg)
    out = Location(args.output)
    with staged(out) as folder:
        save_component(critic, "critic", folder, {"result": result})
    (out / "summary.json").write_json(result)
    print(f"[memtrain hmst] critic AUROC on held-out corrupted answers {result['auroc']:.3f} "
          f"(untrained {result['auroc_before']:.3f}); saved to {out}")


def _cmd_train_memory(args) -> None:
    from models.hmst.training import MemoryTrainConfig, save_component, train_memory_encoder
    from orchestration.config import load_config
    from orchestration.data import DataConfig, load_corpus

    cfg = load_config(MemoryTrainConfig, args.config, args.overrides)
    model, tokenizer = _load_lm(args.checkpoint)
    corpus = load_corpus(DataConfig(source=args.data))
    train = tokenizer.encode_batch(corpus.splits["train"])
    held_out = tokenizer.encode_batch(corpus.splits["validation"])
    encoder, result = train_memory_encoder(model.tok_emb, train, held_out, cfg)
    out = Location(args.output)
    with staged(out) as folder:
        save_component(encoder, "ssm_encoder", folder, {"result": result})
    (out / "summary.json").write_json(result)
    print(f"[memtrain hmst] episodic encoder top-1 retrieval on held-out spans {result['top1_before']:.3f} -> "
          f"{result['top1_after']:.3f}; saved to {out}")


def _component(loader, where: str):
    """A component saved by train-critic or train-memory, from a folder that may be a URI."""
    with local_copy(Location(where), verify=False) as path:
        return loader(path)


def _engine(args, model, tokenizer, memory):
    from models.hmst.engine import EngineConfig, HMSTEngine
    from models.hmst.training import load_critic, load_ssm_encoder

    return HMSTEngine(model, tokenizer, semantic_memory=memory,
                      critic=_component(load_critic, args.critic) if args.critic else None,
                      episodic_encoder=_component(load_ssm_encoder, args.encoder) if args.encoder else None,
                      config=EngineConfig(max_new_tokens=args.max_new_tokens))


def _cmd_ask(args) -> None:
    from models.hmst.engine import Decisions
    from models.hmst.facts import FactConfig, FactWorld

    model, tokenizer = _load_lm(args.checkpoint)
    memory = _memory(args, model.cfg.d_model) if (args.memory_name or args.memory_path) else None
    engine = _engine(args, model, tokenizer, memory)
    if args.fill_facts and engine.semantic_count() == 0:
        facts = FactWorld(FactConfig(seed=args.fact_seed)).by_placement("semantic")
        engine.fill_semantic([f.statement() for f in facts], [{"source": "facts", "entity": f.entity} for f in facts])
    decisions = Decisions(args.early_exit, args.episodic, args.semantic, args.expert, args.verify)
    result = engine.answer(args.query, decisions)
    print(json.dumps({"response": result.response, "decisions": decisions.__dict__, "flops": result.flops,
                      "wall_s": round(result.wall_s, 4), "confidence": round(result.confidence, 4),
                      "verified": result.verified, "fallback": result.fallback, "retrieved": result.retrieved},
                     indent=2))


def _cmd_consolidate(args) -> None:
    from models.hmst.engine import Decisions, consolidate

    model, tokenizer = _load_lm(args.checkpoint)
    engine = _engine(args, model, tokenizer, _memory(args, model.cfg.d_model))
    session = engine.session()
    lines = [line.strip() for line in Path(args.session).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MemtrainError(f"{args.session} is empty; give one statement or question per line")
    for line in lines:  # questions are asked (their turns get the answer's confidence), statements are told
        if line.endswith("?"):
            session.ask(line, Decisions(episodic=True, semantic=True, verify=engine.critic is not None))
        else:
            session.tell(line)
    ids = consolidate(session.episodic, engine.semantic_memory, engine.embedder, args.threshold,
                      {"session_file": os.path.abspath(args.session)})
    moved = engine.semantic_memory.get(ids) if ids else []
    for (text, meta), new_id in zip(moved, ids):
        print(f"[memtrain hmst] semantic id {new_id}: {text!r} {json.dumps(meta)}")
    print(f"[memtrain hmst] consolidated {len(ids)} of {len(lines)} session entries "
          f"(importance >= {args.threshold}); semantic memory now holds {engine.semantic_count()}")


def register(subparsers) -> None:
    """Add ``memtrain hmst {facts,train-critic,train-memory,ask,consolidate}``."""
    hmst = subparsers.add_parser("hmst", help="HMST: fact-recall corpus, critic/memory training, engine, consolidation")
    sub = hmst.add_subparsers(dest="hmst_command", required=True, metavar="COMMAND")

    def config_args(p):
        p.add_argument("--config", help="YAML config of the command's dataclass")
        p.add_argument("overrides", nargs="*", metavar="key=value")

    def memory_args(p):
        p.add_argument("--memory-name", dest="memory_name", help="shared semantic memory actor (Ray)")
        p.add_argument("--memory-path", dest="memory_path", help="in-process semantic memory stored in this directory")
        p.add_argument("--namespace", default="memtrain", help="Ray namespace of the memory actor")
        add_address_arg(p)
        p.add_argument("--critic", help="directory written by `memtrain hmst train-critic`")
        p.add_argument("--encoder", help="directory written by `memtrain hmst train-memory`")
        p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=6)

    p = sub.add_parser("facts", help="write the fact-recall pretraining corpus (natural text + facts) as .jsonl")
    p.add_argument("--output", required=True, help="path ending in .jsonl")
    p.add_argument("--natural", default="builtin", help="natural-text source mixed in (any --data value)")
    config_args(p)
    p.set_defaults(func=_cmd_facts)

    p = sub.add_parser("train-critic", help="train the critic on corrupted answers; report held-out AUROC")
    p.add_argument("--checkpoint", required=True, help="pretrained HMST run (its tokenizer is used)")
    p.add_argument("--output", required=True)
    p.add_argument("--fact-seed", dest="fact_seed", type=int, default=0)
    config_args(p)
    p.set_defaults(func=_cmd_train_critic)

    p = sub.add_parser("train-memory", help="stage 2: train the episodic SSM encoder contrastively on real text")
    p.add_argument("--checkpoint", required=True, help="pretrained HMST run (its embeddings and tokenizer are used)")
    p.add_argument("--output", required=True)
    p.add_argument("--data", default="builtin", help="text to train on (any --data value)")
    config_args(p)
    p.set_defaults(func=_cmd_train_memory)

    p = sub.add_parser("ask", help="answer one query with the engine and chosen gates; prints decisions and cost")
    p.add_argument("query")
    p.add_argument("--checkpoint", required=True)
    for gate in ("early-exit", "episodic", "semantic", "verify"):
        p.add_argument(f"--{gate}", dest=gate.replace("-", "_"), action="store_true")
    p.add_argument("--expert", type=int, default=0, help="0 = no expert bias, e = bias expert e-1")
    p.add_argument("--fill-facts", dest="fill_facts", action="store_true",
                   help="fill an empty semantic memory with the fact world's semantic-placement facts")
    p.add_argument("--fact-seed", dest="fact_seed", type=int, default=0)
    memory_args(p)
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("consolidate", help="run a session file, then move important episodic entries to semantic memory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--session", required=True, help="text file: one statement (told) or question (asked) per line")
    p.add_argument("--threshold", type=float, default=0.9, help="minimum importance (told statements have 1.0)")
    memory_args(p)
    p.set_defaults(func=_cmd_consolidate)
