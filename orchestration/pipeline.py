"""``memtrain pipeline``: the system end to end on a local Ray cluster, with a report that says what it shows.

Stages (each one is skipped or resumed when the pipeline is re-run into the same output directory):

1. pretrain an HMST model with Ray Train (2 DDP workers) on the fact-recall corpus (natural text mixed with
   fact statements and context-copy examples), long enough that it learns to copy a fact from its context;
2. sample text from its final checkpoint through the KV-cache generator;
3. fill the shared semantic memory (the named FAISS memory actor) with the semantic-placement facts (which never
   appear in the pretraining corpus) and ask every one of their questions with semantic retrieval off and on:
   exact match with 95% intervals over the questions;
4. train the HMST meta-controller with RLlib PPO on sessions about the training entities;
5. evaluate it on sessions about held-out entities (through the memory actor, several seeds) against the named
   fixed policies and every fixed setting of the five gates; the best fixed setting is the baseline;
6. train the TG-SMN thermodynamic controller with RLlib PPO (LSTM policy) on training task streams, and search the
   fixed knob grid on the same streams;
7. evaluate the learned and the best fixed knobs on held-out task streams (other ``task_seed``s: new
   permutations), and run one held-out stream with each to plot the knobs they set;
8. write ``report.md``, ``plots/`` and ``summary.json``; every comparison says whether it is significant at 95%.

``output`` may be a local folder, a folder every node mounts, or a URI: every stage writes its run folder there.

The two PPO stages are ``memtrain rl train`` runs: their configs (``meta``, ``thermo``) are configs/rl/meta.yaml
and configs/rl/thermo.yaml with the pipeline's sizes on top (``META_CHANGES``, ``THERMO_CHANGES``), and the thermo
env's continual run is the ``continual`` section of its env_config.

Profiles: ``quick`` (a few steps of every stage: a smoke run, it shows nothing), ``default`` (about 10 minutes on 2
CPU cores) and ``full`` (longer runs of every stage: several hours; see ``PROFILES``), overrides on top of the
defaults.

Like the CLI, this module sits on top of the others: it drives ``rl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.hmst.facts import FactConfig
from orchestration.training.checkpoint import MODEL_RUN_KEY, load_lm
from orchestration.config import load_config, to_yaml
from orchestration.data.sources import DataConfig
from orchestration.errors import ConfigError, MemtrainError, StorageError
from orchestration.progress import progress
from orchestration.training.pretrain import PretrainConfig, pretrain
from orchestration.report import markdown_table, plot_loss_curves, pyplot, save_png
from orchestration.storage import Location, read_metrics, require_shared, staged
from rl.train import RLTrainConfig

log = logging.getLogger(__name__)

MEMORY_NAMESPACE = "memtrain"
STAGES = 8
# evaluation stages whose results are kept in <output>/stages/<name>.json and reused by a re-run with the same settings
RECORDED_STAGES = ("memory", "meta_eval", "thermo_eval")

PROFILES: dict[str, list[str]] = {
    # a few steps of every stage, for tests and a first look: the model does not learn to copy, nothing is shown
    "quick": ["pretrain.max_steps=30", "pretrain.eval_every=10", "pretrain.checkpoint_every=30",
              "pretrain.log_every=10", "pretrain.model_overrides.n_layers=3", "pretrain.model_overrides.d_model=128",
              "pretrain.data.seq_len=64", "pretrain.data.vocab_size=1024", "facts.copy_examples=400",
              "facts.n_entities=30", "meta.iterations=1", "meta.ppo.train_batch_size=8", "meta.ppo.minibatch_size=4",
              "meta.env_config.queries=4", "meta_eval_seeds=2", "meta_eval_episodes=1", "meta_grid=false",
              "thermo.iterations=1", "thermo.ppo.train_batch_size=16", "thermo.ppo.minibatch_size=8",
              "thermo.env_config.continual.stream.n_tasks=2", "thermo.env_config.continual.max_steps_per_task=8",
              "thermo.env_config.continual.control_interval=4", "thermo.env_config.continual.eval_windows=4",
              "thermo.env_config.continual.data.max_documents=200", "thermo_grid.replay=[0.0,0.3]",
              "thermo_grid.noise=[0.3]", "thermo_grid.temperature=[1.0]", "thermo_heldout_streams=2"],
    # the defaults below: every claim shown in under 15 minutes on 2 CPU cores
    "default": [],
    # longer runs: hmst-tiny on the harder corpus (distractor facts in the contexts, more natural text), longer
    # PPO, more seeds, 8-task streams with drift (several hours on 2 cores)
    "full": ["pretrain.model=hmst-tiny", "pretrain.max_steps=2400", "facts.distractors=2", "facts.natural_fraction=0.2",
             "meta.iterations=160", "meta.ppo.train_batch_size=240", "meta.ppo.minibatch_size=60",
             "meta_eval_seeds=8", "meta_eval_episodes=4", "thermo.iterations=16",
             "thermo.env_config.continual.stream.n_tasks=8", "thermo.env_config.continual.stream.perm_mode=drift",
             "thermo_heldout_streams=8"],
}

RL_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "rl"
# what the pipeline changes in configs/rl/meta.yaml: PPO sized for its budget (an iteration of 120 questions, 80 of
# them, one checkpoint at the end). The preset's env_config describes the bench run's env: the pipeline's env has its
# own checkpoint, memory and fact world (META_WIRED, set when the stage runs) and no trained critic (it trains none)
META_CHANGES = ["output=", "iterations=80", "checkpoint_every=80", "ppo.train_batch_size=120", "ppo.minibatch_size=30"]
META_WIRED = ("checkpoint", "memory", "memory_name", "namespace", "memory_path", "memory_backup", "fact_seed",
              "n_entities", "entities")
# what it changes in configs/rl/thermo.yaml: 10 iterations, one checkpoint at the end, minibatches of 9 env steps
# (a minibatch must hold one whole LSTM sequence of max_seq_len 8)
THERMO_CHANGES = ["output=", "iterations=10", "checkpoint_every=10", "ppo.minibatch_size=9"]


def rl_preset(env: str, changes: list[str], drop: tuple[str, ...] = ()) -> Callable[[], RLTrainConfig]:
    """A default factory: configs/rl/<env>.yaml with ``changes`` (key=value overrides) on top, without the
    env_config keys ``drop``."""
    def make() -> RLTrainConfig:
        path = RL_PRESETS / f"{env}.yaml"
        if not path.is_file():
            raise ConfigError(f"the pipeline's RL defaults {path} are missing; run it from a checkout of memtrain "
                              "(pip install -e .), where configs/ sits next to the packages")
        cfg = load_config(RLTrainConfig, path, changes)
        return dataclasses.replace(cfg, env_config={k: v for k, v in cfg.env_config.items() if k not in drop})
    return make


@dataclass
class PipelinePretrainConfig(PretrainConfig):
    """The pretraining stage: PretrainConfig with defaults sized for the pipeline's 15-minute budget on 2 cores."""
    model: str = "hmst-micro"
    """Registry preset to pretrain (an HMST preset: the memory and meta-controller stages run its engine)."""
    max_steps: int = 800
    """Optimizer steps. Copying a value from the context (what makes semantic retrieval pay) is learnt in a sudden
    phase change: on the pipeline's fact corpus (one fact per context line) hmst-micro copies retrieved facts after
    about 500 steps of 16 x 128 tokens (exact match 0.99); with distractor facts in the context lines it takes
    1,300-2,000 steps and does not always happen."""
    batch_size: int = 8
    """Sequences per worker per micro-step."""
    eval_every: int = 100
    """Optimizer steps between held-out evaluations."""
    checkpoint_every: int = 400
    """Optimizer steps between checkpoints."""
    log_every: int = 50
    """Optimizer steps between training log lines."""
    precision: str = "bf16"
    """fp32, or bf16 (autocast; about 4x the fp32 matmul throughput on this class of CPU)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(vocab_size=1024))
    """The natural text mixed into the fact corpus and the tokenizer (a 1,024-token BPE keeps the fact values
    whole and the output layer small)."""


@dataclass
class KnobGrid:
    """The fixed knob settings searched for the best fixed thermodynamic controller (k is always 1..k_max)."""
    replay: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])
    """Replay ratios."""
    noise: list[float] = field(default_factory=lambda: [0.0, 0.3])
    """Router noise levels."""
    temperature: list[float] = field(default_factory=lambda: [0.7, 1.3])
    """Router temperatures."""


@dataclass
class PipelineConfig:
    output: str = "runs/pipeline"
    """Pipeline folder (a local path, a folder every node mounts, or a URI): report.md, summary.json, plots/, and
    one run folder per stage."""
    pretrain: PipelinePretrainConfig = field(default_factory=PipelinePretrainConfig)
    """The pretraining stage (its output is set to <output>/pretrain; its data.source is the natural text mixed
    into the fact corpus, which the stage writes to <output>/facts/corpus.jsonl and trains on)."""
    facts: FactConfig = field(default_factory=lambda: FactConfig(natural_fraction=0.05, distractors=0))
    """The fact world: its corpus is pretrained on, its semantic facts fill the memory, the meta env asks them. A
    small natural-text share and context lines of one fact each (what semantic retrieval with semantic_k=1 gives the
    model) bring the copying phase change forward from about 1,300 to about 500 steps."""
    memory_name: str = ""
    """Name of the shared semantic memory actor (namespace "memtrain"; its data lives in <output>/memory, or in
    ~/.cache/memtrain/memory/<name> on the actor's node when output is a URI); "" = "pipeline-" + a hash of the
    output folder, so two pipelines on one cluster keep their own memory."""
    meta: RLTrainConfig = field(default_factory=rl_preset("meta", META_CHANGES, (*META_WIRED, "critic")))
    """The meta-controller's PPO run (``memtrain rl train meta``): configs/rl/meta.yaml with META_CHANGES (PPO
    iterations of ppo.train_batch_size questions; an episode of the default env is 6) and without the preset's
    env_config (no trained critic). The pipeline sets its output (<output>/rl-meta) and its env_config's checkpoint,
    memory, fact world and entity split."""
    meta_eval_seeds: int = 5
    """Held-out seeds of the meta-controller comparison (the 95% intervals are over seeds)."""
    meta_eval_episodes: int = 2
    """Episodes (sessions about held-out entities) per seed."""
    meta_grid: bool = True
    """Evaluate every fixed setting of the five gates (rl.envs.meta.fixed_combinations) besides the named ones."""
    meta_grid_experts: list[int] = field(default_factory=lambda: [0, 1])
    """Expert-bias values of that grid (0 = none, e biases expert e - 1): [0, 1] gives the 2^5 = 32 on/off settings;
    list every expert for the whole grid (16 x (n_experts + 1) settings)."""
    sample_prompt: str = "The list"
    """Prompt of the text sample shown in the report."""
    sample_tokens: int = 48
    """Tokens to generate for the sample."""
    thermo: RLTrainConfig = field(default_factory=rl_preset("thermo", THERMO_CHANGES))
    """The thermodynamic controller's PPO run (``memtrain rl train thermo``): configs/rl/thermo.yaml with
    THERMO_CHANGES. Its env_config.task_seeds are the task streams PPO trains on and the fixed grid is searched on;
    env_config.continual is the continual run (default: 3 built-in permuted tasks). The pipeline sets its output
    (<output>/rl-thermo)."""
    thermo_heldout_streams: int = 5
    """Held-out task streams (task_seed 1000, 1001, ...) of the comparison; the 95% intervals are over them."""
    thermo_grid: KnobGrid = field(default_factory=KnobGrid)
    """Fixed knob settings searched for the best fixed controller."""
    heldout_seed: int = 1000
    """First held-out seed: meta-controller evaluation seeds and held-out task streams count from it (training
    uses seeds from 0)."""

    def __post_init__(self):
        if self.meta.env != "meta" or self.thermo.env != "thermo":
            raise ConfigError(f"meta.env must be meta and thermo.env thermo, got {self.meta.env!r} and "
                              f"{self.thermo.env!r}")
        wired = sorted(set(self.meta.env_config) & set(META_WIRED))
        if wired:
            raise ConfigError(f"meta.env_config.{wired[0]} is set by the pipeline (its pretraining run, memory actor "
                              "and fact world; see memory_name and facts); leave it out")


def _finished_stage(stage: Location, cfg: PretrainConfig) -> dict | None:
    """The summary of a pretraining stage that already ran to ``max_steps`` (so a re-run skips it); a stage run with
    other model or data settings is refused with the differences (as resuming it would be)."""
    from orchestration.training.pretrain import _check_resume_compatible

    _check_resume_compatible(stage, cfg)
    max_steps = cfg.max_steps
    try:
        summary = (stage / "summary.json").read_json()
    except (FileNotFoundError, StorageError):
        return None
    return summary if summary.get("step") == max_steps and summary.get("checkpoint") else None


def _stage_pretrain(cfg: PipelineConfig, out: Location) -> dict:
    from models.hmst.facts import FactWorld, write_corpus
    from orchestration.data.sources import load_corpus

    corpus = out / "facts" / "corpus.jsonl"
    pre_cfg = dataclasses.replace(cfg.pretrain, output=(out / "pretrain").uri,
                                  data=dataclasses.replace(cfg.pretrain.data, source=corpus.uri))
    pre = _finished_stage(out / "pretrain", pre_cfg)
    if pre:
        log.info("stage 1/%d: pretraining already finished at step %d (%s)", STAGES, pre["step"], out / "pretrain")
        return pre
    if not corpus.is_file():
        natural = load_corpus(cfg.pretrain.data).splits["train"]
        with staged(out / "facts") as folder:
            write_corpus(FactWorld(cfg.facts), natural, folder / corpus.name)
    log.info("stage 1/%d: pretraining %s for %d steps with %d Ray Train workers on %s", STAGES, cfg.pretrain.model,
             cfg.pretrain.max_steps, cfg.pretrain.workers, corpus)
    return pretrain(pre_cfg)


def _stage_sample(cfg: PipelineConfig, checkpoint: str) -> str:
    from models.common.sampling import SamplingConfig, generate

    log.info("stage 2/%d: sampling from %s", STAGES, checkpoint)
    model, tok, _ = load_lm(checkpoint)
    prompt = torch.tensor([tok.encode(cfg.sample_prompt)])
    ids = generate(model, prompt, SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=40,
                                                 seed=0))[0].tolist()
    return cfg.sample_prompt + tok.decode(ids)


def _memory_places(out: Location, name: str) -> tuple[str, str]:
    """(path, backup) of the memory actor: the pipeline folder when it is a path; with a URI output a folder under
    the memory root of the actor's node, backed up to <output>/memory-backup (so it survives that node)."""
    if out.is_local:
        return (out / "memory").uri, ""
    return name, (out / "memory-backup").uri


def wilson_ci95(hits: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion hits / n (it stays inside [0, 1] and is honest near 0 and 1).

    Example::

        >>> low, high = wilson_ci95(30, 96)
        >>> round(low, 3), round(high, 3)
        (0.229, 0.411)
    """
    if n == 0:
        return 0.0, 1.0
    z, p = 1.959964, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# the engine paths asked every semantic-placement question in stage 3
RETRIEVAL_PATHS = {"retrieval off": {}, "semantic retrieval": {"semantic": True},
                   "semantic retrieval + early exit": {"semantic": True, "early_exit": True}}


def _stage_memory(cfg: PipelineConfig, out: Location, checkpoint: str) -> tuple[dict, list[dict]]:
    """Fill the shared memory actor with the semantic facts (once), time retrieval through it, and ask every semantic
    question with retrieval off and on (exact match with 95% Wilson intervals over the questions)."""
    from memory_service import MemoryConfig, get_or_create_memory
    from models.hmst.engine import Decisions, HMSTEngine
    from models.hmst.facts import FactWorld, exact_match

    name = _memory_name(cfg, out)
    log.info("stage 3/%d: filling the shared semantic memory actor %r and asking its facts", STAGES, name)
    model, tok, _ = load_lm(checkpoint)
    engine = HMSTEngine(model, tok)  # its embedder is the one the env uses
    path, backup = _memory_places(out, name)
    memory = get_or_create_memory(name, MemoryConfig(dim=engine.embedder.dim, path=path, backup=backup),
                                  namespace=MEMORY_NAMESPACE)
    engine.semantic_memory = memory
    if engine.foreign_semantic_memory():
        raise MemtrainError(f"the memory actor {name!r} holds vectors of another tokenizer (an earlier pretraining "
                            f"stage); stop it (memtrain memory stop --name {name} --namespace {MEMORY_NAMESPACE}) and "
                            f"delete {path}, or set memory_name=<new name>")
    world = FactWorld(cfg.facts)
    facts = world.by_placement("semantic")
    started = time.perf_counter()
    if memory.stats()["count"] == 0:
        engine.fill_semantic([f.statement() for f in facts],
                             [{"source": "facts", "seed": cfg.facts.seed, "entity": f.entity} for f in facts],
                             key=world.semantic_key(engine.embedder.signature))
    fill_s = time.perf_counter() - started
    latencies_ms, top1 = [], 0
    for fact in progress(facts, desc="timing retrieval", unit="query"):
        query = engine.embedder.embed([fact.question()])
        started = time.perf_counter()
        hits = memory.search(query, k=1)
        latencies_ms.append(1000 * (time.perf_counter() - started))
        top1 += hits.texts[0][0] == fact.statement()
    stats = memory.stats()
    summary = {"name": name, "count": stats["count"], "index": stats.get("index"), "fill_s": round(fill_s, 3),
               "recall_at_1": top1 / len(facts), "latency_ms": latencies_ms,
               "latency_p50_ms": float(np.percentile(latencies_ms, 50)),
               "latency_p99_ms": float(np.percentile(latencies_ms, 99))}
    rows = []
    for path_name, decisions in RETRIEVAL_PATHS.items():
        answers = [engine.session().ask(f.question(), Decisions(**decisions))
                   for f in progress(facts, desc=f"asking ({path_name})", unit="question")]
        hits = sum(exact_match(a.response, f.value) for a, f in zip(answers, facts))
        low, high = wilson_ci95(hits, len(facts))
        rows.append({"path": path_name, "questions": len(facts), "exact_match": hits / len(facts), "low": low,
                     "high": high, "mflops_per_answer": float(np.mean([a.flops for a in answers])) / 1e6})
    off = rows[0]
    for row in rows[1:]:  # significant: the 95% intervals do not overlap
        row["significant"] = bool(row["low"] > off["high"] or row["high"] < off["low"])
    return summary, rows


def _memory_name(cfg: PipelineConfig, out: Location) -> str:
    return cfg.memory_name or "pipeline-" + hashlib.sha1(out.uri.encode()).hexdigest()[:8]


def _meta_env_config(cfg: PipelineConfig, out: Location) -> dict:
    name = _memory_name(cfg, out)
    return {**cfg.meta.env_config, "checkpoint": (out / "pretrain").uri, "memory": "actor", "memory_name": name,
            "namespace": MEMORY_NAMESPACE, "memory_path": _memory_places(out, name)[0],
            "memory_backup": _memory_places(out, name)[1], "fact_seed": cfg.facts.seed,
            "n_entities": cfg.facts.n_entities}


def _meta_env_settings(cfg: PipelineConfig, out: Location):
    from rl.envs import env_settings

    return env_settings("meta", _meta_env_config(cfg, out))


def _stage_run(cfg: RLTrainConfig, out: Location, env_config: dict) -> RLTrainConfig:
    """A PPO stage's run: into its folder under the pipeline's, with its env wired to the pipeline's runs; a re-run
    resumes the RLlib checkpoints this pipeline wrote there (trust_checkpoint)."""
    return dataclasses.replace(cfg, output=(out / f"rl-{cfg.env}").uri, env_config=env_config, trust_checkpoint=True)


def _stage_meta(cfg: PipelineConfig, out: Location) -> dict:
    from rl.train import train_ppo

    log.info("stage 4/%d: PPO for the HMST meta-controller on sessions about the training entities (%d iterations "
             "of %d questions)", STAGES, cfg.meta.iterations, cfg.meta.ppo.train_batch_size)
    return train_ppo(_stage_run(cfg.meta, out, {**_meta_env_config(cfg, out), "entities": "train"}))


def _stage_meta_eval(cfg: PipelineConfig, out: Location) -> tuple[list[dict], str]:
    """The learned meta-controller, the named fixed policies and (meta_grid) every fixed gate setting on sessions
    about held-out entities, through the memory actor; rows compared seed by seed with the best fixed setting."""
    from rl.envs.meta import baseline_policies, fixed_combinations, n_experts_of
    from rl.evaluate import compare, evaluate
    from rl.policy import LearnedPolicy

    env_config = {**_meta_env_config(cfg, out), "entities": "heldout"}
    fixed = (fixed_combinations(n_experts_of(_meta_env_settings(cfg, out)), cfg.meta_grid_experts)
             if cfg.meta_grid else {})
    named = baseline_policies(env_config)
    policies = {"learned": LearnedPolicy.load(out / "rl-meta" / "policy"), **named, **fixed}
    seeds = list(range(cfg.heldout_seed, cfg.heldout_seed + cfg.meta_eval_seeds))
    log.info("stage 5/%d: the meta-controller against %d other policies on held-out entities (%d seeds x %d "
             "sessions)", STAGES, len(policies) - 1, len(seeds), cfg.meta_eval_episodes)
    rows = evaluate("meta", env_config, policies, seeds=seeds, episodes=cfg.meta_eval_episodes)
    # the baseline: the best fixed setting (chosen on the held-out sessions themselves, which favours it)
    best_fixed = next(r["policy"] for r in rows if r["policy"] not in ("learned", "random"))
    return compare(rows, best_fixed), best_fixed


def _stage_thermo(cfg: PipelineConfig, out: Location) -> dict:
    from rl.train import train_ppo

    log.info("stage 6/%d: PPO for the thermodynamic controller on training task streams %s (%d iterations)", STAGES,
             cfg.thermo.env_settings().task_seeds, cfg.thermo.iterations)
    return train_ppo(_stage_run(cfg.thermo, out, cfg.thermo.env_config))


def _stage_thermo_eval(cfg: PipelineConfig, out: Location) -> tuple[list[dict], list[dict], str, dict[str, dict]]:
    """Search the fixed knob grid on the training streams, then compare the learned controller with the best fixed
    knobs (and the original TG-SMN code's default) on held-out task streams; one held-out stream is also run with
    each through the continual runner, for its knob plot and evaluation matrix."""
    from orchestration.continual.runner import run_continual
    from orchestration.continual.control import FixedController
    from rl.envs.thermo import baseline_policies, knob_grid, learned_controller_resolver
    from rl.evaluate import compare, evaluate
    from rl.policy import LearnedPolicy

    env_config, settings = cfg.thermo.env_config, cfg.thermo.env_settings()
    grid = knob_grid(env_config, tuple(cfg.thermo_grid.replay), tuple(cfg.thermo_grid.noise),
                     tuple(cfg.thermo_grid.temperature))
    train_streams = settings.task_seeds
    log.info("stage 7/%d: %d fixed knob settings on the %d training streams, then the best one and the learned "
             "controller on %d held-out streams", STAGES, len(grid), len(train_streams), cfg.thermo_heldout_streams)
    grid_rows = evaluate("thermo", env_config, grid, seeds=train_streams, episodes=1,
                         seed_config=lambda stream: {"task_seeds": [stream]})
    best = grid_rows[0]["policy"]
    policies = {"learned": LearnedPolicy.load(out / "rl-thermo" / "policy"), f"best fixed ({best})": grid[best],
                "source-default": baseline_policies(env_config)["source-default"]}
    streams = list(range(cfg.heldout_seed, cfg.heldout_seed + cfg.thermo_heldout_streams))
    rows = compare(evaluate("thermo", env_config, policies, seeds=streams, episodes=1,
                            seed_config=lambda stream: {"task_seeds": [stream]}), f"best fixed ({best})")
    continual = settings.continual
    held_out = dataclasses.replace(continual, stream=dataclasses.replace(continual.stream, task_seed=streams[0]))
    runs = {}
    for name, controller, spec in (("fixed", FixedController(grid[best].knobs), "fixed"),
                                   ("learned", learned_controller_resolver((out / "rl-thermo").uri),
                                    (out / "rl-thermo").uri)):
        run_cfg = dataclasses.replace(held_out, output=(out / f"continual-{name}").uri, seed=cfg.heldout_seed,
                                      controller=spec, fixed_knobs=grid[best].knobs)
        runs[name] = run_continual(run_cfg, controller=controller)
    return grid_rows, rows, best, runs


def _plot_returns(run: Location, out_png: Location, title: str) -> Location:
    rows = read_metrics(run)
    fig, ax = pyplot().subplots(figsize=(5, 3))
    ax.plot([r["iteration"] for r in rows], [r.get("episode_return_mean") for r in rows], marker="o")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("mean episode return (training)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return save_png(fig, out_png)


def _plot_memory_latency(memory: dict, out_png: Location) -> Location:
    fig, ax = pyplot().subplots(figsize=(5, 3))
    ax.hist(memory["latency_ms"], bins=30)
    ax.set_xlabel("search latency through the actor (ms)")
    ax.set_ylabel("questions")
    ax.set_title(f"semantic memory: {memory['count']} facts, recall@1 {memory['recall_at_1']:.2f}", fontsize=9)
    return save_png(fig, out_png)


def _plot_intervals(rows: list[dict], label: str, value: str, out_png: Location, title: str, xlabel: str) -> Location:
    """Horizontal bars of rows[value] with their [low, high] 95% intervals."""
    fig, ax = pyplot().subplots(figsize=(6.5, 0.6 + 0.4 * len(rows)))
    means = [r[value] for r in rows]
    ax.barh([r[label] for r in rows], means, xerr=[[m - r["low"] for m, r in zip(means, rows)],
                                                   [r["high"] - m for m, r in zip(means, rows)]],
            color="tab:blue", alpha=0.7, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return save_png(fig, out_png)


def _comparison(shown: list[dict], rows: list[dict], folder: Location, reference: str, title: str,
                xlabel: str) -> tuple[list[dict], Location]:
    """All ``rows`` to <folder>/results.*; the ``shown`` ones with their verdicts against ``reference``, and their
    interval plot (<folder>/comparison.png) for the report."""
    from rl.evaluate import write_report

    write_report(rows, folder, title)
    shown = [{**row, "verdict": _verdict(row, reference)} for row in shown]
    return shown, _plot_intervals(shown, "policy", "return_mean", folder / "comparison.png", title, xlabel)


def _verdict(row: dict, reference: str) -> str:
    """One line: the paired difference from the reference with its interval, and whether it is significant."""
    if row["significant"] is None:
        return "reference"
    sign = "better" if row["diff"] > 0 else "worse"
    word = f"significantly {sign} than" if row["significant"] else "no significant difference from"
    return f"{word} {reference}: {row['diff']:+.3f} +- {row['diff_ci95']:.3f}"


def _meta_reading(ppo_rows: list[dict], learned: dict, best: str) -> str:
    """What the learned meta-controller does (its mean actions in the last PPO iteration), next to the verdict."""
    means = ppo_rows[-1] if ppo_rows else {}
    actions = [f"{name} {means[f'action_mean/action_{i}']:.2f}" for i, name in
               enumerate(("early exit", "episodic", "semantic", "expert bias (0-n)", "verify"))
               if f"action_mean/action_{i}" in means]
    return (f"Reading (the learned policy): {_verdict(learned, best)}. Its sampled actions in the last PPO iteration "
            f"(share on; expert bias as the mean index): {', '.join(actions)}. The best fixed setting answers "
            "from semantic retrieval with the early-exit head for every question; a learned policy can only beat it "
            "by telling from the question's embedding and the state features when a gate does not pay, which new "
            "entities make hard.")


def _thermo_reading(learned: dict, cl_rows: list[dict], best: str) -> str:
    """The learned thermodynamic controller's knobs next to the best fixed ones, next to the verdict."""
    knobs = {r["controller"]: r for r in cl_rows}
    used = (f" On the held-out stream run above it used mean k {knobs['learned']['mean_k']:.2f} and replay "
            f"{knobs['learned']['mean_replay']:.2f}, against the fixed {knobs['fixed']['mean_k']:.2f} and "
            f"{knobs['fixed']['mean_replay']:.2f}." if {"learned", "fixed"} <= set(knobs) else "")
    return (f"Reading (the learned controller): {_verdict(learned, best)}.{used} The retention reward is dominated by "
            "replay and the compute term is set by k, so on short streams of unrelated permutations the best "
            "constant setting (most replay, smallest k) is hard to beat; a schedule that adapts within a stream can "
            "only pay on longer streams with repeats or drift (`--profile full`: 8 drifting tasks).")


def _rounded(rows: list[dict], digits: int = 3) -> list[dict]:
    return [{k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def run_pipeline(cfg: PipelineConfig, profile: str = "default") -> dict:
    from orchestration.runtime import ensure_ray

    out = Location(cfg.output)
    ensure_ray()  # every stage needs it, a skipped (finished) pretraining stage included
    require_shared(out, "output")
    (out / "config.yaml").write_text(to_yaml(cfg))
    started = time.time()
    wall: dict[str, float] = {}

    settings = to_yaml(dataclasses.replace(cfg, output=""))

    def timed(stage: str, fn, *args):
        """Run a stage, or take its result from an earlier run of this pipeline with the same settings (the RL stages
        resume on their own, pretraining is skipped when finished)."""
        record = out / "stages" / f"{stage}.json"
        done = record.read_json() if record.is_file() else None
        if done is not None and done["settings"] == settings:
            log.info("%s: finished in an earlier run with the same settings (%s)", stage, record)
            wall[stage] = 0.0
            return done["result"]
        t0 = time.time()
        result = fn(*args)
        wall[stage] = round(time.time() - t0, 1)
        if stage in RECORDED_STAGES:
            record.write_json({"settings": settings, "result": result})
        return result

    pre = timed("pretrain", _stage_pretrain, cfg, out)
    sample = timed("sample", _stage_sample, cfg, pre["checkpoint"])
    memory, retrieval = timed("memory", _stage_memory, cfg, out, pre["checkpoint"])
    meta = timed("meta_ppo", _stage_meta, cfg, out)
    meta_rows, best_meta = timed("meta_eval", _stage_meta_eval, cfg, out)
    thermo = timed("thermo_ppo", _stage_thermo, cfg, out)
    grid_rows, thermo_rows, best_knobs, continual = timed("thermo_eval", _stage_thermo_eval, cfg, out)

    log.info("stage %d/%d: writing the report", STAGES, STAGES)
    plots = out / "plots"
    loss_png = plot_loss_curves(out / "pretrain", plots / "pretrain_loss.png",
                                f"{cfg.pretrain.model} pretraining on the fact corpus")
    latency_png = _plot_memory_latency(memory, plots / "memory_latency.png")
    retrieval_png = _plot_intervals(retrieval, "path", "exact_match", plots / "retrieval.png",
                                    "facts only in the semantic memory: exact match (95% Wilson interval)",
                                    "exact match over the semantic-placement questions")
    meta_png = _plot_returns(out / "rl-meta", plots / "meta_returns.png",
                             "HMST meta-controller: PPO training return (training entities)")
    meta_shown, meta_cmp_png = _comparison(
        [r for r in meta_rows if r["policy"] in ("learned", best_meta, "all_on", "all_off", "retrieval_only",
                                                 "semantic_exit", "random")],
        meta_rows, out / "meta-eval", f"the best fixed setting ({best_meta})",
        "meta-controller on held-out entities: learned vs fixed (95% CI over seeds)", "mean episode return")
    thermo_png = _plot_returns(out / "rl-thermo", plots / "thermo_returns.png",
                               "thermodynamic controller: PPO training return (training streams)")
    thermo_rows, thermo_cmp_png = _comparison(
        thermo_rows, thermo_rows, out / "thermo-eval", f"the best fixed knobs ({best_knobs})",
        "thermodynamic controller on held-out streams (95% CI over streams)",
        "mean episode return (retention - compute)")
    cl_rows = [{"controller": name, **{k: r.get(k) for k in ("avg_final_loss", "forgetting", "backward_transfer",
                                                              "forward_transfer")},
                "mean_k": r["mean_knobs"]["k"], "mean_replay": r["mean_knobs"]["replay_ratio"]}
               for name, r in continual.items()]
    memory_row = {k: v for k, v in memory.items() if k != "latency_ms"}
    on, off = retrieval[1], retrieval[0]
    summary = {"profile": profile, "wall_s": round(time.time() - started, 1), "stage_wall_s": wall,
               MODEL_RUN_KEY: "pretrain", "pretrain": pre, "sample": sample, "memory": memory_row, "retrieval": retrieval, "meta_ppo": meta,
               "meta_eval": meta_rows, "meta_best_fixed": best_meta, "thermo_ppo": thermo,
               "thermo_grid": grid_rows, "thermo_eval": thermo_rows, "thermo_best_fixed": best_knobs,
               "continual": cl_rows}
    learned_meta = next(r for r in meta_rows if r["policy"] == "learned")
    heldout = _meta_env_settings(cfg, out).heldout_fraction
    learned_thermo = next(r for r in thermo_rows if r["policy"] == "learned")
    headline = [
        f"- Semantic retrieval: exact match {on['exact_match']:.2f} [{on['low']:.2f}, {on['high']:.2f}] with it, "
        f"{off['exact_match']:.2f} [{off['low']:.2f}, {off['high']:.2f}] without, on {off['questions']} questions "
        f"about facts that exist only in the memory: "
        + ("**significant** (the 95% intervals do not overlap)." if on["significant"] else
           "**not significant** (the 95% intervals overlap; the model has not learnt to copy from its context: "
           "more pretraining steps, see the pretraining section)."),
        f"- Meta-controller on held-out entities: learned {learned_meta['return_mean']:.3f} +- "
        f"{learned_meta['ci95']:.3f}; "
        f"{_verdict(learned_meta, f'the best of {len(meta_rows) - 2} fixed policies ({best_meta})')}.",
        f"- Thermodynamic controller on {cfg.thermo_heldout_streams} held-out streams: learned "
        f"{learned_thermo['return_mean']:.3f} +- {learned_thermo['ci95']:.3f}; "
        f"{_verdict(learned_thermo, f'the best of {len(grid_rows)} fixed knob settings ({best_knobs})')}.",
    ]
    if profile == "quick":
        headline.insert(0, "- **Quick profile: a smoke run of every stage; the model is far too short-trained for "
                           "any of the comparisons below to mean anything.**")
    meta_columns = ["policy", "return_mean", "ci95", "correct", "cost", "calibration", "verdict"]
    report = [
        "# memtrain pipeline report", "",
        f"Profile: {profile}; wall time {summary['wall_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in wall.items())}); output `{out}`.", "",
        "## What this run shows", "", *headline, "",
        "Intervals are 95%: Wilson intervals over questions for exact match; Student-t intervals over seeds (meta) "
        "or held-out task streams (thermo) for returns. A difference between a controller and the best fixed "
        "setting is paired seed by seed (both meet the same episodes) and called significant when its 95% interval "
        "excludes 0.", "",
        "## Pretraining (Ray Train, DDP)", "",
        markdown_table(_rounded([{"model": cfg.pretrain.model, "workers": cfg.pretrain.workers, **pre}]),
                       ["model", "workers", "step", "tokens", "first_eval_loss", "final_eval_loss",
                        "final_eval_perplexity", "tokens_per_s", "mfu"]), "",
        "Losses are held-out cross-entropy (nats/token). The plot shows training and held-out cross-entropy, and "
        "apart from them the auxiliary losses the model also trains with (MoE balance, z, early-exit head).", "",
        f"![loss curves]({loss_png.uri[len(out.uri) + 1:]})", "",
        f"Checkpoint: `{pre['checkpoint']}`", "",
        "Sample:", "", "```", sample, "```", "",
        "## Shared semantic memory (FAISS actor) and what retrieval buys", "",
        f"The semantic-placement facts in the named actor `{memory['name']}` (namespace `{MEMORY_NAMESPACE}`); "
        "recall@1 is the share of questions whose own fact is the top hit; latency is one question's search "
        "through the actor, from the driver.", "",
        markdown_table(_rounded([memory_row]), ["name", "count", "index", "fill_s", "recall_at_1", "latency_p50_ms",
                                                "latency_p99_ms"]), "",
        f"![memory latency]({latency_png.uri[len(out.uri) + 1:]})", "",
        "Every semantic-placement question (facts that never appear in the pretraining corpus) asked through the "
        "engine, with the memory actor:", "",
        markdown_table(_rounded(retrieval), ["path", "questions", "exact_match", "low", "high", "mflops_per_answer",
                                             "significant"]), "",
        f"![retrieval]({retrieval_png.uri[len(out.uri) + 1:]})", "",
        "## HMST meta-controller (RLlib PPO)", "",
        f"Trained on sessions about {1 - heldout:.0%} of the entities; evaluated on sessions about the other "
        f"{heldout:.0%} (entities it never saw), {cfg.meta_eval_seeds} seeds x {cfg.meta_eval_episodes} sessions, "
        "through the memory actor. Reward = correct - cost + calibration per question. The baseline is the best of "
        f"{len(meta_rows) - 2} fixed policies (every on/off setting of the five gates and the named presets, "
        "`meta-eval/results.md`), chosen on these same held-out sessions, which favours it.", "",
        markdown_table(_rounded([meta]), ["iterations", "first_return", "final_return", "wall_s"]), "",
        f"![PPO returns]({meta_png.uri[len(out.uri) + 1:]})", "",
        markdown_table(_rounded(meta_shown), meta_columns), "",
        f"![controller comparison]({meta_cmp_png.uri[len(out.uri) + 1:]})", "",
        _meta_reading(read_metrics(out / "rl-meta"), learned_meta, best_meta), "",
        "## Thermodynamic controller (RLlib PPO, LSTM policy)", "",
        f"Trained on task streams {cfg.thermo.env_settings().task_seeds} (task_seed); the fixed knob grid "
        f"({len(grid_rows)} settings of k, replay, noise and temperature) searched on the same streams; both "
        f"evaluated on {cfg.thermo_heldout_streams} held-out streams (task_seed {cfg.heldout_seed}.."
        f"{cfg.heldout_seed + cfg.thermo_heldout_streams - 1}: new permutations and document splits). Reward per "
        "episode = retention (drop of the held-out loss of the tasks seen so far) - compute (k / k_max).", "",
        markdown_table(_rounded([thermo]), ["iterations", "first_return", "final_return", "wall_s"]), "",
        f"![PPO returns]({thermo_png.uri[len(out.uri) + 1:]})", "",
        markdown_table(_rounded(thermo_rows), ["policy", "return_mean", "ci95", "retention", "compute", "verdict"]), "",
        f"![thermo comparison]({thermo_cmp_png.uri[len(out.uri) + 1:]})", "",
        "Best fixed settings on the training streams (`thermo-grid`):", "",
        markdown_table(_rounded(grid_rows[:5]), ["policy", "return_mean", "retention", "compute"]), "",
        f"One held-out stream (task_seed {cfg.heldout_seed}) run through the continual runner with each: losses are "
        "mean test cross-entropy (nats/token) after the last task; forgetting > 0 is worse, BWT < 0 is forgetting.",
        "", markdown_table(_rounded(cl_rows), ["controller", "avg_final_loss", "forgetting", "backward_transfer",
                                               "forward_transfer", "mean_k", "mean_replay"]), "",
        *[f"![{name} evaluation matrix](continual-{name}/eval_matrix.png) ![{name} knobs](continual-{name}/knobs.png)"
          for name in continual], "",
        _thermo_reading(learned_thermo, cl_rows, best_knobs), "",
    ]
    (out / "thermo-grid" / "results.json").write_json(grid_rows)
    (out / "report.md").write_text("\n".join(report))
    (out / "summary.json").write_json(summary)
    size_mb = sum(out.files().values()) / 1e6  # checkpoints, token shards, the memory's store, RL runs, plots
    print(f"[memtrain] pipeline ({profile}) done in {summary['wall_s']:.0f} s; report {out / 'report.md'}; the "
          f"output folder holds {size_mb:.0f} MB\n" + "\n".join(headline), flush=True)
    return summary
