"""``memtrain pipeline``: the system end to end on a local Ray cluster, with a report at the end.

Stages (each one is skipped or resumed when the pipeline is re-run into the same output directory):

1. pretrain an LM with Ray Train (2 DDP workers) on the offline built-in corpus;
2. sample text from its final checkpoint through the KV-cache generator;
3. train the TG-SMN thermodynamic controller with RLlib PPO (LSTM policy) on a continual-learning stream;
4. run a held-out continual-learning stream with the fixed (source default) and the learned controller;
5. write ``report.md``, ``plots/`` and ``summary.json``.

Like the CLI, this module sits on top of the others (it drives ``rl``), so its imports of ``rl`` are local.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestration.config import to_yaml
from orchestration.files import write_atomic
from orchestration.pretrain import PretrainConfig, pretrain
from orchestration.report import markdown_table, plot_loss_curves

log = logging.getLogger(__name__)

# the --quick profile: a few steps of every stage, for tests and a first look
QUICK_OVERRIDES = ["pretrain.max_steps=30", "pretrain.eval_every=10", "pretrain.checkpoint_every=30",
                   "pretrain.log_every=10", "pretrain.model_overrides.n_layers=2", "pretrain.data.seq_len=64",
                   "pretrain.data.vocab_size=1024", "thermo_iterations=1", "thermo_batch=16",
                   "thermo_env.continual.stream.n_tasks=2", "thermo_env.continual.max_steps_per_task=8",
                   "thermo_env.continual.control_interval=4", "thermo_env.continual.eval_windows=4",
                   "thermo_env.continual.data.max_documents=200"]


@dataclass
class PipelinePretrainConfig(PretrainConfig):
    """The pretraining stage: PretrainConfig with defaults sized for the pipeline's 15-minute budget on 2 cores."""
    model: str = "tgsmn-dense-tiny"
    """Registry preset to pretrain."""
    max_steps: int = 200
    """Optimizer steps."""


@dataclass
class PipelineConfig:
    output: str = "runs/pipeline"
    """Pipeline directory: report.md, summary.json, plots/, and one sub-directory per stage."""
    pretrain: PipelinePretrainConfig = field(default_factory=PipelinePretrainConfig)
    """The pretraining stage (its output is set to <output>/pretrain)."""
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


def _finished_stage(stage_dir: Path, max_steps: int) -> dict | None:
    """The summary of a pretraining stage that already ran to ``max_steps`` (so a re-run skips it)."""
    path = stage_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("step") == max_steps and summary.get("checkpoint") else None


def _stage_pretrain(cfg: PipelineConfig, out: Path) -> dict:
    pre_cfg = dataclasses.replace(cfg.pretrain, output=str(out / "pretrain"))
    pre = _finished_stage(out / "pretrain", pre_cfg.max_steps)
    if pre:
        log.info("stage 1/5: pretraining already finished at step %d (%s)", pre["step"], out / "pretrain")
        return pre
    log.info("stage 1/5: pretraining %s with %d Ray Train workers", cfg.pretrain.model, cfg.pretrain.workers)
    return pretrain(pre_cfg)


def _stage_sample(cfg: PipelineConfig, checkpoint: str) -> str:
    from models.common.sampling import SamplingConfig, generate
    from models.io import load_model
    from orchestration.tokenizers import load_tokenizer

    log.info("stage 2/5: sampling from %s", checkpoint)
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    prompt = torch.tensor([tok.encode(cfg.sample_prompt)])
    ids = generate(model, prompt, SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=40,
                                                 seed=0))[0].tolist()
    return cfg.sample_prompt + tok.decode(ids)


def _stage_thermo(cfg: PipelineConfig, out: Path) -> dict:
    from rl.train import PPOSettings, RLTrainConfig, train_ppo

    log.info("stage 3/5: PPO for the thermodynamic controller (%d iterations)", cfg.thermo_iterations)
    seq = 8  # LSTM BPTT length; a minibatch must hold at least one whole sequence
    ppo = PPOSettings(use_lstm=True, lstm_cell_size=32, max_seq_len=seq, fcnet_hiddens=[32],
                      train_batch_size=cfg.thermo_batch, minibatch_size=max(seq, cfg.thermo_batch // 4), num_epochs=4)
    return train_ppo(RLTrainConfig(env="thermo", env_config=cfg.thermo_env, output=str(out / "rl-thermo"),
                                   iterations=cfg.thermo_iterations, checkpoint_every=cfg.thermo_iterations, ppo=ppo))


def _stage_continual(cfg: PipelineConfig, out: Path) -> dict[str, dict]:
    from orchestration.continual import run_continual
    from rl.envs.thermo import env_settings, learned_controller_resolver

    log.info("stage 4/5: held-out continual-learning stream, fixed vs learned controller")
    _, continual = env_settings(cfg.thermo_env)
    results = {}
    for name, controller in (("fixed", None), ("learned", learned_controller_resolver(str(out / "rl-thermo")))):
        run_cfg = dataclasses.replace(continual, output=str(out / f"continual-{name}"), seed=cfg.continual_seed,
                                      controller="fixed" if controller is None else str(out / "rl-thermo"))
        results[name] = run_continual(run_cfg, controller=controller)
    return results


def _plot_returns(run_dir: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["iteration"] for r in rows], [r.get("episode_return_mean") for r in rows], marker="o")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("mean episode return")
    ax.set_title("thermodynamic controller (PPO, LSTM)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_pipeline(cfg: PipelineConfig, quick: bool = False) -> dict:
    out = Path(cfg.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    started = time.time()

    pre = _stage_pretrain(cfg, out)
    sample = _stage_sample(cfg, pre["checkpoint"])
    thermo = _stage_thermo(cfg, out)
    continual = _stage_continual(cfg, out)

    log.info("stage 5/5: writing the report")
    plots = out / "plots"
    loss_png = plot_loss_curves(out / "pretrain", plots / "pretrain_loss.png", f"{cfg.pretrain.model} pretraining")
    returns_png = _plot_returns(out / "rl-thermo", plots / "thermo_returns.png")
    cl_rows = [{"controller": name, **{k: r.get(k) for k in ("avg_final_loss", "forgetting", "backward_transfer",
                                                              "forward_transfer")},
                "mean_k": r["mean_knobs"]["k"], "mean_replay": r["mean_knobs"]["replay_ratio"]}
               for name, r in continual.items()]
    summary = {"profile": "quick" if quick else "default", "wall_s": round(time.time() - started, 1),
               "pretrain": pre, "sample": sample, "thermo_ppo": thermo, "continual": cl_rows}
    report = [
        "# memtrain pipeline report", "",
        f"Profile: {summary['profile']}; wall time {summary['wall_s']} s; output `{out}`.", "",
        "## Pretraining (Ray Train, DDP)", "",
        markdown_table([{"model": cfg.pretrain.model, "workers": cfg.pretrain.workers, **pre}],
                       ["model", "workers", "step", "tokens", "first_eval_loss", "final_eval_loss",
                        "final_eval_perplexity", "tokens_per_s", "mfu"]), "",
        f"![loss curves]({loss_png.relative_to(out)})", "",
        f"Checkpoint: `{pre['checkpoint']}`", "",
        "Sample:", "", "```", sample, "```", "",
        "## Thermodynamic controller (RLlib PPO, LSTM policy)", "",
        markdown_table([thermo], ["iterations", "first_return", "final_return", "wall_s"]), "",
        f"![PPO returns]({returns_png.relative_to(out)})", "",
        "## Continual learning on a held-out stream: fixed vs learned controller", "",
        "Losses are mean test cross-entropy (nats/token) after the last task; forgetting and transfers are in "
        "loss space (forgetting > 0 is worse, BWT < 0 is forgetting).", "",
        markdown_table(cl_rows, ["controller", "avg_final_loss", "forgetting", "backward_transfer",
                                 "forward_transfer", "mean_k", "mean_replay"]), "",
        *[f"![{name} evaluation matrix](continual-{name}/eval_matrix.png) ![{name} knobs](continual-{name}/knobs.png)"
          for name in continual], "",
    ]
    (out / "report.md").write_text("\n".join(report))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    print(f"[memtrain] pipeline done in {summary['wall_s']} s: final eval loss {pre['final_eval_loss']:.4f} "
          f"(from {pre['first_eval_loss']:.4f}); checkpoint {pre['checkpoint']}; report {out / 'report.md'}",
          flush=True)
    return summary
