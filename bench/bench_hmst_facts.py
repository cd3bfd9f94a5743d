"""Fact recall with the HMST engine: does semantic retrieval let a small pretrained model answer facts it never saw?

Stages (each skipped when its output already exists in --run, so a re-run only re-evaluates):

1. write the mixed corpus (builtin natural text + pretraining-placement facts + context-copy examples);
2. pretrain an HMST model on it through ``orchestration.training.pretrain.pretrain`` (Ray Train, 2 workers);
3. train the critic on corrupted answers (held-out AUROC);
4. fill a semantic memory (LocalMemory) with the semantic-placement facts, then ask every semantic-placement
   question with semantic retrieval off and on (exact match), and time ``answer()`` per path.

Examples::

    python bench/bench_hmst_facts.py --run runs/bench-hmst-facts
    # the pipeline's recipe: one fact per context line, copying learnt after ~500 steps
    python bench/bench_hmst_facts.py --run runs/facts-d0 --model hmst-micro --steps 800 --vocab 1024 \
        --distractors 0 --natural-fraction 0.05
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_corpus(run: Path, seed: int, distractors: int, natural_fraction: float) -> Path:
    from models.hmst.facts import FactConfig, FactWorld, write_corpus
    from orchestration.data.sources import DataConfig, load_corpus

    path = run / "facts_corpus.jsonl"
    if not path.is_file():
        natural = load_corpus(DataConfig(source="builtin")).splits["train"]
        world = FactWorld(FactConfig(seed=seed, distractors=distractors, natural_fraction=natural_fraction))
        write_corpus(world, natural, path)
    return path


def pretrain_model(run: Path, corpus: Path, args) -> Path:
    from orchestration.config import load_config
    from orchestration.training.pretrain import PretrainConfig, pretrain

    out = run / "pretrain"
    summary = out / "summary.json"
    if summary.is_file() and (json.loads(summary.read_text()).get("step") or 0) >= args.steps:
        return out
    cfg = load_config(PretrainConfig, overrides=[
        f"model={args.model}", f"data.source={corpus}", f"data.vocab_size={args.vocab}", "data.seq_len=128",
        f"max_steps={args.steps}", "workers=2", "batch_size=8", "lr=3e-3", "warmup_steps=30", "eval_every=200",
        "checkpoint_every=200", "log_every=50", f"precision={args.precision}", f"output={out}", f"seed={args.seed}"])
    pretrain(cfg)
    return out


def train_or_load_critic(run: Path, pretrain_dir: Path, seed: int):
    from models.hmst.facts import FactConfig, FactWorld
    from models.hmst.training import load_critic, save_component, train_critic
    from orchestration.training.checkpoint import load_lm

    out = run / "critic"
    if (out / "critic.json").is_file():
        return load_critic(out), json.loads((out / "critic.json").read_text())["result"]
    _, tokenizer, _ = load_lm(pretrain_dir)
    critic, result = train_critic(FactWorld(FactConfig(seed=seed)), tokenizer, tokenizer.vocab_size, log=None)
    save_component(critic, "critic", out, {"result": result})
    return critic, result


def evaluate(pretrain_dir: Path, critic, seed: int, n_questions: int) -> dict:
    from memory_service import LocalMemory, MemoryConfig
    from models.hmst.engine import Decisions, HMSTEngine
    from models.hmst.facts import FactConfig, FactWorld, exact_match
    from orchestration.training.checkpoint import load_lm

    model, tokenizer, _ = load_lm(pretrain_dir)
    world = FactWorld(FactConfig(seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        memory = LocalMemory(MemoryConfig(dim=model.cfg.d_model, path=tmp))
        engine = HMSTEngine(model, tokenizer, semantic_memory=memory, critic=critic)
        facts = world.by_placement("semantic")
        engine.fill_semantic([f.statement() for f in facts])
        paths = {"semantic off": Decisions(), "semantic on": Decisions(semantic=True),
                 "semantic on + early exit": Decisions(semantic=True, early_exit=True),
                 "semantic on + verify": Decisions(semantic=True, verify=True)}
        rows = {}
        for name, decisions in paths.items():
            hits, recalls, times, flops = 0, 0, [], []
            for fact in facts[:n_questions]:
                result = engine.session().ask(fact.question(), decisions)
                hits += exact_match(result.response, fact.value)
                recalls += fact.statement() in result.retrieved
                times.append(result.wall_s)
                flops.append(result.flops)
            n = min(n_questions, len(facts))
            rows[name] = {"exact_match": hits / n, "retrieval_recall": recalls / n,
                          "latency_ms_median": 1000 * statistics.median(times), "mflops_mean": statistics.mean(flops) / 1e6}
        memory.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/bench-hmst-facts", help="work directory (stages are cached here)")
    parser.add_argument("--model", default="hmst-tiny", help="registry preset to pretrain")
    parser.add_argument("--steps", type=int, default=1600,
                        help="pretraining steps of 2 x 8 sequences (copying from context appears after ~1,100-1,400)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="pretraining precision")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--questions", type=int, default=96, help="semantic-placement questions asked per path")
    parser.add_argument("--distractors", type=int, default=2,
                        help="most other-attribute facts beside the asked one in a copy example's context (0: one fact "
                             "per context line, what semantic_k=1 retrieval gives; copying is then learnt after ~500 "
                             "steps instead of 1,300-2,000)")
    parser.add_argument("--natural-fraction", type=float, default=0.2, help="share of the builtin natural text kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=("all", "pretrain"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    corpus = build_corpus(run, args.seed, args.distractors, args.natural_fraction)
    pretrain_dir = pretrain_model(run, corpus, args)
    print(f"pretrained model in {pretrain_dir} ({time.time() - t0:.0f} s)")
    if args.stage == "pretrain":
        return
    critic, critic_result = train_or_load_critic(run, pretrain_dir, args.seed)
    print(f"critic AUROC on held-out corrupted answers: {critic_result['auroc']:.3f} "
          f"(untrained {critic_result['auroc_before']:.3f})")
    rows = evaluate(pretrain_dir, critic, args.seed, args.questions)
    print("| path | exact match | retrieval recall | answer() latency median (ms) | MFLOPs/query |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['exact_match']:.3f} | {row['retrieval_recall']:.2f} | "
              f"{row['latency_ms_median']:.1f} | {row['mflops_mean']:.2f} |")
    (run / "results.json").write_text(json.dumps({"critic": critic_result, "paths": rows}, indent=2))


if __name__ == "__main__":
    main()
