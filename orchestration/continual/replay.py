"""What a continual learner keeps from past tasks: a reservoir replay buffer and an EWC anchor.

- ``ReplayBuffer`` holds token windows (seq_len + 1 tokens). Reservoir sampling keeps every window seen so far
  with the same probability capacity / seen, so old tasks stay represented as the stream grows (the original
  TG-SMN code overwrote random slots, which favours recent data, and swapped whole batches). ``mix`` builds a
  batch whose rows are a ``replay_ratio`` share of buffer rows and the rest new data.
- ``EWC`` is online elastic weight consolidation (Schwarz et al. 2018): at the end of each task a diagonal
  empirical Fisher is estimated from per-sequence gradients and added to the running one, and the anchor moves to
  the current weights; the penalty is lambda / 2 * sum F (theta - anchor)^2. The original TG-SMN code had no
  Fisher term.

Example::

    >>> import numpy as np, torch
    >>> buf = ReplayBuffer(capacity=4, row_len=3)
    >>> rng = np.random.default_rng(0)
    >>> buf.add(torch.arange(30).view(10, 3), rng)
    >>> len(buf), buf.seen
    (4, 10)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ReplayBuffer:
    """A fixed-capacity reservoir of token rows (capacity, row_len) int64, with the task each row came from."""

    def __init__(self, capacity: int, row_len: int):
        self.capacity, self.row_len = capacity, row_len
        self.rows_CL = torch.zeros(capacity, row_len, dtype=torch.long)
        self.task_C = torch.full((capacity,), -1, dtype=torch.long)
        self.seen = 0  # rows offered so far

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, rows_BL: torch.Tensor, rng: np.random.Generator, task: int = 0) -> None:
        """Offer rows to the reservoir: row number n (0-based, over all rows ever offered) takes a free slot while
        there is one, else replaces a uniformly random slot with probability capacity / (n + 1)."""
        if self.capacity == 0 or rows_BL.numel() == 0:
            return
        n_B = self.seen + np.arange(rows_BL.size(0))
        slot_B = np.where(n_B < self.capacity, n_B, np.floor(rng.random(len(n_B)) * (n_B + 1)).astype(np.int64))
        keep_B = slot_B < self.capacity
        # when two rows of one call draw the same slot, the later one wins (as if offered one by one)
        slots, first_from_end = np.unique(slot_B[keep_B][::-1], return_index=True)
        rows_idx = np.flatnonzero(keep_B)[::-1][first_from_end]
        self.rows_CL[torch.from_numpy(slots)] = rows_BL[torch.from_numpy(rows_idx)].to(self.rows_CL)
        self.task_C[torch.from_numpy(slots)] = task
        self.seen += rows_BL.size(0)

    def sample(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` rows drawn uniformly without replacement (with replacement if the buffer holds fewer)."""
        size = len(self)
        idx = rng.choice(size, size=n, replace=n > size)
        return self.rows_CL[torch.from_numpy(np.asarray(idx, dtype=np.int64))]

    def replay_rows(self, batch_size: int, ratio: float, rng: np.random.Generator) -> int:
        """How many of ``batch_size`` rows to replay: ratio * batch_size rounded stochastically (so the mean share
        is exactly ``ratio``), at most batch_size - 1 (a batch always holds new data), 0 while the buffer is empty."""
        if len(self) == 0 or ratio <= 0:
            return 0
        expected = ratio * batch_size
        n = int(expected) + int(rng.random() < expected - int(expected))
        return min(n, batch_size - 1)

    def state_dict(self) -> dict:
        return {"rows_CL": self.rows_CL.clone(), "task_C": self.task_C.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.rows_CL.copy_(state["rows_CL"])
        self.task_C.copy_(state["task_C"])
        self.seen = int(state["seen"])


def mix(online_BL: torch.Tensor, replayed_RL: torch.Tensor) -> torch.Tensor:
    """One batch: the new rows first, then the replayed ones (the runner scores the two parts separately)."""
    return torch.cat([online_BL, replayed_RL.to(online_BL)], dim=0) if replayed_RL.numel() else online_BL


class EWC:
    """Online EWC over a model's trainable parameters; ``penalty()`` is 0 until the first ``consolidate``."""

    def __init__(self, model: nn.Module, lam: float, gamma: float = 1.0):
        self.model, self.lam, self.gamma = model, lam, gamma
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.lam > 0 and bool(self.fisher)

    def penalty(self) -> torch.Tensor:
        """lambda / 2 * sum over parameters of F * (theta - anchor)^2 (a 0-dim tensor with gradient)."""
        if not self.active:
            return torch.zeros(())
        total = sum((self.fisher[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in self.params)
        return 0.5 * self.lam * total

    def consolidate(self, rows_NL: torch.Tensor) -> None:
        """Add the diagonal empirical Fisher of ``rows_NL`` (mean squared per-sequence gradient of the LM loss)
        to the running Fisher (decayed by gamma), and anchor at the current weights."""
        model = self.model
        was_training = model.training
        model.eval()  # no dropout or router noise: the Fisher of the deterministic model
        fisher = {n: torch.zeros_like(p) for n, p in self.params}
        for row_L in rows_NL:
            model.zero_grad(set_to_none=True)
            x_1T, y_1T = row_L[None, :-1], row_L[None, 1:]
            logits_1TV = model(x_1T).logits
            F.cross_entropy(logits_1TV.flatten(0, 1).float(), y_1T.flatten()).backward()
            for n, p in self.params:
                if p.grad is not None:
                    fisher[n].add_(p.grad.detach().pow(2))
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n, p in self.params:
            new = fisher[n] / max(len(rows_NL), 1)
            self.fisher[n] = self.gamma * self.fisher[n] + new if n in self.fisher else new
            self.anchor[n] = p.detach().clone()

    def state_dict(self) -> dict:
        return {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = {n: t.clone() for n, t in state["fisher"].items()}
        self.anchor = {n: t.clone() for n, t in state["anchor"].items()}
