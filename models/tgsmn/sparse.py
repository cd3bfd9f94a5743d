"""TG-SMN's sparse memory LM: every FFN is a hierarchical layer of G groups x M low-rank experts.

Per token: a group router picks one of G groups (top-1), a per-group router picks the top-k of that group's M
experts, and the output is the gate-weighted sum of ``act(x @ W1[e]) @ W2[e]`` over the k chosen experts.
What differs from the original TG-SMN code:

- the group router is trained (the original's got no gradient): its chosen probability enters the gate as
  ``p / p.detach()``, a straight-through factor that is exactly 1 in the forward pass (so the k gates still sum
  to 1, as in the original) and carries the gradient ``<dL/dy, y> / p`` to the group router;
- a load-balancing loss over groups and experts (the original had none), weighted by ``balance_weight``;
- dispatch sorts the token-slots by expert once and runs two batched matmuls over experts padded to a
  capacity; the per-group expert routers run the same way over tokens sorted by group (the original
  gathered a copy of the expert and router weights for every token). An expert over capacity drops its
  latest slots (``tgsmn/dropped_frac``); tokens are ordered position-major, so the layer stays causal.

Example::

    >>> import torch
    >>> from models.registry import build_model
    >>> model = build_model("tgsmn-sparse-tiny", vocab_size=300)
    >>> out = model(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))
    >>> sorted(out.stats)
    ['tgsmn/dropped_frac', 'tgsmn/experts_used_frac', 'tgsmn/group_entropy', 'tgsmn/router_entropy']
    >>> model.set_routing(k=1, noise=0.3, temperature=0.8)
    >>> model.routing
    RoutingKnobs(k=1, noise=0.3, temperature=0.8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common.errors import ModelError
from models.common.transformer import FFNOutput, TransformerConfig, TransformerLM


@dataclass
class SparseLMConfig(TransformerConfig):
    """Sparse TG-SMN LM: the backbone's fields plus the expert layer's. ``d_ff`` is unused (experts have rank r)."""

    n_experts: int = 256
    """Total experts E per layer, split into E / group_size groups."""
    group_size: int = 32
    """Experts per group M; the group router chooses among E / M groups, the expert router among M experts."""
    expert_rank: int = 16
    """Hidden width r of each low-rank expert act(x @ W1 (d, r)) @ W2 (r, d)."""
    max_k: int = 2
    """Most experts per token that set_routing may ask for; the model starts at k = max_k."""
    router_noise: float = 0.0
    """Initial std of the Gaussian noise added to expert-router logits in training (set_routing changes it)."""
    router_temperature: float = 1.0
    """Initial softmax temperature of the gate over the k chosen experts (set_routing changes it)."""
    balance_weight: float = 0.01
    """Weight of the load-balancing loss (group term + expert term, each 1.0 at perfect balance); 0 disables."""
    capacity_factor: float = 4.0
    """Token-slots an expert takes per batch, as a multiple of the mean load N*k/E; extra slots are dropped."""
    min_capacity: int = 64
    """Capacity floor, so small batches (generation) never drop: an expert gets at most one slot per token."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_experts", "group_size", "expert_rank", "max_k", "min_capacity"):
            if getattr(self, name) <= 0:
                raise ModelError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_experts % self.group_size:
            raise ModelError(f"n_experts={self.n_experts} must be divisible by group_size={self.group_size}; "
                             f"pick n_experts as a multiple of group_size (e.g. {self.group_size * 8})")
        if self.max_k > self.group_size:
            raise ModelError(f"max_k={self.max_k} exceeds group_size={self.group_size}: top-k is taken inside "
                             "one group; lower max_k or raise group_size")
        _check_knobs(self.max_k, self.router_noise, self.router_temperature, self.max_k)
        if self.balance_weight < 0:
            raise ModelError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if self.capacity_factor <= 0:
            raise ModelError(f"capacity_factor must be > 0, got {self.capacity_factor}")


def _check_knobs(k: int, noise: float, temperature: float, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise ModelError(f"k must be in [1, max_k={max_k}], got {k}; raise max_k in the model config for more")
    if noise < 0:
        raise ModelError(f"router noise must be >= 0, got {noise}")
    if temperature <= 0:
        raise ModelError(f"router temperature must be > 0, got {temperature}")


@dataclass
class RoutingKnobs:
    """The run-time routing settings, one object shared by every layer of a model."""

    k: int
    """Experts per token (1..max_k)."""
    noise: float
    """Std of the Gaussian noise on expert-router logits; applied in training mode only."""
    temperature: float
    """Softmax temperature of the gate over the k chosen experts."""


class HierarchicalSparseExperts(nn.Module):
    """G groups of M low-rank experts; forward(x_BTD) -> (y_BTD, balance loss, routing stats)."""

    def __init__(self, cfg: SparseLMConfig, knobs: RoutingKnobs):
        super().__init__()
        E, M, d, r = cfg.n_experts, cfg.group_size, cfg.d_model, cfg.expert_rank
        self.n_experts, self.group_size, self.n_groups = E, M, E // M
        self.knobs = knobs
        self.balance_weight = cfg.balance_weight
        self.capacity_factor, self.min_capacity = cfg.capacity_factor, cfg.min_capacity
        self.group_router = nn.Linear(d, self.n_groups, bias=cfg.bias)
        # per-group expert routers; only a token's own group scores it (tokens are laid out by group for a bmm)
        self.router_GDM = nn.Parameter(torch.randn(self.n_groups, d, M) * 0.02)
        self.W1_EDR = nn.Parameter(torch.randn(E, d, r) * 0.02)
        # GPT-2 residual scaling, as the backbone does for its dense down projection
        self.W2_ERD = nn.Parameter(torch.randn(E, r, d) * (0.02 / math.sqrt(2 * cfg.n_layers)))
        self.act = F.gelu if cfg.activation == "gelu" else F.relu
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor) -> FFNOutput:
        B, T, d = x_BTD.shape
        # position-major token order: experts keep their earliest slots (see experts), so a capacity drop at
        # position t never depends on a later position of any sequence and the layer stays causal
        x_ND = x_BTD.transpose(0, 1).reshape(T * B, d)
        expert_ids_NK, gate_NK, aux_loss, stats = self.route(x_ND)
        y_ND, dropped_frac = self.experts(x_ND, expert_ids_NK, gate_NK)
        stats["tgsmn/dropped_frac"] = dropped_frac
        return self.dropout(y_ND).view(T, B, d).transpose(0, 1), aux_loss, stats

    def route(self, x_ND: torch.Tensor):
        """Choose a group per token, then the top-k experts inside it.

        Returns expert ids (N, k) in [0, E), their gates (N, k), the weighted balance loss and routing stats.
        """
        N, G, M, E = x_ND.size(0), self.n_groups, self.group_size, self.n_experts
        k, noise, temperature = self.knobs.k, self.knobs.noise, self.knobs.temperature

        group_probs_NG = F.softmax(self.group_router(x_ND).float(), dim=-1)
        group_p_N, group_ids_N = group_probs_NG.max(dim=-1)
        # straight-through: value 1, gradient to the group router (see the module docstring)
        group_gate_N = group_p_N / group_p_N.detach()

        order_N, row_N, C = _grid_layout(group_ids_N, G, capacity=N)
        token_R = _tokens_of_rows(order_N, row_N, G * C, 1)
        x_GCD = x_ND.index_select(0, token_R).view(G, C, x_ND.size(1))
        row_of_token_N = torch.empty_like(row_N).index_put_((order_N,), row_N)
        logits_NM = torch.bmm(x_GCD, self.router_GDM).view(G * C, M).float().index_select(0, row_of_token_N)
        noisy_logits_NM = logits_NM
        if self.training and noise > 0:
            noisy_logits_NM = logits_NM + noise * torch.randn_like(logits_NM)
        top_logits_NK, top_m_NK = noisy_logits_NM.topk(k, dim=-1)
        gate_NK = F.softmax(top_logits_NK / temperature, dim=-1) * group_gate_N[:, None]
        expert_ids_NK = group_ids_N[:, None] * M + top_m_NK

        # Switch-style balance at both levels: n * sum(load fraction * mean router probability), 1.0 when uniform.
        # An expert's mean probability counts only the tokens of its group (the others never score it).
        expert_probs_NM = F.softmax(logits_NM / temperature, dim=-1)
        group_load_G = torch.bincount(group_ids_N, minlength=G).float() / N
        expert_load_GM = torch.bincount(expert_ids_NK.flatten(), minlength=E).float().view(G, M) / (N * k)
        balance = (G * (group_load_G * group_probs_NG.mean(0)).sum()
                   + E / N * (expert_load_GM[group_ids_N] * expert_probs_NM).sum())

        with torch.no_grad():
            stats = {
                "tgsmn/router_entropy": _entropy(expert_probs_NM),
                "tgsmn/group_entropy": _entropy(group_probs_NG),
                "tgsmn/experts_used_frac": (expert_load_GM > 0).float().mean(),
            }
        return expert_ids_NK, gate_NK, self.balance_weight * balance, stats

    def experts(self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, gate_NK: torch.Tensor):
        """Sum over k of gate * expert(x): slots sorted by expert once, then two batched matmuls over experts.

        Each expert owns C rows of an (E, C) grid, C = the busiest expert's load capped at the capacity; a row
        holds one token-slot (slots past the cap are dropped) or is padding with gate 0. Rows gather their
        token's input, and the expert outputs are added back into their tokens. Returns y (N, d) and the
        dropped fraction of slots.
        """
        N, k = expert_ids_NK.shape
        E, S, d = self.n_experts, expert_ids_NK.numel(), x_ND.size(1)
        capacity = max(math.ceil(self.capacity_factor * S / E), self.min_capacity)
        order_S, row_S, C = _grid_layout(expert_ids_NK.flatten(), E, capacity)
        token_R = _tokens_of_rows(order_S, row_S, E * C, k)
        gate_R = gate_NK.new_zeros(E * C + 1).index_put((row_S,), gate_NK.flatten()[order_S])[:-1]

        # padding rows read token 0 and are zeroed by their gate, so they add exactly 0 below. index_select,
        # not x_ND[token_R]: its backward is index_add, ~20x faster on CPU than indexing's accumulate-put
        x_ECD = x_ND.index_select(0, token_R).view(E, C, d)
        h_ECR = self.act(torch.bmm(x_ECD, self.W1_EDR)) * gate_R.view(E, C, 1).to(x_ECD.dtype)
        y_RD = torch.bmm(h_ECR, self.W2_ERD).view(E * C, d)
        y_ND = x_ND.new_zeros(N, d).index_add(0, token_R, y_RD.to(x_ND.dtype))
        return y_ND, (row_S == E * C).float().mean()


def _grid_layout(bin_ids_S: torch.Tensor, n_bins: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lay items out in an (n_bins, C) grid, each bin's items in order, C = min(largest bin, capacity).

    Returns the items sorted by bin (order_S), the grid row of each of them (row_S; items past the capacity
    of their bin get the spare row n_bins * C) and C. The sort is stable, so a full bin keeps its earliest items.
    """
    sorted_ids_S, order_S = bin_ids_S.sort(stable=True)
    load_B = torch.bincount(sorted_ids_S, minlength=n_bins)
    first_B = load_B.cumsum(0) - load_B
    pos_S = torch.arange(bin_ids_S.numel(), device=bin_ids_S.device) - first_B[sorted_ids_S]  # rank in its bin
    C = min(int(load_B.max()), capacity)
    row_S = torch.where(pos_S < C, sorted_ids_S * C + pos_S, n_bins * C)
    return order_S, row_S, C


def _tokens_of_rows(order_S: torch.Tensor, row_S: torch.Tensor, n_rows: int, slots_per_token: int) -> torch.Tensor:
    """The token each grid row holds; padding rows (and the spare row, cut off) hold token 0."""
    token_R = torch.zeros(n_rows + 1, dtype=torch.long, device=row_S.device)
    return token_R.index_put_((row_S,), order_S // slots_per_token)[:-1]


def _entropy(probs_NX: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of a probability matrix."""
    return -(probs_NX * probs_NX.clamp_min(1e-12).log()).sum(-1).mean()


class SparseLM(TransformerLM):
    """The backbone with a HierarchicalSparseExperts layer as every FFN, and run-time routing knobs."""

    def __init__(self, cfg: SparseLMConfig):
        routing = RoutingKnobs(cfg.max_k, cfg.router_noise, cfg.router_temperature)
        super().__init__(cfg, make_ffn=lambda layer: HierarchicalSparseExperts(cfg, routing))
        self.routing = routing

    def set_routing(self, k: int, noise: float, temperature: float) -> None:
        """Set experts per token, router noise (training only) and gate temperature for every layer.

        The knobs are run-time state, not weights: a saved model comes back at k = max_k with the config's
        noise and temperature, so whoever steers them (a controller) checkpoints its own last action.

        Example::

            >>> from models.registry import build_model
            >>> model = build_model("tgsmn-sparse-tiny", vocab_size=300)
            >>> model.set_routing(k=3, noise=0.0, temperature=1.0)
            Traceback (most recent call last):
            ...
            models.common.errors.ModelError: k must be in [1, max_k=2], got 3; raise max_k in the model config for more
        """
        _check_knobs(k, noise, temperature, self.cfg.max_k)
        self.routing.k, self.routing.noise, self.routing.temperature = int(k), float(noise), float(temperature)

    def active_ffn_params(self) -> int:
        """Per token and layer: the group router, the chosen group's expert router and k experts."""
        cfg = self.cfg
        per_layer = cfg.d_model * (cfg.n_experts // cfg.group_size + cfg.group_size)
        per_layer += self.routing.k * 2 * cfg.d_model * cfg.expert_rank
        return cfg.n_layers * per_layer


PRESETS: dict[str, dict] = {
    # CPU-sized: the dense tiny backbone with 64 experts of rank 8 in 4 groups
    "tgsmn-sparse-tiny": dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
                              n_experts=64, group_size=16, expert_rank=8, max_k=2),
    # the original TG-SMN code's default shape: d_model 192, 4 layers, 4 heads, E 256 in groups of 32, rank 16, k <= 2
    "tgsmn-sparse-small": dict(d_model=192, n_layers=4, n_heads=4, max_seq_len=512, activation="relu",
                               n_experts=256, group_size=32, expert_rank=16, max_k=2),
}

CONFIG_CLASS = SparseLMConfig


def build(cfg: SparseLMConfig) -> SparseLM:
    return SparseLM(cfg)
