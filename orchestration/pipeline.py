"""``memtrain pipeline``: the system end to end on a local Ray cluster, with a report at the end.

Stages (each one is skipped or resumed when the pipeline is re-run into the same output directory):

1. pretrain ``hmst-tiny`` with Ray Train (2 DDP workers) on the fact-recall corpus (offline built-in natural text
   mixed with fact statements and context-copy examples);
2. sample text from its final checkpoint through the KV-cache generator;
3. fill the shared semantic memory (the named FAISS memory actor) with the semantic-placement facts and measure
   retrieval through it;
4. train the HMST meta-controller with RLlib PPO against the engine (the env reaches the memory actor by name),
   then evaluate the learned policy against the fixed baselines;
5. train the TG-SMN thermodynamic controller with RLlib PPO (LSTM policy) on a continual-learning stream;
6. run a held-out continual-learning stream with the fixed (source default) and the learned controller;
7. write ``report.md``, ``plots/`` and ``summary.json``.

``output`` may be a local folder, a folder every node mounts, or a URI: every stage writes its run folder there.

Like the CLI, this module sits on top of the others (it drives ``rl``), so its imports of ``rl`` are local.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.hmst.facts import FactConfig
from orchestration.checkpoint import load_lm
from orchestration.config import to_yaml
from orchestration.errors import MemtrainError, StorageError
from orchestration.pretrain import PretrainConfig, pretrain
from orchestration.report import markdown_table, plot_loss_curves, pyplot, save_png
from orchestration.storage import Location, read_metrics, require_shared, staged

log = logging.getLogger(__name__)

MEMORY_NAMESPACE = "memtrain"

# the --quick profile: a few steps of every stage, for tests and a first look
QUICK_OVERRIDES = ["pretrain.max_steps=30", "pretrain.eval_every=10", "pretrain.checkpoint_every=30",
                   "pretrain.log_every=10", "pretrain.model_overrides.n_layers=3", "pretrain.model_overrides.d_model=128",
                   "pretrain.data.seq_len=64", "pretrain.data.vocab_size=1024", "facts.copy_examples=400",
                   "facts.natural_fraction=0.05", "facts.n_entities=30", "meta_iterations=1", "meta_batch=8",
                   "meta_env.queries=4", "meta_eval_episodes=1", "thermo_iterations=1", "thermo_batch=16",
                   "thermo_env.continual.stream.n_tasks=2", "thermo_env.continual.max_steps_per_task=8",
                   "thermo_env.continual.control_interval=4", "thermo_env.continual.eval_windows=4",
                   "thermo_env.continual.data.max_documents=200"]


@dataclass
class PipelinePretrainConfig(PretrainConfig):
    """The pretraining stage: PretrainConfig with defaults sized for the pipeline's 15-minute budget on 2 cores."""
    model: str = "hmst-tiny"
    """Registry preset to pretrain (an HMST preset: the memory and meta-controller stages run its engine)."""
    max_steps: int = 300
    """Optimizer steps (copying from context, which makes semantic retrieval pay, needs ~1,400: see
    bench/bench_hmst_facts.py; the pipeline shows the system working within its time budget)."""
    batch_size: int = 8
    """Sequences per worker per micro-step."""
    precision: str = "bf16"
    """fp32, or bf16 (autocast; about 4x the fp32 matmul throughput on this class of CPU)."""


@dataclass
class PipelineConfig:
    output: str = "runs/pipeline"
    """Pipeline folder (a local path, a folder every node mounts, or a URI): report.md, summary.json, plots/, and
    one run folder per stage."""
    pretrain: PipelinePretrainConfig = field(default_factory=PipelinePretrainConfig)
    """The pretraining stage (its output is set to <output>/pretrain; its data.source is the natural text mixed
    into the fact corpus, which the stage writes to <output>/facts/corpus.jsonl and trains on)."""
    facts: FactConfig = field(default_factory=FactConfig)
    """The fact world: its corpus is pretrained on, its semantic facts fill the memory, the meta env asks them."""
    memory_name: str = ""
    """Name of the shared semantic memory actor (namespace "memtrain"; its data lives in <output>/memory, or in
    ~/.cache/memtrain/memory/<name> on the actor's node when output is a URI); "" = "pipeline-" + a hash of the
    output folder, so two pipelines on one cluster keep their own memory."""
    meta_env: dict[str, Any] = field(default_factory=dict)
    """env_config of the meta-controller's env (see rl.envs.meta; checkpoint, memory and facts are set here)."""
    meta_iterations: int = 2
    """PPO iterations of the meta-controller."""
    meta_batch: int = 48
    """Env steps (questions) per PPO iteration (an episode of the default env is 6 questions)."""
    meta_eval_episodes: int = 4
    """Episodes per seed (2 held-out seeds) when comparing the learned meta-controller with the baselines."""
    sample_prompt: str = "The list"
    """Prompt of the text sample shown in the report."""
    sample_tokens: int = 48
    """Tokens to generate for the sample."""
    thermo_env: dict[str, Any] = field(default_factory=dict)
    """env_config of the thermodynamic controller's env (see rl.envs.thermo; default: 3 built-in tasks)."""
    thermo_iterations: int = 3
    """PPO iterations of the thermodynamic controller."""
    thermo_batch: int = 36
    """Env steps per PPO iteration (an episode of the default stream is 9 steps)."""
    continual_seed: int = 1000
    """Seed of the held-out continual-learning comparison (PPO trains on seeds from 0)."""


def _finished_stage(stage: Location, cfg: PretrainConfig) -> dict | None:
    """The summary of a pretraining stage that already ran to ``max_steps`` (so a re-run skips it); a stage run with
    other model or data settings is refused with the differences (as resuming it would be)."""
    from orchestration.pretrain import _check_resume_compatible

    _check_resume_compatible(stage, cfg)
    max_steps = cfg.max_steps
    try:
        summary = (stage / "summary.json").read_json()
    except (FileNotFoundError, StorageError):
        return None
    return summary if summary.get("step") == max_steps and summary.get("checkpoint") else None


def _stage_pretrain(cfg: PipelineConfig, out: Location) -> dict:
    from models.hmst.facts import FactWorld, write_corpus
    from orchestration.data import load_corpus

    corpus = out / "facts" / "corpus.jsonl"
    pre_cfg = dataclasses.replace(cfg.pretrain, output=(out / "pretrain").uri,
                                  data=dataclasses.replace(cfg.pretrain.data, source=corpus.uri))
    pre = _finished_stage(out / "pretrain", pre_cfg)
    if pre:
        log.info("stage 1/7: pretraining already finished at step %d (%s)", pre["step"], out / "pretrain")
        return pre
    if not corpus.is_file():
        natural = load_corpus(cfg.pretrain.data).splits["train"]
        with staged(out / "facts") as folder:
            write_corpus(FactWorld(cfg.facts), natural, folder / corpus.name)
    log.info("stage 1/7: pretraining %s with %d Ray Train workers on %s", cfg.pretrain.model, cfg.pretrain.workers,
             corpus)
    return pretrain(pre_cfg)


def _stage_sample(cfg: PipelineConfig, checkpoint: str) -> str:
    from models.common.sampling import SamplingConfig, generate

    log.info("stage 2/7: sampling from %s", checkpoint)
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


def _stage_memory(cfg: PipelineConfig, out: Location, checkpoint: str) -> dict:
    """Fill the shared memory actor with the semantic facts (once) and time single-question retrieval through it."""
    from memory_service import MemoryConfig, get_or_create_memory
    from models.hmst.engine import HMSTEngine
    from models.hmst.facts import FactWorld

    name = _memory_name(cfg, out)
    log.info("stage 3/7: filling the shared semantic memory actor %r", name)
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
    for fact in facts:
        query = engine.embedder.embed([fact.question()])
        started = time.perf_counter()
        hits = memory.search(query, k=1)
        latencies_ms.append(1000 * (time.perf_counter() - started))
        top1 += hits.texts[0][0] == fact.statement()
    stats = memory.stats()
    return {"name": name, "count": stats["count"], "index": stats.get("index"), "fill_s": round(fill_s, 3),
            "recall_at_1": top1 / len(facts), "latency_ms": latencies_ms,
            "latency_p50_ms": float(np.percentile(latencies_ms, 50)),
            "latency_p99_ms": float(np.percentile(latencies_ms, 99))}


def _memory_name(cfg: PipelineConfig, out: Location) -> str:
    return cfg.memory_name or "pipeline-" + hashlib.sha1(out.uri.encode()).hexdigest()[:8]


def _meta_env_config(cfg: PipelineConfig, out: Location) -> dict:
    name = _memory_name(cfg, out)
    return {**cfg.meta_env, "checkpoint": (out / "pretrain").uri, "memory": "actor", "memory_name": name,
            "namespace": MEMORY_NAMESPACE, "memory_path": _memory_places(out, name)[0],
            "memory_backup": _memory_places(out, name)[1], "fact_seed": cfg.facts.seed,
            "n_entities": cfg.facts.n_entities}


def _stage_meta(cfg: PipelineConfig, out: Location) -> tuple[dict, list[dict]]:
    from rl.envs.meta import baseline_policies
    from rl.evaluate import evaluate
    from rl.policy import LearnedPolicy
    from rl.train import PPOSettings, RLTrainConfig, train_ppo

    log.info("stage 4/7: PPO for the HMST meta-controller (%d iterations)", cfg.meta_iterations)
    env_config = _meta_env_config(cfg, out)
    ppo = PPOSettings(train_batch_size=cfg.meta_batch, minibatch_size=max(4, cfg.meta_batch // 4), num_epochs=4)
    # trust_checkpoint: a re-run resumes the RLlib checkpoints this pipeline wrote into its own folder
    summary = train_ppo(RLTrainConfig(env="meta", env_config=env_config, output=(out / "rl-meta").uri,
                                      iterations=cfg.meta_iterations, checkpoint_every=cfg.meta_iterations, ppo=ppo,
                                      trust_checkpoint=True))
    policies = {"learned": LearnedPolicy.load(out / "rl-meta" / "policy"), **baseline_policies(env_config)}
    rows = evaluate("meta", env_config, policies, seeds=[cfg.continual_seed, cfg.continual_seed + 1],
                    episodes=cfg.meta_eval_episodes)
    return summary, rows


def _stage_thermo(cfg: PipelineConfig, out: Location) -> dict:
    from rl.train import PPOSettings, RLTrainConfig, train_ppo

    log.info("stage 5/7: PPO for the thermodynamic controller (%d iterations)", cfg.thermo_iterations)
    seq = 8  # LSTM BPTT length; a minibatch must hold at least one whole sequence
    ppo = PPOSettings(use_lstm=True, lstm_cell_size=32, max_seq_len=seq, fcnet_hiddens=[32],
                      train_batch_size=cfg.thermo_batch, minibatch_size=max(seq, cfg.thermo_batch // 4), num_epochs=4)
    return train_ppo(RLTrainConfig(env="thermo", env_config=cfg.thermo_env, output=(out / "rl-thermo").uri,
                                   iterations=cfg.thermo_iterations, checkpoint_every=cfg.thermo_iterations, ppo=ppo,
                                   trust_checkpoint=True))


def _stage_continual(cfg: PipelineConfig, out: Location) -> dict[str, dict]:
    from orchestration.continual import run_continual
    from rl.envs.thermo import env_settings, learned_controller_resolver

    log.info("stage 6/7: held-out continual-learning stream, fixed vs learned controller")
    _, continual = env_settings(cfg.thermo_env)
    results = {}
    for name, controller in (("fixed", None), ("learned", learned_controller_resolver((out / "rl-thermo").uri))):
        run_cfg = dataclasses.replace(continual, output=(out / f"continual-{name}").uri, seed=cfg.continual_seed,
                                      controller="fixed" if controller is None else (out / "rl-thermo").uri)
        results[name] = run_continual(run_cfg, controller=controller)
    return results


def _plot_returns(run: Location, out_png: Location, title: str) -> Location:
    rows = read_metrics(run)
    fig, ax = pyplot().subplots(figsize=(5, 3))
    ax.plot([r["iteration"] for r in rows], [r.get("episode_return_mean") for r in rows], marker="o")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("mean episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_png(fig, out_png)


def _plot_memory_latency(memory: dict, out_png: Location) -> Location:
    fig, ax = pyplot().subplots(figsize=(5, 3))
    ax.hist(memory["latency_ms"], bins=30)
    ax.set_xlabel("search latency through the actor (ms)")
    ax.set_ylabel("questions")
    ax.set_title(f"semantic memory: {memory['count']} facts, recall@1 {memory['recall_at_1']:.2f}")
    return save_png(fig, out_png)


def run_pipeline(cfg: PipelineConfig, quick: bool = False) -> dict:
    from rl.evaluate import write_report

    from orchestration.ray_utils import ensure_ray

    out = Location(cfg.output)
    ensure_ray()  # every stage needs it, a skipped (finished) pretraining stage included
    require_shared(out, "output")
    (out / "config.yaml").write_text(to_yaml(cfg))
    started = time.time()

    pre = _stage_pretrain(cfg, out)
    sample = _stage_sample(cfg, pre["checkpoint"])
    memory = _stage_memory(cfg, out, pre["checkpoint"])
    meta, meta_rows = _stage_meta(cfg, out)
    thermo = _stage_thermo(cfg, out)
    continual = _stage_continual(cfg, out)

    log.info("stage 7/7: writing the report")
    plots = out / "plots"
    loss_png = plot_loss_curves(out / "pretrain", plots / "pretrain_loss.png", f"{cfg.pretrain.model} pretraining")
    latency_png = _plot_memory_latency(memory, plots / "memory_latency.png")
    meta_png = _plot_returns(out / "rl-meta", plots / "meta_returns.png", "HMST meta-controller (PPO)")
    write_report(meta_rows, out / "meta-eval", "HMST meta-controller vs fixed policies (held-out seeds)")
    thermo_png = _plot_returns(out / "rl-thermo", plots / "thermo_returns.png", "thermodynamic controller (PPO, LSTM)")
    cl_rows = [{"controller": name, **{k: r.get(k) for k in ("avg_final_loss", "forgetting", "backward_transfer",
                                                              "forward_transfer")},
                "mean_k": r["mean_knobs"]["k"], "mean_replay": r["mean_knobs"]["replay_ratio"]}
               for name, r in continual.items()]
    memory_row = {k: v for k, v in memory.items() if k != "latency_ms"}
    summary = {"profile": "quick" if quick else "default", "wall_s": round(time.time() - started, 1),
               "pretrain": pre, "sample": sample, "memory": memory_row, "meta_ppo": meta, "meta_eval": meta_rows,
               "thermo_ppo": thermo, "continual": cl_rows}
    report = [
        "# memtrain pipeline report", "",
        f"Profile: {summary['profile']}; wall time {summary['wall_s']} s; output `{out}`.", "",
        "## Pretraining (Ray Train, DDP)", "",
        markdown_table([{"model": cfg.pretrain.model, "workers": cfg.pretrain.workers, **pre}],
                       ["model", "workers", "step", "tokens", "first_eval_loss", "final_eval_loss",
                        "final_eval_perplexity", "tokens_per_s", "mfu"]), "",
        f"![loss curves]({loss_png.uri[len(out.uri) + 1:]})", "",
        f"Checkpoint: `{pre['checkpoint']}`", "",
        "Sample:", "", "```", sample, "```", "",
        "## Shared semantic memory (FAISS actor)", "",
        f"The semantic-placement facts in the named actor `{memory['name']}` (namespace `{MEMORY_NAMESPACE}`); "
        "recall@1 is the share of questions whose own fact is the top hit; latency is one question's search "
        "through the actor, from the driver.", "",
        markdown_table([memory_row], ["name", "count", "index", "fill_s", "recall_at_1", "latency_p50_ms",
                                      "latency_p99_ms"]), "",
        f"![memory latency]({latency_png.uri[len(out.uri) + 1:]})", "",
        "## HMST meta-controller (RLlib PPO)", "",
        markdown_table([meta], ["iterations", "first_return", "final_return", "wall_s"]), "",
        f"![PPO returns]({meta_png.uri[len(out.uri) + 1:]})", "",
        "Learned policy against the fixed policies on held-out seeds (mean episode return with 95% interval; "
        "reward = correct - cost + calibration):", "",
        markdown_table(meta_rows, ["policy", "return_mean", "ci95", "correct", "cost", "calibration"]), "",
        "![controller comparison](meta-eval/returns.png)", "",
        "## Thermodynamic controller (RLlib PPO, LSTM policy)", "",
        markdown_table([thermo], ["iterations", "first_return", "final_return", "wall_s"]), "",
        f"![PPO returns]({thermo_png.uri[len(out.uri) + 1:]})", "",
        "## Continual learning on a held-out stream: fixed vs learned controller", "",
        "Losses are mean test cross-entropy (nats/token) after the last task; forgetting and transfers are in "
        "loss space (forgetting > 0 is worse, BWT < 0 is forgetting).", "",
        markdown_table(cl_rows, ["controller", "avg_final_loss", "forgetting", "backward_transfer",
                                 "forward_transfer", "mean_k", "mean_replay"]), "",
        *[f"![{name} evaluation matrix](continual-{name}/eval_matrix.png) ![{name} knobs](continual-{name}/knobs.png)"
          for name in continual], "",
    ]
    (out / "report.md").write_text("\n".join(report))
    (out / "summary.json").write_json(summary)
    print(f"[memtrain] pipeline done in {summary['wall_s']} s: final eval loss {pre['final_eval_loss']:.4f} "
          f"(from {pre['first_eval_loss']:.4f}); {memory['count']} facts in the memory actor; meta-controller "
          f"return {meta['final_return']}; report {out / 'report.md'}", flush=True)
    return summary
