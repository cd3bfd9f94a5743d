"""Fact recall with the HMST engine: does semantic retrieval let a small pretrained model answer facts it never saw?

Stages (each skipped when its output already exists in --run, so a re-run only re-evaluates):

1. write the mixed corpus (builtin natural text + pretraining-placement facts + context-copy examples);
2. pretrain an HMST model on it through ``orchestration.pretrain.pretrain`` (Ray Train, 2 workers);
3. train the critic on corrupted answers (held-out AUROC);
4. fill a semantic memory (LocalMemory) with the semantic-placement facts, then ask every semantic-placement
   question with semantic retrieval off and on (exact match), and time ``answer()`` per path.

Example::

    python bench/bench_hmst_facts.py --run runs/bench-hmst-facts --steps 400
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_corpus(run: Path, seed: int) -> Path:
    from models.hmst.facts import FactConfig, FactWorld, write_corpus
    from orchestration.data import DataConfig, load_corpus

    path = run / "facts_corpus.jsonl"
    if not path.is_file():
        natural = load_corpus(DataConfig(source="builtin")).splits["train"]
        write_corpus(FactWorld(FactConfig(seed=seed)), natural, path)
    return path


def pretrain_model(run: Path, corpus: Path, args) -> Path:
    from orchestration.config import load_config
    from orchestration.pretrain import PretrainConfig, pretrain

    out = run / "pretrain"
    summary = out / "summary.json"
    if summary.is_file() and (json.loads(summary.read_text()).get("step") or 0) >= args.steps:
        return out
    cfg = load_config(PretrainConfig, overrides=[
        f"model={args.model}", f"data.source={corpus}", f"data.vocab_size={args.vocab}", "data.seq_len=128",
        f"max_steps={args.steps}", "workers=2", "batch_size=16", "lr=3e-3", "warmup_steps=30", "eval_every=100",
        "checkpoint_every=100", "log_every=20", f"output={out}", f"seed={args.seed}"])
    pretrain(cfg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/bench-hmst-facts", help="work directory (stages are cached here)")
    parser.add_argument("--model", default="hmst-micro", help="registry preset to pretrain")
    parser.add_argument("--steps", type=int, default=400, help="pretraining steps")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=("all", "pretrain"), default="all")
    args = parser.parse_args()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    corpus = build_corpus(run, args.seed)
    pretrain_dir = pretrain_model(run, corpus, args)
    print(f"pretrained model in {pretrain_dir} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
