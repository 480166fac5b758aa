"""``LoraModel``: the frozen base model with every LoRA-targetable linear wrapped by a ``BatchedLoraLinear``.

It is the slot cache's backend (``pool_rows``, ``bytes_per_row``, ``rows_of``, ``write_slot``, ``clear_slot``,
``move_slot``) and the one place that turns an adapter's host copy into slot contents. Adapters live at their true
rank in one pool of rank rows per wrapped layer (``BatchedLoraLinear``), sized by ``adapter_cache_bytes``. Callers
pick each token's slot with a ``TokenSlotMapping`` per forward pass; ``prepare`` turns it into the active op's
metadata once per step and ``using`` publishes that to the wrapped layers.

DoRA adapters (``server.lora.dora``) take one pool row more than their rank, the same row in every layer, holding
their per-feature rescaling; ``prepare`` lists the step's DoRA tokens with that row once per step.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from server.adapters.checkpoint import AdapterWeights, TargetableModules, read_adapter
from server.adapters.errors import AdapterMismatchError
from server.kernels.mapping import TokenSlotMapping
from server.kernels.select import LORA_OPS, select_op
from server.kernels.slots import adapter_slots
from server.lora.context import DoraTokens, LoraContext, LoraStep
from server.lora.dora import weight_row_norms_sq
from server.lora.layers import BatchedLoraLinear
from server.lora.pool_fit import adapter_rows
from server.model.packed_linear import pack_linears
from server.model.quantize import dense_weight

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# DoRA's rescale per layer: a slice op per run, or one gather for many short runs (decode tokens of many DoRA
# adapters). Measured on the CPU (SmolLM2-135M shapes, one thread): 3 runs of 3 decode tokens 8.2 ms a step as spans
# vs 12.4 gathered; 8 such runs 16.3 vs 11.7; 3 prompt runs of 100-300 tokens 28 vs 230.
DORA_SPANS = 4
DORA_SPAN_TOKENS = 16


class LoraModel:
    """A frozen causal LM whose target linears serve up to ``num_slots`` adapters at once, each up to rank
    ``max_rank``, as many as their ranks fit in ``adapter_cache_bytes``.

    adapter_cache_bytes: the pool of every wrapped layer together; ``pool_rows = adapter_cache_bytes //
    bytes_per_row`` rank rows (a rank-r adapter takes r). None: ``default_pool_rows`` rows, or ``num_slots *
    max_rank`` (room for ``num_slots`` adapters of the largest rank) when that is None too. A budget that cannot hold
    one adapter of ``max_rank`` is refused.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        num_slots: int,
        max_rank: int,
        op: str = "auto",
        targets: Sequence[str] = DEFAULT_TARGETS,
        pack_weights: bool = True,
        adapter_cache_bytes: int | None = None,
        default_pool_rows: int | None = None,
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
        wrapped = [name for name in linear_names if name.rsplit(".", 1)[-1] in targets]
        if not wrapped:
            raise ValueError(f"the base model has none of the target modules {', '.join(targets)}")
        element = self.dtype.itemsize
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        # one rank row of A and B in every wrapped layer
        self.bytes_per_row = sum((linears[n].in_features + linears[n].out_features) * element for n in wrapped)
        self.pool_rows = self._pool_rows(default_pool_rows or num_slots * max_rank, max_rank, adapter_cache_bytes)
        self.layers: dict[str, BatchedLoraLinear] = {}
        for name in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            # ||W_i||^2 for DoRA's norms, read now: packing (below) drops the dense weight
            norms = weight_row_norms_sq(dense_weight(base))
            layer = BatchedLoraLinear(base, num_slots, self.pool_rows, self.context, self.op, norms, self.dtype)
            setattr(parent, child, layer)
            self.layers[name] = layer
        self.modules = TargetableModules(
            shapes={name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()},
            module_names=module_names,
            linear_names=linear_names,
        )
        self.dora: dict[int, tuple[int, int]] = {}  # DoRA slot -> (its first pool row, its row of g - 1)
        # CPU only: the frozen weights in oneDNN's packed layout (names and shapes above are read before this).
        self.packed_linears = pack_linears(model) if pack_weights else 0

    def read_adapter(self, folder: str | os.PathLike[str]) -> AdapterWeights:
        """Read and validate an adapter for this model; pinned host memory when the model is on CUDA."""
        weights = read_adapter(folder, self.modules, self.max_rank, self.dtype)
        rows = self.rows_of(weights)
        if rows > self.pool_rows:  # only DoRA's extra row can take an adapter of the largest rank past the pool
            raise AdapterMismatchError(
                f"a DoRA adapter of rank {weights.rank} takes {rows} pool rows (its rank and its magnitude row); "
                f"this server's pool holds {self.pool_rows}"
            )
        return weights.pin_memory() if self.device.type == "cuda" else weights

    @property
    def pool_bytes(self) -> int:
        """Bytes of the adapter pools of all wrapped layers (the zero row each keeps aside not counted)."""
        return self.pool_rows * self.bytes_per_row

    def _pool_rows(self, default_rows: int, max_rank: int, adapter_cache_bytes: int | None) -> int:
        if adapter_cache_bytes is None:
            return max(default_rows, max_rank)
        rows = adapter_cache_bytes // self.bytes_per_row
        if rows < max_rank:
            raise ValueError(
                f"an adapter cache of {adapter_cache_bytes} bytes holds {rows} rank rows of {self.bytes_per_row} "
                f"bytes; one adapter of the largest rank ({max_rank}) needs {max_rank * self.bytes_per_row} bytes"
            )
        return rows

    def rows_of(self, weights: AdapterWeights) -> int:
        """Pool rows ``weights`` takes in every layer: its largest rank (modules with a smaller rank, or none, leave
        the rest of the range unused in their layer), plus DoRA's row of ``g - 1``, the last of the range."""
        return adapter_rows(weights.rank, weights.spec.use_dora)

    def write_slot(self, slot: int, weights: AdapterWeights, offset: int | None = None) -> None:
        """Copy an adapter into ``slot`` of every wrapped layer, its rows from ``offset`` (the slot cache's choice;
        None: the slot's ``home_offset``, for adapters placed by hand); layers it does not adapt get an empty slot.

        A DoRA adapter's ``g - 1`` is computed here, per layer, on the device (``server.lora.dora``)."""
        rows = self.rows_of(weights)
        if offset is None:
            first = next(iter(self.layers.values()))
            offset = first.home_offset(slot)
            if rows > self.pool_rows // self.num_slots:
                home = self.pool_rows // self.num_slots
                raise ValueError(f"{rows} rows do not fit slot {slot}'s home range of {home} rows")
        dora_row = offset + rows - 1 if weights.spec.use_dora else None
        self.dora.pop(slot, None)
        for name, layer in self.layers.items():
            lw = weights.layers.get(name)
            if lw is None:
                layer.clear_slot(slot)
            else:
                layer.write_slot(slot, lw.a, lw.b, lw.scale, offset)
            if dora_row is not None:
                layer.write_dora(slot, dora_row, None if lw is None else lw.magnitude)
        if dora_row is not None:
            self.dora[slot] = (offset, dora_row)

    def clear_slot(self, slot: int) -> None:
        self.dora.pop(slot, None)
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def move_slot(self, slot: int, offset: int) -> None:
        """Move ``slot``'s rows down to start at ``offset`` in every layer (the slot cache's compaction)."""
        for layer in self.layers.values():
            layer.move_slot(slot, offset)
        if slot in self.dora:  # its LoRA rows moved first: they never reach the old DoRA row, the range's last
            old_offset, old_row = self.dora[slot]
            row = old_row - old_offset + offset
            for layer in self.layers.values():
                layer.move_dora(slot, row)
            self.dora[slot] = (offset, row)

    @property
    def slots(self) -> range:
        return adapter_slots(self.num_slots)

    def prepare(self, mapping: TokenSlotMapping | None) -> LoraStep | None:
        """The active op's metadata for one step, built once for every wrapped layer; None when no token uses an
        adapter (the layers then skip the LoRA add)."""
        if mapping is None or not mapping.runs:
            return None
        return LoraStep(mapping.num_tokens, self.op.prepare(mapping), self._dora_tokens(mapping))

    def _dora_tokens(self, mapping: TokenSlotMapping) -> DoraTokens | None:
        """The step's tokens on DoRA slots and each one's row of ``g - 1``; None when there are none.

        Runs of at least ``DORA_SPAN_TOKENS`` tokens, or all runs when they are at most ``DORA_SPANS``, become
        spans (an op per run and layer); the other runs are gathered (a few ops per layer, whatever their number).
        """
        if not self.dora:
            return None
        runs = [(start, end, self.dora[slot][1]) for slot, start, end in mapping.runs if slot in self.dora]
        if not runs:
            return None
        slots = frozenset(slot for slot, _, _ in mapping.runs if slot in self.dora)
        if len(runs) <= DORA_SPANS:
            return DoraTokens(tuple(runs), None, None, slots)
        spans = tuple(run for run in runs if run[1] - run[0] >= DORA_SPAN_TOKENS)
        short = [run for run in runs if run[1] - run[0] < DORA_SPAN_TOKENS]
        if not short:
            return DoraTokens(spans, None, None, slots)
        tokens = [t for start, end, _ in short for t in range(start, end)]
        rows = [row for start, end, row in short for _ in range(start, end)]
        both = torch.tensor([tokens, rows], dtype=torch.int64).to(mapping.device, non_blocking=True)
        return DoraTokens(spans, both[0], both[1], slots)

    @contextmanager
    def using(self, step: LoraStep | None) -> Iterator[None]:
        """Run the forward passes inside the block with ``step`` (None = base model for every token)."""
        self.context.set(step)
        try:
            yield
        finally:
            self.context.clear()
