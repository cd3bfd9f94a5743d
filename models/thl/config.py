"""THL configuration: one typed dataclass, every field used and documented, plus the named presets."""

from __future__ import annotations

from dataclasses import dataclass

from models.common.errors import ModelError


@dataclass
class THLConfig:
    vocab_size: int = 8192
    """Size of the token vocabulary (set from the tokenizer at train time)."""
    d_embed: int = 128
    """Width of the token embedding and of the local attention."""
    tier_dims: tuple[int, ...] = (128, 128, 128)
    """Hidden width of each GRU tier, fastest first; the number of entries is the number of tiers."""
    tier_timescales: tuple[int, ...] = (1, 8, 64)
    """Tier k updates when the stream position is a multiple of this; the first must be 1 (ticks every token)."""
    local_window: int = 32
    """Tokens the local sliding-window attention sees, the current one included."""
    local_heads: int = 4
    """Heads of the local attention (d_embed must be divisible by it)."""
    memory_slots: int = 128
    """J: number of slots in the memory bank (the state holds J rows whatever the stream length)."""
    memory_dim: int = 128
    """Width of one memory slot."""
    read_heads: int = 4
    """Router heads; each picks its own read_topk slots."""
    head_dim: int = 32
    """Key width per router head (query/key width is read_heads * head_dim)."""
    value_dim: int = 128
    """Width of the read vector r_t, split evenly over the router heads."""
    read_topk: int = 4
    """Slots each router head reads per token (kappa)."""
    router_temperature: float = 1.0
    """Softmax temperature over the selected slots' scores (lower = peakier reads)."""
    router_noise: float = 1.0
    """Scale of the Gumbel noise added to the scores before the top-k in training (0 = plain top-k)."""
    straight_through: bool = False
    """Training only: also pass the dense softmax gradient to unselected slots (costs O(J) per token)."""
    load_penalty: float = 0.1
    """Subtracted from a slot's score per unit of its relative read load (1 = average), steering reads away."""
    read_ema_decay: float = 0.99
    """Decay of the per-slot read-load EMA used by the load penalty and the writer's under-use score."""
    load_balance_weight: float = 0.01
    """Weight of the router load-balance auxiliary loss (J * sum_j f_j P_j, 1 when uniform) in LMOutput.loss."""
    memory_decay: float = 0.9995
    """gamma: every slot is multiplied by this each token (kept as one scalar, so it costs nothing per slot)."""
    write_rate: float = 0.25
    """eta: fraction of a slot a blend write moves towards the new content."""
    write_clip: float = 1.0
    """Largest norm of a write vector."""
    novelty_beta: float = 8.0
    """Sharpness of the write gate g = sigmoid(beta * (novelty - theta))."""
    novelty_theta: float = 0.3
    """Novelty threshold: a write happens only if 1 - max cosine to the bank exceeds it (gate > 0.5)."""
    blend_threshold: float = 0.5
    """A write whose best cosine to the bank is at least this blends into that slot; below, it replaces a slot."""
    stale_weight: float = 1.0
    """Weight of log(1 + steps since last write) when choosing the slot a replace write takes."""
    underuse_weight: float = 1.0
    """Weight of (minus) the relative read load when choosing the slot a replace write takes."""
    bptt_window: int = 64
    """Truncated BPTT: all recurrent state is detached every this many tokens (also the processing chunk)."""

    def __post_init__(self):
        self.tier_dims = tuple(self.tier_dims)  # JSON round trips give lists
        self.tier_timescales = tuple(self.tier_timescales)
        for name in ("vocab_size", "d_embed", "local_window", "local_heads", "memory_slots", "memory_dim",
                     "read_heads", "head_dim", "value_dim", "read_topk", "bptt_window"):
            if getattr(self, name) <= 0:
                raise ModelError(f"THLConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.tier_dims or any(d <= 0 for d in self.tier_dims):
            raise ModelError(f"tier_dims must be a non-empty list of positive widths, got {list(self.tier_dims)}")
        if len(self.tier_timescales) != len(self.tier_dims):
            raise ModelError(f"tier_timescales has {len(self.tier_timescales)} entries but tier_dims has "
                             f"{len(self.tier_dims)}; give one timescale per tier")
        if self.tier_timescales[0] != 1 or any(t <= 0 for t in self.tier_timescales):
            raise ModelError(f"tier_timescales must be positive and start with 1 (the first tier ticks every token), "
                             f"got {list(self.tier_timescales)}")
        if self.d_embed % self.local_heads:
            raise ModelError(f"d_embed={self.d_embed} must be divisible by local_heads={self.local_heads}")
        if self.value_dim % self.read_heads:
            raise ModelError(f"value_dim={self.value_dim} must be divisible by read_heads={self.read_heads}")
        if self.read_topk > self.memory_slots:
            raise ModelError(f"read_topk={self.read_topk} exceeds memory_slots={self.memory_slots}; "
                             "lower read_topk or add slots")
        for name in ("memory_decay", "read_ema_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ModelError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.write_rate <= 1.0:
            raise ModelError(f"write_rate must be in (0, 1], got {self.write_rate}")
        if self.router_temperature <= 0:
            raise ModelError(f"router_temperature must be > 0, got {self.router_temperature}")
        for name in ("router_noise", "load_penalty", "load_balance_weight", "write_clip", "novelty_beta",
                     "stale_weight", "underuse_weight"):
            if getattr(self, name) < 0:
                raise ModelError(f"{name} must be >= 0, got {getattr(self, name)}")


PRESETS: dict[str, dict] = {
    # CPU-sized: 4.9M parameters at an 8k vocabulary (3.1M of them the head); trains in minutes on 2 cores
    "thl-tiny": dict(),
    # the original THL code's "small" benchmark shape: d=256 everywhere, J=256, 4 heads x 64, kappa=4, V=512
    "thl-small": dict(vocab_size=512, d_embed=256, tier_dims=(256, 256, 256), local_window=64, memory_slots=256,
                      memory_dim=256, head_dim=64, value_dim=256),
    # GPU-sized: the original THL code's default widths (768) and J=1024
    "thl-base": dict(d_embed=768, tier_dims=(768, 768, 768), local_window=64, local_heads=12, memory_slots=1024,
                     memory_dim=768, head_dim=64, value_dim=768, bptt_window=128),
    "thl-large": dict(d_embed=1024, tier_dims=(1536, 1024, 1024), tier_timescales=(1, 4, 32), local_window=128,
                      local_heads=16, memory_slots=4096, memory_dim=1024, read_heads=8, head_dim=64, value_dim=1024,
                      read_topk=8, bptt_window=128),
}
