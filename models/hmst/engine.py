"""The HMST inference engine: one LM, an episodic SSM memory, a semantic memory client, a critic, and 5 gates.

Per query the five decisions (``Decisions``: early exit, episodic retrieval, semantic retrieval, expert bias,
verification) come from the caller, from a ``MetaController`` or from the RL env. What each one does here, and
what the original HMST code did instead:

- **early exit** decodes with the first ``exit_layer`` blocks and the exit head only (``HMSTLM.early_exit``); the
  FLOPs estimate counts the skipped blocks as skipped (the original ran the full model on its "early exit" path);
- **episodic / semantic retrieval** put the *real* retrieved text into a ``context:`` line of the prompt (the
  original appended ``"<memory_i>"`` placeholders). The semantic memory is anything with the memory-service
  client methods (``search``/``add``/``stats``), so ``LocalMemory`` and the shared Ray actor both work;
- **expert bias** adds a router-logit bias to the chosen expert in every MoE layer while this query decodes;
- **verification** scores (query, response, retrieved facts) with the critic; below ``verify_threshold`` the
  ``fallback`` runs: ``retrieve`` re-answers with both retrievals on, ``abstain`` returns an empty answer.

The response excludes the prompt and stops at the first newline. Every result carries its cost: a FLOPs estimate
of every forward pass it made (LM, critic, SSM encoder) and the wall time.

Semantic memory vectors come from one ``LexicalEmbedder`` (a random projection of the text's bag of tokens, unit
length; by default d_model wide), used both to fill the memory and to query it. The episodic memory stores SSM-encoder summaries
(``models.hmst.episodic``). A ``Session`` carries recent context lines and its own episodic memory from query to
query, and can consolidate important episodic entries into the semantic memory every N queries.

Example::

    >>> import numpy as np, tempfile
    >>> from memory_service import LocalMemory, MemoryConfig
    >>> from models.registry import build_model
    >>> from orchestration.data.tokenizers import ByteTokenizer
    >>> torch.manual_seed(0) is not None
    True
    >>> model, tok = build_model("hmst-micro", vocab_size=256), ByteTokenizer()
    >>> engine = HMSTEngine(model, tok, semantic_memory=LocalMemory(MemoryConfig(dim=128)))
    >>> engine.fill_semantic(["the color of Bavik is red."])
    1
    >>> session = engine.session()
    >>> result = session.ask("what is the color of Bavik?", Decisions(semantic=True))
    >>> result.retrieved, result.flops > 0
    (['the color of Bavik is red.'], True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.sampling import SamplingConfig, sample_next
from models.common.ssm import SSMConfig, SSMEncoder
from models.hmst.critic import Critic, pack_segments
from models.hmst.episodic import EpisodicMemory, encode_spans
from models.hmst.facts import qa_line
from models.hmst.meta_controller import MetaController, state_features

FALLBACKS = ("retrieve", "abstain", "none")


@dataclass
class EngineConfig:
    """How the engine answers."""

    max_new_tokens: int = 6
    """Longest answer in tokens (decoding also stops at the first newline)."""
    temperature: float = 0.0
    """Sampling temperature of the answer; 0 = greedy."""
    episodic_k: int = 2
    """Episodic entries retrieved when the episodic gate is on."""
    semantic_k: int = 1
    """Semantic-memory hits retrieved when the semantic gate is on (1: a small LM copies best from one fact)."""
    verify_threshold: float = 0.5
    """Critic correctness below this triggers the fallback."""
    fallback: str = "retrieve"
    """What a failed verification does: retrieve (re-answer with both retrievals on), abstain, or none."""
    bias_strength: float = 2.0
    """Router-logit bias given to the chosen expert (a MetaController's own bias_strength wins when present)."""
    context_turns: int = 4
    """Recent session lines (told statements and past question/answer turns) kept verbatim in the prompt."""
    episodic_capacity: int = 64
    """Entries of a session's episodic memory (oldest evicted first)."""
    consolidate_every: int = 0
    """Consolidate the session's important episodic entries into the semantic memory every N queries; 0 = never."""
    consolidate_threshold: float = 0.9
    """Minimum importance of an episodic entry to be consolidated (told statements have importance 1)."""
    semantic_fill_scale: int = 1000
    """Semantic-memory entries that count as "full" in the state summary (fill = min(1, count / scale))."""

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise ModelError(f"EngineConfig.fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        for name in ("max_new_tokens", "episodic_k", "semantic_k", "episodic_capacity", "semantic_fill_scale"):
            if getattr(self, name) < 1:
                raise ModelError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("context_turns", "consolidate_every", "temperature"):
            if getattr(self, name) < 0:
                raise ModelError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.verify_threshold <= 1.0:
            raise ModelError(f"EngineConfig.verify_threshold must be in [0, 1], got {self.verify_threshold}")


@dataclass
class Decisions:
    """The five per-query decisions; ``expert`` 0 means no bias, e >= 1 biases expert e - 1."""

    early_exit: bool = False
    """Decode with the early-exit head (first exit_layer blocks only)."""
    episodic: bool = False
    """Retrieve from the session's episodic memory into the context."""
    semantic: bool = False
    """Retrieve from the semantic memory into the context."""
    expert: int = 0
    """0 = no expert bias; e >= 1 adds bias_strength to expert e - 1's router logits."""
    verify: bool = False
    """Score the answer with the critic (and fall back below the threshold)."""

    ORDER = ("early_exit", "episodic", "semantic", "expert", "verify")  # the env's MultiDiscrete layout

    @classmethod
    def from_array(cls, action) -> "Decisions":
        """From the env's action vector [early_exit, episodic, semantic, expert, verify]."""
        values = [int(v) for v in np.asarray(action).reshape(-1)]
        if len(values) != 5:
            raise ModelError(f"an action has 5 entries {cls.ORDER}, got {len(values)}: {values}")
        return cls(bool(values[0]), bool(values[1]), bool(values[2]), values[3], bool(values[4]))

    def to_array(self) -> np.ndarray:
        return np.array([int(getattr(self, name)) for name in self.ORDER], dtype=np.int64)


@dataclass
class EngineResult:
    """One answered query."""

    response: str
    """The answer without the prompt ("" when the engine abstained)."""
    decisions: Decisions
    """The decisions the answer was made with (before any fallback)."""
    flops: float
    """FLOPs estimate of every forward pass made for this query (LM, critic, SSM encoder)."""
    wall_s: float
    """Wall time of ``answer``."""
    confidence: float
    """The critic's correctness probability when it verified, else the LM's own (geometric-mean token probability)."""
    verified: bool
    """Whether the critic scored the answer."""
    retrieved: list[str] = field(default_factory=list)
    """Texts put into the context (episodic first, then semantic)."""
    fallback: str | None = None
    """The fallback that ran (retrieve or abstain), if any."""
    abstained: bool = False
    """True when the engine declined to answer."""
    prompt_tokens: int = 0
    """Tokens in the (final) prompt."""


@dataclass
class Observation:
    """What a controller sees before deciding: the query embedding and the state summary."""

    query_D: np.ndarray
    """Unit-length query embedding (the semantic embedder's), float32."""
    state_F: np.ndarray
    """``STATE_FEATURES`` in [0, 1]: uncertainty, context fraction, episodic fill, semantic fill, last confidence."""
    flops: float
    """FLOPs of the uncertainty probe (the exit head on the bare question)."""


class LexicalEmbedder:
    """Texts -> unit-length mean of fixed random unit vectors, one per token id: float32 (N, dim).

    The one embedder for the semantic memory: the engine fills and queries with it. It is a random projection of
    the text's bag of tokens, so cosine similarity tracks shared tokens (a fact and a question about it share
    their entity and attribute). Why not the LM's own mean-pooled token embeddings: on the fact-recall task they
    put the right fact first for 25% of questions (52% in the top 3), this embedder for 98% (100%), because the
    LM's embeddings of frequent words ("the", "of", "is") crowd out the rare entity tokens.

    Example::

        >>> from orchestration.data.tokenizers import ByteTokenizer
        >>> emb = LexicalEmbedder(ByteTokenizer(), vocab_size=256, dim=64)
        >>> v_ND = emb.embed(["the color of Bavik", "the color of Bavik is red.", "zzz"])
        >>> v_ND.shape, bool(v_ND[0] @ v_ND[1] > v_ND[0] @ v_ND[2])
        ((3, 64), True)
    """

    def __init__(self, tokenizer, vocab_size: int, dim: int = 128, seed: int = 0):
        if vocab_size < 1 or dim < 1:
            raise ModelError(f"LexicalEmbedder needs vocab_size >= 1 and dim >= 1, got {vocab_size} and {dim}")
        self.tokenizer = tokenizer
        self.dim = dim
        # which embedder filled a memory: vectors of another tokenizer or seed are meaningless to this one
        self.signature = hashlib.sha1(f"{tokenizer.to_json()}|{vocab_size}|{dim}|{seed}".encode()).hexdigest()[:12]
        generator = torch.Generator().manual_seed(seed)
        self.table_VD = F.normalize(torch.randn(vocab_size, dim, generator=generator), dim=-1)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts or any(not t.strip() for t in texts):
            raise ModelError("embed needs a non-empty list of non-empty texts")
        spans = [torch.tensor(ids, dtype=torch.long) for ids in self.tokenizer.encode_batch(texts)]
        if max(int(s.max()) for s in spans) >= self.table_VD.size(0):
            raise ModelError(f"token ids reach beyond the embedder's vocabulary {self.table_VD.size(0)}; build it "
                             "with the tokenizer's vocabulary size")
        ids_NT = nn.utils.rnn.pad_sequence(spans, batch_first=True)
        mask_NT1 = (torch.arange(ids_NT.size(1)) < torch.tensor([s.numel() for s in spans])[:, None])[..., None]
        mean_ND = (self.table_VD[ids_NT] * mask_NT1).sum(1) / mask_NT1.sum(1)
        return F.normalize(mean_ND, dim=-1).numpy().astype(np.float32)


# --- FLOPs estimates (forward passes only; 2 FLOPs per multiply-add) -------------------------------------------

def lm_forward_flops(model: nn.Module, n_blocks: int, n_new: int, n_past: int) -> float:
    """FLOPs of running ``n_new`` tokens through the first ``n_blocks`` blocks + the output head, after ``n_past``
    cached tokens: matmuls with active experts only, plus causal attention scores and values."""
    cfg = model.cfg
    per_block = 4 * cfg.d_model ** 2 + model.active_ffn_params() / cfg.n_layers + cfg.d_model * getattr(cfg, "n_experts", 0)
    matmul = 2 * n_new * (n_blocks * per_block + cfg.d_model * cfg.vocab_size)
    attended = n_new * n_past + n_new * (n_new + 1) / 2
    return float(matmul + 4 * n_blocks * cfg.d_model * attended)


def critic_flops(critic: Critic, n_tokens: int) -> float:
    cfg = critic.cfg
    matmul = 2 * n_tokens * cfg.n_layers * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.d_ff)
    return float(matmul + 4 * cfg.n_layers * cfg.d_model * n_tokens ** 2)


def module_flops(module: nn.Module, n_tokens: int) -> float:
    """2 x parameters x tokens: the estimate for the SSM encoder (its scan is cheap next to its projections)."""
    return float(2 * n_tokens * sum(p.numel() for p in module.parameters()))


# --- the engine -------------------------------------------------------------------------------------------------

class HMSTEngine:
    """Answers queries with an ``HMSTLM`` and whichever memories and critic it was given (each is optional).

    ``semantic_memory``: a memory-service client (LocalMemory or MemoryClient) whose dim equals the embedder's.
    ``episodic_encoder``: the SSM encoder of the episodic memory (a fresh one of the LM's width when None; load a
    fine-tuned one with ``models.hmst.training.load_ssm_encoder``). ``meta_controller`` decides when ``answer``
    gets no decisions.
    """

    def __init__(self, model: nn.Module, tokenizer, semantic_memory=None, critic: Critic | None = None,
                 episodic_encoder: SSMEncoder | None = None, embedder: LexicalEmbedder | None = None,
                 meta_controller: MetaController | None = None, config: EngineConfig | None = None):
        if not hasattr(model, "set_expert_bias"):
            raise ModelError(f"HMSTEngine needs an HMST model (HMSTLM), got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.embedder = embedder or LexicalEmbedder(tokenizer, model.cfg.vocab_size, model.cfg.d_model)
        self.semantic_memory = semantic_memory
        if semantic_memory is not None:
            dim = _memory_dim(semantic_memory)
            if dim is not None and dim != self.embedder.dim:
                raise ModelError(f"the semantic memory holds {dim}-d vectors but the embedder makes "
                                 f"{self.embedder.dim}-d ones; create the memory with dim={self.embedder.dim}")
        self.critic = critic.eval() if critic is not None else None
        if critic is not None and critic.cfg.vocab_size != model.cfg.vocab_size:
            raise ModelError(f"critic vocabulary {critic.cfg.vocab_size} != LM vocabulary {model.cfg.vocab_size}; "
                             "train the critic with the LM's tokenizer")
        d = model.cfg.d_model
        self.episodic_encoder = (episodic_encoder or SSMEncoder(SSMConfig(d_model=d, head_dim=min(64, d)))).eval()
        if self.episodic_encoder.cfg.d_model != d:
            raise ModelError(f"episodic encoder width {self.episodic_encoder.cfg.d_model} != LM d_model {d}")
        self.meta_controller = meta_controller.eval() if meta_controller is not None else None
        self._default_session: Session | None = None

    # --- sessions and memories ---
    def session(self) -> "Session":
        """A new session: empty recent context and a fresh episodic memory."""
        return Session(self)

    def answer(self, query: str, decisions: Decisions | None = None) -> EngineResult:
        """Answer in the engine's default session (see ``Session.ask``)."""
        if self._default_session is None:
            self._default_session = self.session()
        return self._default_session.ask(query, decisions)

    def fill_semantic(self, texts: list[str], metadata: list[dict | None] | None = None, key: str | None = None) -> int:
        """Embed ``texts`` with the engine's embedder and add them to the semantic memory; returns how many.

        Each entry's metadata records the embedder's ``signature`` (see ``foreign_semantic_memory``). ``key`` is the
        add's idempotency key: fills under one key (from several processes at once) are applied once."""
        if self.semantic_memory is None:
            raise ModelError("this engine has no semantic memory; pass semantic_memory= to HMSTEngine")
        metadata = [{**(m or {}), "embedder": self.embedder.signature} for m in (metadata or [None] * len(texts))]
        ids = self.semantic_memory.add(self.embedder.embed(texts), list(texts), metadata, key=key)
        return len(ids)

    def foreign_semantic_memory(self) -> str | None:
        """The embedder signature a non-empty semantic memory was filled with, when it is not this engine's (its
        vectors would then be searched with unrelated queries); None when they match or the memory is empty."""
        if not self.semantic_count():
            return None
        hits = self.semantic_memory.search(self.embedder.embed(["probe"]), 1)
        found = (hits.metadata[0][0] or {}).get("embedder")
        return None if found == self.embedder.signature else str(found)

    def semantic_count(self) -> int:
        return 0 if self.semantic_memory is None else int(self.semantic_memory.stats()["count"])

    # --- internals used by Session ---
    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ModelError("the query is empty; pass some text")
        return ids

    @torch.no_grad()
    def _uncertainty(self, query: str) -> tuple[float, float]:
        """Normalised next-token entropy at the end of the bare question prompt, and the probe's FLOPs."""
        ids = self._encode(qa_line(query))[-self.model.cfg.max_seq_len:]
        n_blocks = self.model.cfg.exit_layer or self.model.cfg.n_layers
        logits_V = self.model(torch.tensor([ids]), exit_early=bool(self.model.cfg.exit_layer)).logits[0, -1].float()
        entropy = -(logits_V.log_softmax(-1) * logits_V.softmax(-1)).sum()
        return float(entropy / math.log(logits_V.numel())), lm_forward_flops(self.model, n_blocks, len(ids), 0)

    @torch.no_grad()
    def _decode(self, prompt_ids: list[int], early_exit: bool) -> tuple[str, list[int], float, float]:
        """Greedy/sampled answer until a newline: (text, token ids, mean log-prob, FLOPs)."""
        cfg = self.config
        step_model = self.model.early_exit() if early_exit else self.model
        n_blocks = self.model.cfg.exit_layer if early_exit else self.model.cfg.n_layers
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        state = step_model.new_state(1, len(prompt_ids) + cfg.max_new_tokens)
        logits_V = step_model.step(torch.tensor([prompt_ids]), state)[0, -1]
        flops = lm_forward_flops(self.model, n_blocks, len(prompt_ids), 0)
        new_ids, log_probs = [], []
        for i in range(cfg.max_new_tokens):
            token = int(sample_next(logits_V[None], sampling)[0])
            new_ids.append(token)
            log_probs.append(float(logits_V.float().log_softmax(-1)[token]))
            if "\n" in self.tokenizer.decode(new_ids) or i + 1 == cfg.max_new_tokens:
                break  # stopping at the newline is a real saving: no forward pass for tokens never needed
            logits_V = step_model.step(torch.tensor([[token]]), state)[0, -1]
            flops += lm_forward_flops(self.model, n_blocks, 1, len(prompt_ids) + i)
        text = self.tokenizer.decode(new_ids).split("\n", 1)[0].strip()
        return text, new_ids, sum(log_probs) / len(log_probs), flops

    @torch.no_grad()
    def _verify(self, query: str, response: str, facts: list[str]) -> tuple[float, float]:
        """Critic correctness probability of (query, response, facts) and its FLOPs."""
        max_len = self.critic.cfg.max_seq_len
        query_ids = self._encode(query)
        response_ids = self.tokenizer.encode(response)[:max_len // 2] if response else []
        fact_ids = self.tokenizer.encode(" ".join(facts)) if facts else []
        batch = pack_segments([(query_ids, response_ids, fact_ids)], max_len=max_len)
        return float(self.critic(*batch).correctness()[0]), critic_flops(self.critic, batch[0].size(1))

    def _expert_bias(self, expert: int) -> torch.Tensor | None:
        n_experts = self.model.cfg.n_experts
        if not 0 <= expert <= n_experts:
            raise ModelError(f"expert choice must be in [0, {n_experts}] (0 = no bias), got {expert}")
        if expert == 0:
            return None
        strength = self.meta_controller.cfg.bias_strength if self.meta_controller else self.config.bias_strength
        bias_E = torch.zeros(n_experts)
        bias_E[expert - 1] = strength
        return bias_E


def _memory_dim(memory) -> int | None:
    try:
        return int(memory.stats()["dim"])
    except (KeyError, TypeError):
        return None


class Session:
    """Several queries whose recent context and episodic memory carry over (one RL episode).

    ``tell(text)`` adds a statement to the context (and to episodic memory, importance 1); ``ask(query)`` answers
    and records the turn (importance = the answer's confidence).
    """

    def __init__(self, engine: HMSTEngine):
        self.engine = engine
        cfg = engine.config
        self.episodic = EpisodicMemory(cfg.episodic_capacity, engine.model.cfg.d_model)
        self.recent: list[str] = []
        self.last_confidence = 0.5
        self.queries = 0
        self.consolidated: list[int] = []
        """Semantic-memory ids this session consolidated."""

    def tell(self, text: str) -> None:
        """Put a statement into the session's recent context and episodic memory."""
        self._remember(text, importance=1.0)

    def _remember(self, text: str, importance: float) -> None:
        engine = self.engine
        self.recent = (self.recent + [text])[-max(engine.config.context_turns, 1):]
        span = torch.tensor(engine._encode(text)[-engine.model.cfg.max_seq_len:])
        summary = encode_spans(engine.episodic_encoder, engine.model.tok_emb, [span])
        self.episodic.add(summary, [span], texts=[text], importance=[importance])

    def observe(self, query: str) -> Observation:
        """The meta-controller's input for ``query``: query embedding and state summary."""
        engine = self.engine
        uncertainty, flops = engine._uncertainty(query)
        prompt_len = len(engine._encode("\n".join(self._recent_lines() + [qa_line(query)])))
        state_F = state_features(
            uncertainty=[min(max(uncertainty, 0.0), 1.0)],
            context_fraction=[min(1.0, prompt_len / engine.model.cfg.max_seq_len)],
            episodic_fill=[len(self.episodic) / self.episodic.capacity],
            semantic_fill=[min(1.0, engine.semantic_count() / engine.config.semantic_fill_scale)],
            last_confidence=[self.last_confidence])[0]
        return Observation(engine.embedder.embed([query])[0], state_F.numpy().astype(np.float32), flops)

    def _recent_lines(self) -> list[str]:
        turns = self.engine.config.context_turns
        return self.recent[-turns:] if turns else []

    @torch.no_grad()
    def ask(self, query: str, decisions: Decisions | None = None) -> EngineResult:
        """Answer ``query``; ``decisions`` None asks the meta-controller (deterministic), else retrieves everything."""
        engine, cfg = self.engine, self.engine.config
        started = time.perf_counter()
        flops = 0.0
        if decisions is None:
            decisions, flops = self._decide(query)
        result = self._answer_once(query, decisions)
        result.flops += flops
        if decisions.verify and engine.critic is not None:
            confidence, verify_flops = engine._verify(query, result.response, result.retrieved)
            result.flops += verify_flops
            result.confidence, result.verified = confidence, True
            if confidence < cfg.verify_threshold and cfg.fallback == "retrieve" and not (
                    decisions.episodic and decisions.semantic and not decisions.early_exit):
                retry = self._answer_once(query, dataclasses.replace(decisions, early_exit=False, episodic=True,
                                                                     semantic=True))
                confidence, verify_flops = engine._verify(query, retry.response, retry.retrieved)
                retry.flops += result.flops + verify_flops
                retry.confidence, retry.verified, retry.fallback = confidence, True, "retrieve"
                retry.decisions = decisions
                result = retry
            elif confidence < cfg.verify_threshold and cfg.fallback == "abstain":
                result.response, result.abstained, result.fallback = "", True, "abstain"
        self.queries += 1
        self.last_confidence = result.confidence
        if result.response:
            self._remember(qa_line(query, result.response), importance=result.confidence)
        if cfg.consolidate_every and engine.semantic_memory is not None and self.queries % cfg.consolidate_every == 0:
            self.consolidated += consolidate(self.episodic, engine.semantic_memory, engine.embedder,
                                             cfg.consolidate_threshold, {"session_query": self.queries})
        result.wall_s = time.perf_counter() - started
        return result

    def _decide(self, query: str) -> tuple[Decisions, float]:
        engine = self.engine
        if engine.meta_controller is None:
            return Decisions(episodic=True, semantic=engine.semantic_memory is not None,
                             verify=engine.critic is not None), 0.0
        obs = self.observe(query)
        decision = engine.meta_controller.act(torch.from_numpy(obs.query_D)[None], torch.from_numpy(obs.state_F)[None],
                                              deterministic=True)
        a = {name: int(v[0]) for name, v in decision.actions.items()}
        return Decisions(bool(a["early_exit"]), bool(a["episodic"]), bool(a["semantic"]), a["expert"],
                         bool(a["verify"])), obs.flops

    def _answer_once(self, query: str, decisions: Decisions) -> EngineResult:
        engine, cfg = self.engine, self.engine.config
        flops, retrieved = 0.0, []
        if decisions.episodic and len(self.episodic):
            span = torch.tensor(engine._encode(query))
            summary = encode_spans(engine.episodic_encoder, engine.model.tok_emb, [span])
            flops += module_flops(engine.episodic_encoder, span.numel())
            retrieved += [e.text for e in self.episodic.retrieve(summary[0], k=cfg.episodic_k)[0] if e.text]
        if decisions.semantic and engine.semantic_memory is not None:
            hits = engine.semantic_memory.search(engine.embedder.embed([query]), cfg.semantic_k)
            retrieved += [h.text for h in hits.query(0) if h.text]
        retrieved = list(dict.fromkeys(retrieved))  # an entry found by both memories appears once
        prompt = "\n".join(self._recent_lines() + [qa_line(query, context=retrieved)])
        max_prompt = engine.model.cfg.max_seq_len - cfg.max_new_tokens
        prompt_ids = engine._encode(prompt)[-max_prompt:]  # the question is at the end: cut the oldest context
        engine.model.set_expert_bias(engine._expert_bias(decisions.expert))
        try:
            response, _, mean_log_prob, decode_flops = engine._decode(prompt_ids, decisions.early_exit)
        finally:
            engine.model.set_expert_bias(None)
        return EngineResult(response=response, decisions=decisions, flops=flops + decode_flops, wall_s=0.0,
                            confidence=math.exp(mean_log_prob), verified=False, retrieved=retrieved,
                            prompt_tokens=len(prompt_ids))


def consolidate(episodic: EpisodicMemory, semantic_memory, embedder: LexicalEmbedder, threshold: float = 0.9,
                provenance: dict | None = None) -> list[int]:
    """Move episodic entries with importance >= ``threshold`` (and a text) into the semantic memory.

    Each moved entry keeps its real text; its metadata records where it came from (``source``, ``episodic_id``,
    ``importance`` and the given ``provenance``). The entries leave the episodic memory only after the semantic
    memory acknowledged the write. Returns the new semantic ids.

    Example::

        >>> from memory_service import LocalMemory, MemoryConfig
        >>> from models.registry import build_model
        >>> from orchestration.data.tokenizers import ByteTokenizer
        >>> engine = HMSTEngine(build_model("hmst-micro", vocab_size=256), ByteTokenizer(),
        ...                     semantic_memory=LocalMemory(MemoryConfig(dim=128)))
        >>> session = engine.session()
        >>> session.tell("the color of Bavik is red.")
        >>> ids = consolidate(session.episodic, engine.semantic_memory, engine.embedder)
        >>> engine.semantic_memory.get(ids)[0][0], len(session.episodic)
        ('the color of Bavik is red.', 0)
    """
    entries = [e for e in episodic.entries(threshold) if e.text]
    if not entries:
        return []
    texts = [e.text for e in entries]
    metadata = [{"source": "episodic", "episodic_id": e.id, "importance": round(e.importance, 4),
                 **(provenance or {})} for e in entries]
    ids = semantic_memory.add(embedder.embed(texts), texts, metadata)
    episodic.remove([e.id for e in entries])
    return [int(i) for i in ids]
