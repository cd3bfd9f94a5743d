"""Pure-PyTorch model families of memtrain (no Ray imports here).

Every language model follows one contract (see ``models.common.output.LMOutput``)::

    out = model(input_ids_BT, targets_BT)   # -> LMOutput(logits, loss, aux_loss, stats)

and builds by preset name::

    from models.registry import build_model, list_models
    model = build_model("tgsmn-dense-tiny", vocab_size=512)
"""

from models.common.errors import ModelError
from models.common.output import LMOutput

__all__ = ["LMOutput", "ModelError"]
