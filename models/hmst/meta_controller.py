"""HMST's meta-controller: per query, decide what to spend compute on.

It reads the LM's pooled query embedding and a state summary (predictive uncertainty, context length, episodic and
semantic memory fill, last critic confidence) and outputs five decisions: early exit, episodic retrieval,
semantic retrieval, expert bias (one of the experts, or "none"), verification.

The original HMST code ran a 6-layer Transformer over a length-1 sequence (an MLP with extra cost), fed constant
placeholders for memory fill and confidence, thresholded everything (no exploration) and returned raw logits as
"expert weights" that its RL code then treated as probabilities. Here the network is an MLP, the four
yes/no decisions are Bernoulli distributions and the expert bias a Categorical over E + 1 choices, so RL (RLlib
PPO) gets log-probabilities and entropies, and ``act(..., deterministic=True)`` gives the inference-time choice.

Example::

    >>> import torch
    >>> ctrl = MetaController(MetaControllerConfig(query_dim=32, n_experts=4))
    >>> state_BF = state_features(uncertainty=[0.9], context_fraction=[0.1], episodic_fill=[0.5],
    ...                           semantic_fill=[0.0], last_confidence=[0.5])
    >>> decision = ctrl.act(torch.randn(1, 32), state_BF, deterministic=True)
    >>> sorted(decision.actions), decision.log_prob_B.shape
    (['early_exit', 'episodic', 'expert', 'semantic', 'verify'], torch.Size([1]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical

from models.common.errors import ModelError

GATES = ("early_exit", "episodic", "semantic", "verify")  # the yes/no decisions, in logit order
STATE_FEATURES = ("uncertainty", "context_fraction", "episodic_fill", "semantic_fill", "last_confidence")


@dataclass
class MetaControllerConfig:
    """Size of the meta-controller."""

    query_dim: int = 256
    """Width of the query embedding (the LM's d_model)."""
    n_experts: int = 4
    """Experts per MoE layer of the LM (the expert-bias choice has n_experts + 1 options, 0 = none)."""
    hidden: int = 256
    """Width of the hidden layers."""
    n_layers: int = 2
    """Hidden layers of the MLP."""
    bias_strength: float = 2.0
    """Router-logit bias given to the chosen expert (``expert_bias``)."""

    def __post_init__(self):
        for name in ("query_dim", "n_experts", "hidden", "n_layers"):
            if getattr(self, name) <= 0:
                raise ModelError(f"MetaControllerConfig.{name} must be positive, got {getattr(self, name)}")


def state_features(uncertainty, context_fraction, episodic_fill, semantic_fill, last_confidence) -> torch.Tensor:
    """The state summary as a (B, 5) tensor; every feature is a per-query number in [0, 1].

    ``uncertainty`` is the normalised predictive entropy, ``context_fraction`` the prompt length over the LM's
    max_seq_len, the fills are entries over capacity, ``last_confidence`` the critic's last confidence.
    """
    columns = [torch.as_tensor(v, dtype=torch.float32).reshape(-1)
               for v in (uncertainty, context_fraction, episodic_fill, semantic_fill, last_confidence)]
    if len({c.numel() for c in columns}) != 1:
        raise ModelError(f"state features need one value per query each, got lengths {[c.numel() for c in columns]}")
    state_BF = torch.stack(columns, dim=1)
    if not ((state_BF >= 0) & (state_BF <= 1)).all():
        bad = [name for name, c in zip(STATE_FEATURES, columns) if not ((c >= 0) & (c <= 1)).all()]
        raise ModelError(f"state features must lie in [0, 1]; out of range: {bad} (normalise them first)")
    return state_BF


@dataclass
class Decision:
    actions: dict[str, torch.Tensor]
    """Per decision, a (B,) tensor: 0/1 for the gates, 0..n_experts for "expert" (0 = no bias)."""
    log_prob_B: torch.Tensor
    """Log-probability of the whole joint action under the current policy."""
    entropy_B: torch.Tensor
    """Entropy of the joint action distribution (the five parts are independent given the input)."""


class MetaController(nn.Module):
    """MLP over [query embedding | state] -> 4 Bernoulli gate logits + (n_experts + 1) expert-choice logits."""

    def __init__(self, cfg: MetaControllerConfig):
        super().__init__()
        self.cfg = cfg
        layers, width = [], cfg.query_dim + len(STATE_FEATURES)
        for _ in range(cfg.n_layers):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU()]
            width = cfg.hidden
        self.body = nn.Sequential(nn.LayerNorm(cfg.query_dim + len(STATE_FEATURES)), *layers)
        self.gate_head = nn.Linear(width, len(GATES))
        self.expert_head = nn.Linear(width, cfg.n_experts + 1)

    def distributions(self, query_BD: torch.Tensor, state_BF: torch.Tensor) -> tuple[Bernoulli, Categorical]:
        """The policy: independent Bernoullis for the 4 gates (batch shape (B, 4)) and a Categorical for the expert."""
        if query_BD.dim() != 2 or query_BD.size(1) != self.cfg.query_dim:
            raise ModelError(f"query embedding must have shape (B, {self.cfg.query_dim}), got {tuple(query_BD.shape)}")
        if state_BF.shape != (query_BD.size(0), len(STATE_FEATURES)):
            raise ModelError(f"state must have shape ({query_BD.size(0)}, {len(STATE_FEATURES)}) "
                             f"(features {', '.join(STATE_FEATURES)}), got {tuple(state_BF.shape)}")
        h_BH = self.body(torch.cat([query_BD.float(), state_BF.float()], dim=1))
        return Bernoulli(logits=self.gate_head(h_BH)), Categorical(logits=self.expert_head(h_BH))

    def act(self, query_BD: torch.Tensor, state_BF: torch.Tensor, deterministic: bool = False) -> Decision:
        """Sample a decision (training) or take the most likely one (``deterministic``, for inference)."""
        gates, expert = self.distributions(query_BD, state_BF)
        if deterministic:
            gate_BG, expert_B = (gates.probs > 0.5).float(), expert.probs.argmax(dim=-1)
        else:
            gate_BG, expert_B = gates.sample(), expert.sample()
        return Decision(self._actions(gate_BG, expert_B), *self._log_prob_entropy(gates, expert, gate_BG, expert_B))

    def evaluate(self, query_BD: torch.Tensor, state_BF: torch.Tensor,
                 actions: dict[str, torch.Tensor]) -> Decision:
        """Log-probability and entropy of given actions under the current policy (the PPO ratio needs this)."""
        gates, expert = self.distributions(query_BD, state_BF)
        gate_BG = torch.stack([actions[name].float() for name in GATES], dim=1)
        return Decision(actions, *self._log_prob_entropy(gates, expert, gate_BG, actions["expert"]))

    @staticmethod
    def _actions(gate_BG: torch.Tensor, expert_B: torch.Tensor) -> dict[str, torch.Tensor]:
        actions = {name: gate_BG[:, i].long() for i, name in enumerate(GATES)}
        actions["expert"] = expert_B
        return actions

    @staticmethod
    def _log_prob_entropy(gates: Bernoulli, expert: Categorical, gate_BG: torch.Tensor, expert_B: torch.Tensor):
        log_prob_B = gates.log_prob(gate_BG).sum(dim=1) + expert.log_prob(expert_B)
        entropy_B = gates.entropy().sum(dim=1) + expert.entropy()
        return log_prob_B, entropy_B

    def expert_bias(self, expert_B: torch.Tensor) -> torch.Tensor:
        """(B, n_experts) router-logit bias for ``HMSTLM.set_expert_bias``: +bias_strength on the chosen expert,
        all zeros for choice 0 ("none")."""
        bias_BE = torch.zeros(expert_B.size(0), self.cfg.n_experts + 1, device=expert_B.device)
        bias_BE.scatter_(1, expert_B[:, None], self.cfg.bias_strength)
        return bias_BE[:, 1:]
