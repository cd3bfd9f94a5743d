"""``memtrain hmst ...``: the fact-recall corpus, critic and memory-encoder training, consolidation, and asking the
engine with chosen gates (``HMST_HELP``, the group's ``--help``, walks through a session from scratch)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from orchestration.errors import MemtrainError
from orchestration.cli.common import add_address_arg
from orchestration.progress import progress
from orchestration.storage import Location, local_copy, staged


def load_hmst(checkpoint: str):
    """The HMST model and tokenizer of a run or checkpoint; any other model is refused with the fix."""
    from orchestration.training.checkpoint import load_lm

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
    from orchestration.runtime import ensure_ray

    ensure_ray()
    # the memory's folder is on the actor's node, under that node's memory root
    return get_or_create_memory(args.memory_name, MemoryConfig(dim=dim, path=args.memory_name), namespace=args.namespace)


# --- commands ---------------------------------------------------------------------------------------------------

def _cmd_facts(args) -> None:
    from models.hmst.facts import FactConfig, FactWorld, write_corpus
    from orchestration.config import load_config
    from orchestration.data.sources import DataConfig, load_corpus

    cfg = load_config(FactConfig, args.config, args.overrides)
    natural = load_corpus(DataConfig(source=args.natural)).splits["train"]
    path = write_corpus(FactWorld(cfg), natural, args.output)
    print(f"[memtrain hmst] wrote {path} ({path.stat().st_size / 1e6:.1f} MB): pretrain on it with "
          f"`memtrain pretrain --model hmst-micro --data {path}`")


def _save_component(component, name: str, output: str, result: dict) -> Location:
    """A trained critic or encoder and its result written to ``output`` (a path or a URI), summary.json last."""
    from models.hmst.training import save_component

    out = Location(output)
    with staged(out) as folder:
        save_component(component, name, folder, {"result": result})
    (out / "summary.json").write_json(result)
    return out


def _cmd_train_critic(args) -> None:
    from models.hmst.facts import FactConfig, FactWorld
    from models.hmst.training import CriticTrainConfig, train_critic
    from orchestration.config import load_config

    cfg = load_config(CriticTrainConfig, args.config, args.overrides)
    model, tokenizer = load_hmst(args.checkpoint)
    world = FactWorld(FactConfig(seed=args.fact_seed))
    critic, result = train_critic(world, tokenizer, model.cfg.vocab_size, cfg)
    out = _save_component(critic, "critic", args.output, result)
    print(f"[memtrain hmst] critic AUROC on held-out corrupted answers {result['auroc']:.3f} "
          f"(untrained {result['auroc_before']:.3f}); saved to {out}")


def _cmd_train_memory(args) -> None:
    from models.hmst.training import MemoryTrainConfig, train_memory_encoder
    from orchestration.config import load_config
    from orchestration.data.sources import DataConfig, encode_documents, load_corpus

    cfg = load_config(MemoryTrainConfig, args.config, args.overrides)
    model, tokenizer = load_hmst(args.checkpoint)
    corpus = load_corpus(DataConfig(source=args.data))
    train = list(encode_documents(tokenizer, corpus.splits["train"], "tokenizing train"))
    held_out = list(encode_documents(tokenizer, corpus.splits["validation"], "tokenizing validation"))
    encoder, result = train_memory_encoder(model.tok_emb, train, held_out, cfg)
    out = _save_component(encoder, "ssm_encoder", args.output, result)
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

    model, tokenizer = load_hmst(args.checkpoint)
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

    session_file = Path(args.session)
    if not session_file.is_file():
        raise MemtrainError(f"no session file {args.session!r}; --session takes a UTF-8 text file with one statement "
                            "or question per line")
    lines = [line.strip() for line in session_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MemtrainError(f"{args.session} is empty; give one statement or question per line")
    model, tokenizer = load_hmst(args.checkpoint)
    engine = _engine(args, model, tokenizer, _memory(args, model.cfg.d_model))
    session = engine.session()
    # questions are asked (their turns get the answer's confidence), statements are told
    for line in progress(lines, desc="running the session", unit="line"):
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


HMST_HELP = """\
HMST: a sparse mixture-of-experts LM with an episodic memory (an SSM encoder over the session) and a semantic memory
(the shared FAISS memory). These commands make its fact-recall corpus, train its critic and episodic encoder, and
answer with chosen gates. A session from scratch:

    memtrain hmst facts --output runs/facts.jsonl
    memtrain pretrain --model hmst-micro --data runs/facts.jsonl data.vocab_size=2048 max_steps=700 --output runs/hf
    memtrain hmst train-critic --checkpoint runs/hf --output runs/hf/critic
    memtrain hmst train-memory --checkpoint runs/hf --output runs/hf/memory
    memtrain hmst ask --checkpoint runs/hf --memory-path runs/facts-mem --fill-facts --semantic "what is the color of Bavik?"
    memtrain hmst consolidate --checkpoint runs/hf --memory-path runs/facts-mem --session notes.txt"""


def register(subparsers) -> None:
    """Add ``memtrain hmst {facts,train-critic,train-memory,ask,consolidate}``."""
    hmst = subparsers.add_parser("hmst", help="HMST: fact-recall corpus, critic/memory training, engine, consolidation",
                                 description=HMST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = hmst.add_subparsers(dest="hmst_command", required=True, metavar="COMMAND")

    def config_args(p, config: str):
        p.add_argument("--config", help=f"YAML file of {config} fields")
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"override one {config} field")

    def memory_args(p):
        p.add_argument("--memory-name", dest="memory_name",
                       help="the shared semantic memory: name of its Ray actor (started if it does not run)")
        p.add_argument("--memory-path", dest="memory_path",
                       help="or an in-process semantic memory kept in this folder")
        p.add_argument("--namespace", default="memtrain", help="Ray namespace of the memory actor (default: memtrain)")
        add_address_arg(p)
        p.add_argument("--critic", help="folder written by `memtrain hmst train-critic` (default: no critic)")
        p.add_argument("--encoder", help="folder written by `memtrain hmst train-memory` (default: an untrained "
                                         "episodic encoder)")
        p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=6,
                       help="longest answer in tokens (default: 6)")

    def add(name: str, help: str, description: str):
        return sub.add_parser(name, help=help, description=description)

    p = add("facts", "write the fact-recall pretraining corpus (natural text + facts) as .jsonl",
            "Write the fact-recall corpus: natural text mixed with statements about a seeded world of made-up "
            "entities, one JSON object per line. Pretrain an HMST model on it (memtrain pretrain --model hmst-micro "
            "--data FILE.jsonl) and it learns to copy facts from its context.")
    p.add_argument("--output", required=True, help="file to write, ending in .jsonl")
    p.add_argument("--natural", default="builtin", help="natural text mixed in: builtin, wikitext2, ptb, agnews or a "
                                                       "local file/folder (default: builtin)")
    config_args(p, "FactConfig (seed, n_entities, ...)")
    p.set_defaults(func=_cmd_facts)

    p = add("train-critic", "train the critic on corrupted answers; report held-out AUROC",
            "Train the critic to tell a correct answer from a corrupted one (a wrong value of the same attribute) "
            "and print its AUROC before and after on entities training never shows.")
    p.add_argument("--checkpoint", required=True, help="pretrained HMST run or checkpoint (its tokenizer is used)")
    p.add_argument("--output", required=True, help="folder for the critic (a path or a URI)")
    p.add_argument("--fact-seed", dest="fact_seed", type=int, default=0,
                   help="seed of the fact world (the one the corpus was written with; default: 0)")
    config_args(p, "CriticTrainConfig")
    p.set_defaults(func=_cmd_train_critic)

    p = add("train-memory", "train the episodic SSM encoder contrastively on real text",
            "Train the episodic memory's SSM encoder (the LM's token embeddings stay frozen) so that two windows of "
            "one document find each other, and print its top-1 retrieval on held-out documents before and after.")
    p.add_argument("--checkpoint", required=True,
                   help="pretrained HMST run or checkpoint (its token embeddings and tokenizer are used)")
    p.add_argument("--output", required=True, help="folder for the encoder (a path or a URI)")
    p.add_argument("--data", default="builtin", help="text to train on: builtin, wikitext2, ptb, agnews or a local "
                                                     "file/folder (default: builtin)")
    config_args(p, "MemoryTrainConfig")
    p.set_defaults(func=_cmd_train_memory)

    p = add("ask", "answer one query with the engine and chosen gates; prints decisions and cost",
            "Answer one query with the HMST engine and the gates you switch on, and print the answer, the "
            "decisions, the FLOPs and wall time, the confidence and what was retrieved, as JSON.")
    p.add_argument("query", help="the question, e.g. \"what is the color of Bavik?\"")
    p.add_argument("--checkpoint", required=True, help="pretrained HMST run or checkpoint")
    for gate, what in (("early-exit", "decode with the early-exit head (the first blocks only)"),
                       ("episodic", "retrieve from the session's episodic memory"),
                       ("semantic", "retrieve from the semantic memory (needs --memory-name or --memory-path)"),
                       ("verify", "score the answer with the critic and re-answer with retrieval when it scores low")):
        p.add_argument(f"--{gate}", dest=gate.replace("-", "_"), action="store_true", help=what)
    p.add_argument("--expert", type=int, default=0, help="0 = no expert bias, e = bias expert e-1")
    p.add_argument("--fill-facts", dest="fill_facts", action="store_true",
                   help="fill an empty semantic memory with the fact world's semantic-placement facts")
    p.add_argument("--fact-seed", dest="fact_seed", type=int, default=0,
                   help="seed of the fact world --fill-facts uses (default: 0)")
    memory_args(p)
    p.set_defaults(func=_cmd_ask)

    p = add("consolidate", "run a session file, then move important episodic entries to semantic memory",
            "Play a session (statements are told, questions are asked), then move the episodic entries whose "
            "importance reaches --threshold into the semantic memory, and print what moved.")
    p.add_argument("--checkpoint", required=True, help="pretrained HMST run or checkpoint")
    p.add_argument("--session", required=True,
                   help="text file: one statement (told) or question (ending in ?, asked) per line")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="minimum importance to move (told statements have 1.0; default: 0.9)")
    memory_args(p)
    p.set_defaults(func=_cmd_consolidate)
