"""``memtrain pipeline``: the system end to end on a local Ray cluster, with a report at the end.

Stages (each resumes when the pipeline is re-run with the same output directory):

1. pretrain a model with Ray Train (2 DDP workers) on the offline built-in corpus;
2. sample text from the final checkpoint through the KV-cache generator;
3. write ``report.md``, ``plots/`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestration.config import to_yaml
from orchestration.pretrain import PretrainConfig, pretrain
from orchestration.report import markdown_table, plot_loss_curves

log = logging.getLogger(__name__)

# the --quick profile: a few steps of every stage, for tests and a first look
QUICK_OVERRIDES = ["pretrain.max_steps=30", "pretrain.eval_every=10", "pretrain.checkpoint_every=30",
                   "pretrain.log_every=10", "pretrain.model_overrides.n_layers=2", "pretrain.data.seq_len=64",
                   "pretrain.data.vocab_size=1024"]


@dataclass
class PipelineConfig:
    output: str = "runs/pipeline"
    """Pipeline directory: report.md, summary.json, plots/, and one sub-directory per stage."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The pretraining stage (its output is set to <output>/pretrain)."""
    sample_prompt: str = "The list"
    """Prompt of the text sample shown in the report."""
    sample_tokens: int = 48
    """Tokens to generate for the sample."""


def _finished_stage(stage_dir: Path, max_steps: int) -> dict | None:
    """The summary of a stage that already ran to ``max_steps`` in ``stage_dir`` (so a re-run skips it)."""
    path = stage_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("step") == max_steps and summary.get("checkpoint") else None


def run_pipeline(cfg: PipelineConfig, quick: bool = False) -> dict:
    from models.common.sampling import SamplingConfig, generate
    from models.io import load_model
    from orchestration.tokenizers import load_tokenizer

    out = Path(cfg.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    started = time.time()

    pre_cfg = dataclasses.replace(cfg.pretrain, output=str(out / "pretrain"))
    pre = _finished_stage(out / "pretrain", pre_cfg.max_steps)
    if pre:
        log.info("stage 1/3: pretraining already finished at step %d (%s)", pre["step"], out / "pretrain")
    else:
        log.info("stage 1/3: pretraining %s with %d Ray Train workers", cfg.pretrain.model, cfg.pretrain.workers)
        pre = pretrain(pre_cfg)

    log.info("stage 2/3: sampling from %s", pre["checkpoint"])
    model = load_model(pre["checkpoint"])
    tok = load_tokenizer(pre["checkpoint"])
    prompt = torch.tensor([tok.encode(cfg.sample_prompt)])
    sample_ids = generate(model, prompt, SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8,
                                                        top_k=40, seed=0))[0].tolist()
    sample = cfg.sample_prompt + tok.decode(sample_ids)

    log.info("stage 3/3: writing the report")
    plot = plot_loss_curves(out / "pretrain", out / "plots" / "pretrain_loss.png", f"{cfg.pretrain.model} pretraining")
    summary = {"profile": "quick" if quick else "default", "wall_s": round(time.time() - started, 1),
               "pretrain": pre, "sample": sample}
    report = [
        "# memtrain pipeline report", "",
        f"Profile: {summary['profile']}; wall time {summary['wall_s']} s; output `{out}`.", "",
        "## Pretraining", "",
        markdown_table([{"model": cfg.pretrain.model, "workers": cfg.pretrain.workers, **pre}],
                       ["model", "workers", "step", "tokens", "first_eval_loss", "final_eval_loss",
                        "final_eval_perplexity", "tokens_per_s", "mfu"]), "",
        f"![loss curves]({plot.relative_to(out)})", "",
        f"Checkpoint: `{pre['checkpoint']}`", "",
        "## Sample", "", "```", sample, "```", "",
    ]
    (out / "report.md").write_text("\n".join(report))
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    os.replace(tmp, out / "summary.json")
    print(f"[memtrain] pipeline done in {summary['wall_s']} s: final eval loss {pre['final_eval_loss']:.4f} "
          f"(from {pre['first_eval_loss']:.4f}); checkpoint {pre['checkpoint']}; report {out / 'report.md'}",
          flush=True)
    return summary
