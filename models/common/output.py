"""The output contract every language model in memtrain follows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LMOutput:
    """What ``model(input_ids_BT, targets_BT)`` returns.

    ``loss`` is what the trainer backpropagates: the mean next-token cross-entropy plus every auxiliary term the
    model trains with (load balancing, z-loss, ...), which are also summed in ``aux_loss``. ``stats`` holds
    diagnostics (routing entropy, dropped tokens, memory fill, ...) as floats or detached 0-dim tensors, so the
    hot loop never forces a device sync; the reporting code calls ``float()`` on them.
    """

    logits: torch.Tensor | None  # (B, T, V); None when training with targets (the fused head never builds them)
    loss: torch.Tensor | None = None  # scalar: lm_loss + aux_loss, or None without targets
    aux_loss: torch.Tensor | None = None  # scalar sum of auxiliary terms, or None if the model has none
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)

    @property
    def lm_loss(self) -> torch.Tensor | None:
        """The cross-entropy part of ``loss`` alone (what evaluation and perplexity use)."""
        if self.loss is None or self.aux_loss is None:
            return self.loss
        return self.loss - self.aux_loss
