"""Pure-PyTorch model families of memtrain (no Ray imports here).

Every language model builds by preset name (``models.registry.list_models()``) and follows one contract
(see ``models.common.output.LMOutput``).

Example::

    >>> import torch
    >>> from models.registry import build_model
    >>> model = build_model("tgsmn-dense-tiny", vocab_size=512)
    >>> input_ids_BT = torch.randint(0, 512, (2, 8))
    >>> out = model(input_ids_BT, input_ids_BT)   # LMOutput(logits, loss, aux_loss, stats)
    >>> type(out).__name__, out.loss.dim()
    ('LMOutput', 0)
"""

from models.common.errors import ModelError
from models.common.output import LMOutput

__all__ = ["LMOutput", "ModelError"]
