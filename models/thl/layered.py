"""Layered inference: run a saved THL model whose weights stay on disk, streaming them in module by module.

The model is built with empty ("meta") weights. Before each unit (embedding, local attention, recurrent core,
head) runs, a forward pre-hook installs its weights, read from the memory-mapped ``model.safetensors``; after
it runs, a background thread starts reading the next unit, so the disk read overlaps compute. Units are evicted
(least recently used first) so the weights held in memory never exceed ``budget_bytes``. The computation is
the plain model's own code, so the numerics are identical (no forced autocast).

Example::

    >>> import tempfile, torch
    >>> from models.io import save_model
    >>> from models.registry import build_model
    >>> from models.common.sampling import SamplingConfig, generate
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_model(build_model("thl-tiny", vocab_size=300), "thl-tiny", d)
    ...     engine = LayeredEngine(d, budget_bytes=3_000_000)
    ...     generate(engine, torch.tensor([[1, 2]]), SamplingConfig(max_new_tokens=3, temperature=0)).shape
    torch.Size([1, 3])
    >>> engine.peak_resident_bytes <= 3_000_000
    True
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from models.common.errors import ModelError
from models.io import WEIGHTS_FILE, read_model_spec
from models.registry import build_model
from models.thl.memory import THLState
from models.thl.model import THLModel

UNITS = ("embed", "local_attn", "core", "head")  # THLModel's submodules, in the order a step runs them


class LayeredEngine:
    """Streams a saved THL model's weights from disk under a resident-memory budget; ``generate()``-compatible."""

    def __init__(self, directory: str | os.PathLike, budget_bytes: int, device: str = "cpu"):
        name, config = read_model_spec(directory)
        self.path = Path(directory) / WEIGHTS_FILE
        if not self.path.is_file():
            raise ModelError(f"{self.path} is missing; save the model with models.io.save_model first")
        with torch.device("meta"):
            model = build_model(name, **config)
        if not isinstance(model, THLModel):
            raise ModelError(f"the layered engine runs THL models; {directory} holds {name!r}")
        self.model, self.device, self.budget_bytes = model.eval(), torch.device(device), budget_bytes
        self.units = [getattr(model, unit) for unit in UNITS]
        self.unit_bytes = [sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in self.units]
        if budget_bytes < max(self.unit_bytes):
            sizes = ", ".join(f"{n}={b / 2**20:.1f} MiB" for n, b in zip(UNITS, self.unit_bytes))
            raise ModelError(f"budget_bytes={budget_bytes} is smaller than the largest unit ({sizes}); "
                             f"raise it to at least {max(self.unit_bytes)}")
        self.resident: dict[int, int] = {}  # unit -> last use counter (loaded or being prefetched)
        self.pending: dict[int, Future] = {}
        self.resident_bytes = self.peak_resident_bytes = 0
        self.loads = 0
        self._clock = self._current = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        for i, unit in enumerate(self.units):
            unit.register_forward_pre_hook(lambda module, args, i=i: self._ensure(i))
            unit.register_forward_hook(lambda module, args, out, i=i: self._prefetch((i + 1) % len(UNITS)))

    @property
    def total_bytes(self) -> int:
        return sum(self.unit_bytes)

    # --- generate() protocol ---
    def new_state(self, batch_size: int, max_len: int = 0) -> THLState:
        return self.model.new_state(batch_size, max_len, device=self.device)

    @torch.inference_mode()
    def step(self, input_ids_BT: torch.Tensor, state: THLState) -> torch.Tensor:
        return self.model.step(input_ids_BT.to(self.device), state)

    # --- weight streaming ---
    def _read(self, i: int) -> dict[str, torch.Tensor]:
        """Runs on the prefetch thread: copy one unit's tensors out of the memory-mapped file."""
        with safe_open(str(self.path), framework="pt", device=str(self.device)) as f:
            return {name: f.get_tensor(f"{UNITS[i]}.{name}") for name, _ in self.units[i].named_parameters()}

    def _reserve(self, i: int, keep: int) -> None:
        """Evict least recently used units (never ``keep``) until unit ``i`` fits in the budget."""
        while self.resident_bytes + self.unit_bytes[i] > self.budget_bytes:
            victims = [j for j in self.resident if j != keep and j not in self.pending]
            if not victims:
                raise ModelError("layered engine cannot fit the next unit in its budget; raise budget_bytes")
            victim = min(victims, key=self.resident.get)
            for module in self.units[victim].modules():
                for pname, p in list(module._parameters.items()):
                    if p is not None:
                        module._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                                 requires_grad=False)
            del self.resident[victim]
            self.resident_bytes -= self.unit_bytes[victim]
        self.resident[i] = self._clock
        self.resident_bytes += self.unit_bytes[i]
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _prefetch(self, i: int) -> None:
        if i in self.resident or self.unit_bytes[i] + self.unit_bytes[self._current] > self.budget_bytes:
            return  # already there, or it cannot sit next to the unit just used: load it on demand instead
        self._reserve(i, keep=self._current)
        self.pending[i] = self._pool.submit(self._read, i)

    def _ensure(self, i: int) -> None:
        self._clock += 1
        self._current = i
        if i in self.resident and i not in self.pending:
            self.resident[i] = self._clock
            return
        if i not in self.pending:
            self._reserve(i, keep=i)
            self.pending[i] = self._pool.submit(self._read, i)
        tensors = self.pending.pop(i).result()
        self.loads += 1
        for name, tensor in tensors.items():
            module_name, _, pname = name.rpartition(".")
            self.units[i].get_submodule(module_name)._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
        self.resident[i] = self._clock
