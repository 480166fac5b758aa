"""``LoraModel``: the frozen base model with every LoRA-targetable linear wrapped by a ``BatchedLoraLinear``.

It is the slot cache's backend (``write_slot``/``clear_slot``) and the one place that turns an adapter's host copy
into slot contents. Callers pick each token's slot with a ``TokenSlotMapping`` per forward pass; ``prepare`` turns
it into the active op's metadata once per step and ``using`` publishes that to the wrapped layers.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn
from transformers import PreTrainedModel

from server.adapters.checkpoint import AdapterWeights, TargetableModules, read_adapter
from server.kernels.mapping import TokenSlotMapping
from server.kernels.select import LORA_OPS, select_op
from server.kernels.slots import adapter_slots
from server.lora.context import LoraContext, LoraStep
from server.lora.layers import BatchedLoraLinear
from server.model.packed_linear import pack_linears

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraModel:
    """A frozen causal LM whose target linears serve ``num_slots`` adapters at once, up to rank ``max_rank``."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_slots: int,
        max_rank: int,
        op: str = "auto",
        targets: Sequence[str] = DEFAULT_TARGETS,
        pack_weights: bool = True,
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be at least 1")
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = model.device
        self.dtype = model.dtype
        self.context = LoraContext()
        self.op = select_op(op, self.device, self.dtype)  # chosen once; only this op builds per-step metadata
        self.op_name = next(name for name, candidate in LORA_OPS.items() if candidate is self.op)
        output_head = model.get_output_embeddings()
        module_names = tuple(name for name, _ in model.named_modules() if name)
        linear_names = tuple(
            name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output_head
        )
        self.layers: dict[str, BatchedLoraLinear] = {}
        for name in linear_names:
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            layer = BatchedLoraLinear(base, num_slots, max_rank, self.context, self.op)
            setattr(parent, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"the base model has none of the target modules {', '.join(targets)}")
        self.modules = TargetableModules(
            shapes={name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()},
            module_names=module_names,
            linear_names=linear_names,
        )
        # CPU only: the frozen weights in oneDNN's packed layout (names and shapes above are read before this).
        self.packed_linears = pack_linears(model) if pack_weights else 0

    def read_adapter(self, folder: str | os.PathLike[str]) -> AdapterWeights:
        """Read and validate an adapter for this model; pinned host memory when the model is on CUDA."""
        weights = read_adapter(folder, self.modules, self.max_rank, self.dtype)
        return weights.pin_memory() if self.device.type == "cuda" else weights

    def write_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into ``slot`` of every wrapped layer; layers it does not adapt get an empty slot."""
        for name, layer in self.layers.items():
            lw = weights.layers.get(name)
            if lw is None:
                layer.clear_slot(slot)
            else:
                layer.write_slot(slot, lw.a, lw.b, lw.scale)

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)

    @property
    def slots(self) -> range:
        return adapter_slots(self.num_slots)

    def prepare(self, mapping: TokenSlotMapping | None) -> LoraStep | None:
        """The active op's metadata for one step, built once for every wrapped layer; None when no token uses an
        adapter (the layers then skip the LoRA add)."""
        if mapping is None or not mapping.runs:
            return None
        return LoraStep(mapping.num_tokens, self.op.prepare(mapping))

    @contextmanager
    def using(self, step: LoraStep | None) -> Iterator[None]:
        """Run the forward passes inside the block with ``step`` (None = base model for every token)."""
        self.context.set(step)
        try:
            yield
        finally:
            self.context.clear()
