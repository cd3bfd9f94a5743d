"""MetaControllerEnv: the HMST inference engine on the fact-recall task, as a gymnasium env for RLlib PPO.

One episode is one engine ``Session``: a few context-placement facts are told first, then ``queries`` questions
follow (a mix of facts that live only in the semantic memory, in the session's recent context / episodic memory,
or only in the LM's pretraining data). The context and episodic memory carry over from step to step, so what the
policy retrieves or skips has consequences later (a told fact scrolls out of the recent lines and is then only
reachable through episodic retrieval).

- observation (Box, float32): the query embedding through a fixed random projection (``query_dims`` values), the
  state summary (uncertainty, context fraction, episodic fill, semantic fill, last confidence) and the fraction
  of the episode done;
- action (MultiDiscrete ``[2, 2, 2, n_experts + 1, 2]``): early exit, episodic, semantic, expert bias (0 = none),
  verify;
- reward: ``correct - cost_weight * flops / reference_flops - calibration_weight * (confidence - correct)^2``,
  where reference_flops is a full-depth answer to a 64-token prompt plus a critic pass (so "all gates on" costs
  about 1); ``info["reward_parts"]`` holds the three terms.

The semantic memory is the shared Ray actor ``memory_name`` (attached lazily on the first reset, in whichever
process runs the env, e.g. an RLlib env runner) or an in-process ``LocalMemory`` with ``memory=local``. The env
fills it with the world's semantic-placement facts when it is empty.

Example::

    >>> env = MetaControllerEnv({"memory": "local", "queries": 3})
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    >>> sorted(info["reward_parts"]), env.observation_space.contains(obs)
    (['calibration', 'correct', 'cost'], True)
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from models.hmst.critic import Critic, CriticConfig
from models.hmst.engine import (Decisions, EngineConfig, HMSTEngine, Session, critic_flops, lm_forward_flops)
from models.hmst.facts import PLACEMENTS, Fact, FactConfig, FactWorld, exact_match
from models.hmst.meta_controller import STATE_FEATURES
from rl.envs import env_settings
from rl.errors import RLError

QUERY_PROJECTION_SEED = 0
PROBE_PROMPT_TOKENS = 64  # prompt length of the reference answer that normalises the cost


@dataclass
class MetaEnvConfig:
    """The env's settings (``env_config`` keys); unknown keys are refused."""

    checkpoint: str = ""
    """Pretrained HMST run or checkpoint directory; "" builds a small random hmst-micro with a byte tokenizer (tests)."""
    critic: str = ""
    """Directory with critic.json/.safetensors from `memtrain hmst train-critic`; "" uses an untrained small critic."""
    memory: str = "actor"
    """Semantic memory: "actor" (the shared Ray actor memory_name) or "local" (an in-process LocalMemory)."""
    memory_name: str = "meta-env-facts"
    """Name of the shared memory actor."""
    namespace: str = "memtrain"
    """Ray namespace of the memory actor."""
    memory_path: str = ""
    """Folder of the actor's data on its node; "" = <memory_name> under that node's memory root (MEMTRAIN_MEMORY_ROOT,
    default ~/.cache/memtrain/memory)."""
    memory_backup: str = ""
    """Shared storage the memory actor copies every acknowledged write to (a URI or a folder every node mounts), so
    it survives the loss of its node; "" = none."""
    fact_seed: int = 0
    """Seed of the fact world (use the one the checkpoint's corpus was written with)."""
    n_entities: int = 120
    """Entities of the fact world."""
    entities: str = "all"
    """Which entities the questions are about: "train", "heldout" (a seeded ``heldout_fraction`` of the world's
    entities, see ``FactWorld.split``: train a controller on "train" and evaluate it on "heldout", entities it never
    saw) or "all"."""
    heldout_fraction: float = 0.25
    """Share of the world's entities held out from "train" sessions."""
    queries: int = 6
    """Questions per episode (env steps)."""
    told: int = 2
    """Context-placement facts told at the start of each episode."""
    question_mix: tuple[float, float, float] = (0.4, 0.35, 0.25)
    """Probability that a question is about a (semantic, context, pretraining) fact."""
    cost_weight: float = 0.3
    """Weight of the normalised FLOPs cost in the reward."""
    calibration_weight: float = 0.2
    """Weight of the calibration penalty (confidence - correct)^2."""
    query_dims: int = 16
    """Values of the projected query embedding in the observation."""
    max_new_tokens: int = 4
    """Longest answer in tokens."""
    context_turns: int = 2
    """Recent session lines kept in the prompt."""
    verify_threshold: float = 0.5
    """Critic correctness below which the engine falls back (re-answers with retrieval)."""
    seed: int = 0
    """Seed of the random model/critic (when not loaded). The query projection does not depend on it: it is part of
    the observation's definition, so a policy trained on one seed reads the same features on held-out seeds."""

    def __post_init__(self):
        if self.memory not in ("actor", "local"):
            raise RLError(f"env_config.memory must be 'actor' or 'local', got {self.memory!r}")
        for name in ("queries", "query_dims", "max_new_tokens", "n_entities"):
            if getattr(self, name) < 1:
                raise RLError(f"env_config.{name} must be >= 1, got {getattr(self, name)}")
        if self.entities not in ("train", "heldout", "all"):
            raise RLError(f"env_config.entities must be train, heldout or all, got {self.entities!r}")
        if not 0 < self.heldout_fraction < 1:
            raise RLError(f"env_config.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.told < 0 or self.cost_weight < 0 or self.calibration_weight < 0:
            raise RLError("env_config.told, cost_weight and calibration_weight must be >= 0")
        mix = tuple(float(m) for m in self.question_mix)
        if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
            raise RLError(f"env_config.question_mix must be 3 non-negative weights of (semantic, context, "
                          f"pretraining), got {self.question_mix}")
        self.question_mix = mix


def load_env_engine(cfg: MetaEnvConfig, semantic_memory) -> HMSTEngine:
    """The engine the env runs: the checkpoint's model and tokenizer (or a random micro model), and the critic."""
    from models.registry import build_model
    from orchestration.data.tokenizers import ByteTokenizer

    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        from orchestration.training.checkpoint import load_lm

        model, tokenizer, _ = load_lm(cfg.checkpoint)
    else:
        model, tokenizer = build_model("hmst-micro", vocab_size=256).eval(), ByteTokenizer()
    if cfg.critic:
        from models.hmst.training import load_critic
        from orchestration.storage import Location, local_copy

        with local_copy(Location(cfg.critic), verify=False) as path:
            critic = load_critic(path)
    else:
        critic = Critic(CriticConfig(vocab_size=model.cfg.vocab_size, d_model=64, n_layers=1, n_heads=2, d_ff=128,
                                     max_seq_len=256, dropout=0.0))
    engine_cfg = EngineConfig(max_new_tokens=cfg.max_new_tokens, context_turns=cfg.context_turns,
                              verify_threshold=cfg.verify_threshold)
    return HMSTEngine(model, tokenizer, semantic_memory=semantic_memory, critic=critic, config=engine_cfg)


def n_experts_of(cfg: MetaEnvConfig) -> int:
    if not cfg.checkpoint:
        return 4  # hmst-micro
    from models.io import CONFIG_FILE
    from models.registry import model_config
    from orchestration.training.checkpoint import find_checkpoint

    spec = (find_checkpoint(cfg.checkpoint) / CONFIG_FILE).read_json()
    return model_config(spec["name"], **spec["config"]).n_experts


class MetaControllerEnv(gym.Env):
    """See the module docstring."""

    metadata = {"render_modes": []}

    def __init__(self, env_config: dict | None = None):
        self.cfg = cfg = env_settings("meta", env_config)
        self.world = FactWorld(FactConfig(seed=cfg.fact_seed, n_entities=cfg.n_entities))
        self.n_experts = n_experts_of(cfg)
        n_obs = cfg.query_dims + len(STATE_FEATURES) + 1
        low = np.r_[np.full(cfg.query_dims, -5.0), np.zeros(len(STATE_FEATURES) + 1)].astype(np.float32)
        high = np.r_[np.full(cfg.query_dims, 5.0), np.ones(len(STATE_FEATURES) + 1)].astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, shape=(n_obs,), dtype=np.float32)
        self.action_space = gym.spaces.MultiDiscrete([2, 2, 2, self.n_experts + 1, 2])
        # built on the first reset, in the process that runs the env (RLlib builds envs in its env runners)
        self.engine: HMSTEngine | None = None
        self.session: Session | None = None
        self._projection_DQ: np.ndarray | None = None
        self._questions: list[Fact] = []
        self._step = 0
        self._obs: np.ndarray | None = None

    # --- lazy set-up ---
    def _semantic_memory(self, dim: int):
        from memory_service import LocalMemory, MemoryConfig

        if self.cfg.memory == "local":
            return LocalMemory(MemoryConfig(dim=dim, fsync=False))
        import ray

        from memory_service import get_or_create_memory

        if not ray.is_initialized():
            raise RLError("env_config.memory='actor' needs Ray (it runs inside RLlib, or call ray.init first); "
                          "use env_config.memory=local for an in-process memory")
        config = MemoryConfig(dim=dim, path=self.cfg.memory_path or self.cfg.memory_name, backup=self.cfg.memory_backup)
        return get_or_create_memory(self.cfg.memory_name, config, namespace=self.cfg.namespace)

    def _build(self) -> None:
        cfg = self.cfg
        engine = load_env_engine(cfg, semantic_memory=None)
        engine.semantic_memory = self._semantic_memory(engine.embedder.dim)
        foreign = engine.foreign_semantic_memory()
        if foreign:
            raise RLError(f"the semantic memory {cfg.memory_name!r} holds vectors of another tokenizer/embedder "
                          f"({foreign}, this checkpoint's is {engine.embedder.signature}); give env_config.memory_name "
                          f"and memory_path of a fresh memory, or stop that memory (memtrain memory stop --name "
                          f"{cfg.memory_name}) and delete its folder")
        if engine.semantic_count() == 0:
            # env runners start at once: the first fill is applied once, the others get its ids back (same key)
            facts = self.world.by_placement("semantic")
            engine.fill_semantic([f.statement() for f in facts],
                                 [{"source": "facts", "seed": cfg.fact_seed, "entity": f.entity,
                                   "filled_by_pid": os.getpid()} for f in facts],
                                 key=self.world.semantic_key(engine.embedder.signature))
        self.engine = engine
        rng = np.random.default_rng(QUERY_PROJECTION_SEED)
        self._projection_DQ = rng.standard_normal((engine.embedder.dim, cfg.query_dims)).astype(np.float32)
        full = lm_forward_flops(engine.model, engine.model.cfg.n_layers, PROBE_PROMPT_TOKENS, 0) \
            + cfg.max_new_tokens * lm_forward_flops(engine.model, engine.model.cfg.n_layers, 1, PROBE_PROMPT_TOKENS)
        self.reference_flops = full + critic_flops(engine.critic, PROBE_PROMPT_TOKENS)

    # --- gymnasium API ---
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.engine is None:
            self._build()
        rng = random.Random(int(self.np_random.integers(2**31)))
        cfg = self.cfg
        self.session = self.engine.session()
        pools = {p: self.world.split(self.world.by_placement(p), cfg.entities, cfg.heldout_fraction)
                 for p in PLACEMENTS}
        told = rng.sample(pools["context"], min(cfg.told, len(pools["context"])))
        for fact in told:
            self.session.tell(fact.statement())
        pools["context"] = told
        weights = [w if pools[p] else 0.0 for p, w in zip(PLACEMENTS, cfg.question_mix)]
        self._questions = [rng.choice(pools[p]) for p in rng.choices(PLACEMENTS, weights=weights, k=cfg.queries)]
        self._step = 0
        self._obs = self._observe()
        return self._obs, {"placement": self._questions[0].placement}

    def _observe(self) -> np.ndarray:
        obs = self.session.observe(self._questions[self._step].question())
        query_Q = np.clip(obs.query_D @ self._projection_DQ, -5.0, 5.0)
        return np.r_[query_Q, obs.state_F, self._step / self.cfg.queries].astype(np.float32)

    def step(self, action):
        if self.session is None:
            raise RLError("call reset() before step()")
        action = np.asarray(action)
        if not self.action_space.contains(action.astype(np.int64)):
            raise RLError(f"action {action.tolist()} is outside {self.action_space} "
                          f"([early_exit, episodic, semantic, expert 0..{self.n_experts}, verify])")
        fact = self._questions[self._step]
        result = self.session.ask(fact.question(), Decisions.from_array(action))
        correct = float(exact_match(result.response, fact.value))
        parts = {"correct": correct,
                 "cost": -self.cfg.cost_weight * result.flops / self.reference_flops,
                 "calibration": -self.cfg.calibration_weight * (result.confidence - correct) ** 2}
        self._step += 1
        terminated = self._step >= self.cfg.queries
        if not terminated:
            self._obs = self._observe()
        info = {"reward_parts": parts, "placement": fact.placement, "response": result.response,
                "flops": result.flops, "fallback": result.fallback}  # no wall time: info must be deterministic
        return self._obs, float(sum(parts.values())), terminated, False, info

    def close(self) -> None:
        memory = self.engine.semantic_memory if self.engine is not None else None
        if memory is not None and self.cfg.memory == "local":
            memory.close()
        self.engine, self.session = None, None


# --- fixed baselines (same interface as rl.policy.LearnedPolicy) ------------------------------------------------

class FixedPolicy:
    """Always the same decisions."""

    def __init__(self, decisions: Decisions):
        self.action = decisions.to_array()

    def reset(self) -> None:
        pass

    def act(self, observation) -> np.ndarray:
        return self.action.copy()


class RandomPolicy:
    """Uniformly random decisions (seeded; ``reset`` does not reseed, so episodes differ)."""

    def __init__(self, n_experts: int, seed: int = 0):
        self.nvec = np.array([2, 2, 2, n_experts + 1, 2])
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, observation) -> np.ndarray:
        return self.rng.integers(0, self.nvec)


def fixed_combinations(n_experts: int, experts: list[int] | None = None) -> dict[str, FixedPolicy]:
    """Every fixed setting of the five gates: 2^4 on/off gates x the expert-bias values ``experts`` (0 = none, e
    biases expert e - 1; default all n_experts + 1), named by the gates that are on ("none" for all off), e.g.
    "exit+semantic" or "semantic+expert2+verify". ``experts=[0, 1]`` gives the 2^5 = 32 on/off settings.

    Example::

        >>> combos = fixed_combinations(n_experts=4, experts=[0, 1])
        >>> len(combos), "none" in combos, "exit+episodic+semantic+expert1+verify" in combos
        (32, True, True)
    """
    experts = list(range(n_experts + 1)) if experts is None else experts
    if not experts or min(experts) < 0 or max(experts) > n_experts:
        raise RLError(f"expert-bias values must be in 0..{n_experts} (0 = none), got {experts}")
    combos = {}
    for bits in itertools.product((False, True), repeat=4):
        for expert in experts:
            decisions = Decisions(early_exit=bits[0], episodic=bits[1], semantic=bits[2], expert=expert, verify=bits[3])
            on = [name for name, flag in zip(("exit", "episodic", "semantic"), bits[:3]) if flag]
            on += [f"expert{expert}"] * (expert > 0) + ["verify"] * bits[3]
            combos["+".join(on) or "none"] = FixedPolicy(decisions)
    return combos


def baseline_policies(env_config: dict | None = None) -> dict:
    """The named fixed baselines `memtrain rl eval meta` compares against: all gates on, all off, retrieval only,
    semantic retrieval with early exit, random (``fixed_combinations`` has every other fixed setting).

    Example::

        >>> sorted(baseline_policies({"memory": "local"}))
        ['all_off', 'all_on', 'random', 'retrieval_only', 'semantic_exit']
    """
    cfg = env_settings("meta", env_config)
    return {"all_on": FixedPolicy(Decisions(episodic=True, semantic=True, verify=True)),
            "all_off": FixedPolicy(Decisions()),
            "retrieval_only": FixedPolicy(Decisions(episodic=True, semantic=True)),
            "semantic_exit": FixedPolicy(Decisions(early_exit=True, semantic=True)),
            "random": RandomPolicy(n_experts_of(cfg), seed=cfg.seed)}
