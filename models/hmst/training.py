"""Training the HMST side networks: the critic on corrupted answers, and the episodic SSM encoder contrastively.

- ``train_critic``: the critic learns to tell a correct answer from a corrupted one (a wrong value of the same
  attribute, or the value of another fact in the context: "swapped facts"), given the question and the retrieved
  facts. It reports AUROC on examples about *held-out entities* (never seen in training). The original HMST
  code defined a critic loss and never called it.
- ``train_memory_encoder`` ("stage 2"): the SSM encoder over the frozen LM token embeddings is trained with a
  symmetric InfoNCE loss on unit-normalised summaries, pairing two disjoint spans of the same real document
  (in-batch negatives). It reports held-out top-1 retrieval accuracy before and after. The original trained on 5
  hard-coded demo pairs with unnormalised dot products, padding without a mask, and a constant "semantic" loss.

Both save with ``save_component`` (safetensors + JSON config, no pickle) and load with ``load_critic`` /
``load_ssm_encoder``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.ssm import SSMConfig, SSMEncoder
from models.hmst.critic import Critic, CriticConfig, pack_segments
from models.hmst.episodic import encode_spans
from models.hmst.facts import ATTRIBUTES, FactWorld, make_names, statement


# --- save / load ------------------------------------------------------------------------------------------------

def save_component(module: nn.Module, kind: str, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``<kind>.safetensors`` and ``<kind>.json`` (config + ``extra`` results), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{kind}.safetensors.tmp"
    safetensors.torch.save_model(module, str(tmp))
    os.replace(tmp, directory / f"{kind}.safetensors")
    tmp = directory / f"{kind}.json.tmp"
    tmp.write_text(json.dumps({"config": dataclasses.asdict(module.cfg), **(extra or {})}, indent=2))
    os.replace(tmp, directory / f"{kind}.json")
    return directory


def _load(kind: str, directory: str | os.PathLike, config_class, build) -> nn.Module:
    directory = Path(directory)
    spec_path, weights = directory / f"{kind}.json", directory / f"{kind}.safetensors"
    if not spec_path.is_file() or not weights.is_file():
        raise ModelError(f"no {kind} in {str(directory)!r}: expected {kind}.json and {kind}.safetensors "
                         f"(written by `memtrain hmst train-{'critic' if kind == 'critic' else 'memory'}`)")
    module = build(config_class(**json.loads(spec_path.read_text())["config"]))
    missing, unexpected = safetensors.torch.load_model(module, str(weights), strict=False)
    if missing or unexpected:
        raise ModelError(f"{weights} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return module.eval()


def load_critic(directory: str | os.PathLike) -> Critic:
    return _load("critic", directory, CriticConfig, Critic)


def load_ssm_encoder(directory: str | os.PathLike) -> SSMEncoder:
    return _load("ssm_encoder", directory, SSMConfig, SSMEncoder)


# --- critic -----------------------------------------------------------------------------------------------------

@dataclass
class CriticTrainConfig:
    """Critic training on the fact-recall task."""

    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 64
    """Examples per step (half correct, half corrupted on average)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    eval_examples: int = 1000
    """Held-out examples (about the world's held-out entities) for the AUROC."""
    max_distractors: int = 2
    """Most other statements next to the relevant one among the facts the critic reads (reached half-way)."""
    seed: int = 0
    """Seed of example sampling and initialisation."""
    critic: CriticConfig = dataclasses.field(default_factory=lambda: CriticConfig(
        d_model=128, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128, dropout=0.0))
    """Critic size (vocab_size is set from the tokenizer)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_examples"):
            if getattr(self, name) < 1:
                raise ModelError(f"CriticTrainConfig.{name} must be >= 1, got {getattr(self, name)}")


def critic_examples(triples: list[tuple[str, str, str]], n: int, rng: random.Random, tokenizer,
                    max_distractors: int) -> tuple[list[tuple[list[int], list[int], list[int]]], list[float]]:
    """``n`` (question, answer, facts) token triples with labels; half correct, a quarter a wrong value of the
    same attribute, a quarter the value of another fact in the context (swapped facts)."""
    examples, labels = [], []
    for _ in range(n):
        entity, attribute, value = rng.choice(triples)
        others = [t for t in rng.sample(triples, min(len(triples), max_distractors + 4))
                  if t[0] != entity][:rng.randint(0, max_distractors)]
        facts = [statement(*t) for t in others] + [statement(entity, attribute, value)]
        rng.shuffle(facts)
        kind = rng.random()
        if kind < 0.5:
            answer, label = value, 1.0
        elif kind < 0.75 or not [t for t in others if t[2] != value]:
            answer, label = rng.choice([v for v in ATTRIBUTES[attribute] if v != value]), 0.0
        else:
            answer, label = rng.choice([t[2] for t in others if t[2] != value]), 0.0
        question = f"what is the {attribute} of {entity}?"
        examples.append((tokenizer.encode(question), tokenizer.encode(" " + answer),
                         tokenizer.encode(" ".join(facts))))
        labels.append(label)
    return examples, labels


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Example::

        >>> auroc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0])), auroc(np.array([0.5, 0.5]), np.array([1, 0]))
        (1.0, 0.5)
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ModelError("AUROC needs both positive and negative examples")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average rank over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def critic_scores(critic: Critic, examples, max_len: int, batch_size: int = 256) -> np.ndarray:
    critic.eval()
    out = [critic(*pack_segments(examples[i:i + batch_size], max_len=max_len)).correctness()
           for i in range(0, len(examples), batch_size)]
    return torch.cat(out).numpy()


def train_critic(world: FactWorld, tokenizer, vocab_size: int, cfg: CriticTrainConfig | None = None,
                 log=print) -> tuple[Critic, dict]:
    """Train a critic; returns it (eval mode) and ``{"auroc", "auroc_before", "accuracy", "steps", ...}``.

    Training examples are about freshly drawn entities and the world's pretraining/context entities; the AUROC is
    measured on the world's semantic-placement entities, which training never shows.
    """
    cfg = cfg or CriticTrainConfig()
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"critic-{cfg.seed}")
    critic_cfg = dataclasses.replace(cfg.critic, vocab_size=vocab_size)
    critic = Critic(critic_cfg)
    held_out = [(f.entity, f.attribute, f.value) for f in world.by_placement("semantic")]
    train_triples = [(f.entity, f.attribute, f.value) for f in world.facts if f.placement != "semantic"]
    for name in make_names(rng, 400, taken=set(world.entities)):
        attribute = rng.choice(sorted(ATTRIBUTES))
        train_triples.append((name, attribute, rng.choice(ATTRIBUTES[attribute])))
    if len(held_out) < 2:
        raise ModelError("the fact world has fewer than 2 semantic-placement facts to evaluate the critic on; "
                         "raise FactConfig.n_entities")
    eval_examples, eval_labels = critic_examples(held_out, cfg.eval_examples, rng, tokenizer, cfg.max_distractors)
    max_len = critic_cfg.max_seq_len
    before = auroc(critic_scores(critic, eval_examples, max_len), np.array(eval_labels))
    optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.lr, weight_decay=0.01)
    for step in range(1, cfg.steps + 1):
        critic.train()
        # curriculum: single-fact contexts first (the critic learns to compare answer and fact value), then up
        # to max_distractors other facts by half-way (from the start, 600 steps did not get past chance)
        distractors = min(cfg.max_distractors, int((cfg.max_distractors + 1) * step / (0.5 * cfg.steps)))
        examples, labels = critic_examples(train_triples, cfg.batch_size, rng, tokenizer, distractors)
        loss = Critic.loss(critic(*pack_segments(examples, max_len=max_len)), torch.tensor(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        optimizer.step()
        if log and (step % 100 == 0 or step == cfg.steps):
            log(f"[memtrain hmst] critic step {step} | loss {loss.item():.4f}")
    scores = critic_scores(critic, eval_examples, max_len)
    labels = np.array(eval_labels)
    result = {"auroc": auroc(scores, labels), "auroc_before": before,
              "accuracy": float(((scores > 0.5) == labels.astype(bool)).mean()), "steps": cfg.steps,
              "eval_examples": cfg.eval_examples}
    return critic.eval(), result


# --- episodic encoder ("stage 2") --------------------------------------------------------------------------------

@dataclass
class MemoryTrainConfig:
    """Contrastive training of the episodic SSM encoder."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 32
    """Span pairs per step (each pair's partner is the positive, the other pairs are negatives)."""
    span_tokens: int = 48
    """Tokens per span (two disjoint spans per document)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    temperature: float = 0.05
    """InfoNCE temperature on cosine similarities."""
    eval_pairs: int = 256
    """Held-out pairs (from validation documents) for top-1 retrieval accuracy."""
    seed: int = 0
    """Seed of span sampling and initialisation."""
    ssm: SSMConfig = dataclasses.field(default_factory=SSMConfig)
    """Encoder shape (d_model is set from the LM)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "span_tokens", "eval_pairs"):
            if getattr(self, name) < 1:
                raise ModelError(f"MemoryTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ModelError(f"MemoryTrainConfig.temperature must be > 0, got {self.temperature}")


def span_pairs(token_docs: list[list[int]], n: int, span: int, rng: random.Random) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` pairs of disjoint ``span``-token windows, both from the same document (documents of >= 2 spans)."""
    usable = [d for d in token_docs if len(d) >= 2 * span]
    if not usable:
        raise ModelError(f"no document has {2 * span} tokens for a span pair; lower span_tokens or use longer texts")
    first, second = [], []
    for doc in (rng.choice(usable) for _ in range(n)):
        a = rng.randint(0, len(doc) - 2 * span)
        b = rng.randint(a + span, len(doc) - span)
        pair = [torch.tensor(doc[a:a + span]), torch.tensor(doc[b:b + span])]
        rng.shuffle(pair)
        first.append(pair[0])
        second.append(pair[1])
    return first, second


def info_nce(a_ND: torch.Tensor, b_ND: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE on unit-normalised embeddings: pair i is the positive of row i, the rest negatives."""
    logits_NN = F.normalize(a_ND, dim=-1) @ F.normalize(b_ND, dim=-1).T / temperature
    targets_N = torch.arange(a_ND.size(0))
    return 0.5 * (F.cross_entropy(logits_NN, targets_N) + F.cross_entropy(logits_NN.T, targets_N))


@torch.no_grad()
def retrieval_accuracy(encoder: SSMEncoder, embed: nn.Embedding, first, second, chunk: int = 64) -> float:
    """Top-1 accuracy of finding each span's partner among ``chunk`` candidates (the other pairs of its chunk)."""
    encoder.eval()
    hits = total = 0
    for i in range(0, len(first), chunk):
        a_ND = F.normalize(encode_spans(encoder, embed, first[i:i + chunk]), dim=-1)
        b_ND = F.normalize(encode_spans(encoder, embed, second[i:i + chunk]), dim=-1)
        hits += int(((a_ND @ b_ND.T).argmax(-1) == torch.arange(a_ND.size(0))).sum())
        total += a_ND.size(0)
    return hits / total


def train_memory_encoder(embed: nn.Embedding, train_docs: list[list[int]], eval_docs: list[list[int]],
                         cfg: MemoryTrainConfig | None = None, encoder: SSMEncoder | None = None,
                         log=print) -> tuple[SSMEncoder, dict]:
    """Train (or continue training) the episodic SSM encoder on tokenized documents; the LM embedding is frozen.

    Returns the encoder (eval mode) and ``{"top1_before", "top1_after", "final_loss", "steps"}``.
    """
    cfg = cfg or MemoryTrainConfig()
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"memory-{cfg.seed}")
    d = embed.weight.size(1)
    encoder = encoder or SSMEncoder(dataclasses.replace(cfg.ssm, d_model=d, head_dim=min(cfg.ssm.head_dim, d)))
    if encoder.cfg.d_model != d:
        raise ModelError(f"encoder width {encoder.cfg.d_model} != LM embedding width {d}")
    embed.requires_grad_(False)
    eval_first, eval_second = span_pairs(eval_docs, cfg.eval_pairs, cfg.span_tokens, rng)
    before = retrieval_accuracy(encoder, embed, eval_first, eval_second)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=0.01)
    loss = torch.tensor(float("nan"))
    for step in range(1, cfg.steps + 1):
        encoder.train()
        first, second = span_pairs(train_docs, cfg.batch_size, cfg.span_tokens, rng)
        ids_a, ids_b = torch.stack(first), torch.stack(second)  # equal lengths: no padding needed
        loss = info_nce(encoder.summarize(embed(ids_a)), encoder.summarize(embed(ids_b)), cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        if log and (step % 50 == 0 or step == cfg.steps):
            log(f"[memtrain hmst] memory step {step} | loss {loss.item():.4f}")
    after = retrieval_accuracy(encoder, embed, eval_first, eval_second)
    return encoder.eval(), {"top1_before": before, "top1_after": after, "final_loss": loss.item(),
                            "steps": cfg.steps, "eval_pairs": cfg.eval_pairs}
