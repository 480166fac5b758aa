"""Frozen linears with their weights packed once into oneDNN's blocked layout, for the CPU.

Stock PyTorch runs a CPU ``nn.Linear`` in float32 through MKL's sgemm. On this project's reference machine (a
2-core AMD EPYC with AVX-512) the same products through oneDNN, with the weight reordered once at startup, measured
1.0x to 3.5x faster depending on the shape and the rows (1.0x to 2.8x for a 32-row decode step's projections and LM
head, 1.15x to 1.4x at 1,000 rows; docs/benchmarks.md). The base model is frozen, so the reorder is paid once and
the original weight is dropped (a tied output head keeps the embedding's copy: one extra copy of that matrix).

Results equal ``nn.Linear``'s up to float rounding (a different summation order): about 1e-6 relative.

oneDNN builds (JIT-compiles) and caches one kernel per input shape, 0.6-0.8 MB of memory each, never freed. A
step's token count takes any value up to the step budget, so the row count is padded up to a bucket (exact up to
4 rows, then 4 buckets per doubling: 5, 6, 7, 8, 10, 12, 14, 16, 20, ...; at most 25% padding, 10% on average),
which bounds the kernels to about 40 per weight shape. ``warm_up`` builds them all at startup, so serving never
pays a compile and memory does not grow after it.
"""

import functools
import logging
import platform

import torch
from torch import nn
from transformers import PreTrainedModel

from server.model.quantize import is_quantized

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class RowPadding:
    """Input buffers, one per input width, reused to pad a linear's rows up to their bucket without allocating.

    Shared by the packed linears of one model, which runs on one thread at a time. Rows past the real ones keep
    whatever an earlier call left there: each output row of a linear depends on its own input row only, and the
    padded output rows are dropped.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def pad(self, flat: torch.Tensor, padded: int) -> torch.Tensor:
        """flat [M, in] -> [padded, in] (padded >= M), a view of the buffer holding ``flat`` in its first M rows."""
        key = (flat.shape[1], flat.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < padded:
            buffer = self._buffers[key] = flat.new_zeros(padded, flat.shape[1])
        out = buffer[:padded]
        out[: flat.shape[0]].copy_(flat)
        return out


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` [out, in] held in oneDNN's packed layout (inference only, no autograd).

    x: [..., in] (same dtype as W) -> y: [..., out]
    """

    def __init__(self, linear: nn.Linear, padding: RowPadding | None = None) -> None:
        super().__init__()
        self.padding = padding if padding is not None else RowPadding()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        # Plain attributes, not parameters: an opaque oneDNN tensor has no strides for state_dict or .to() to use.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [M, in]
        rows = flat.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            flat = self.padding.pad(flat, padded)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")  # [padded, out]
        return y[:rows].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] (float32 or bfloat16) -> the opaque oneDNN tensor ``PackedLinear.packed`` holds (``to_dense()``
    gives W back). For code that rewrites a frozen weight (``server.model.merge``)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def padded_rows(rows: int) -> int:
    """The bucket ``rows`` is padded to: itself up to 4, else the next multiple of a quarter of the largest power of
    2 not above it (4 buckets per doubling)."""
    if rows <= 4:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


def row_buckets(max_rows: int) -> list[int]:
    """Every bucket a call with 1..max_rows rows can use, ascending."""
    return sorted({padded_rows(m) for m in range(1, max_rows + 1)})


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can pack ``dtype`` weights and get ``nn.Linear``'s answer (checked once).

    x86-64 only: that is where the speedup was measured; oneDNN on ARM goes through other kernels.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(0)
            linear = nn.Linear(24, 40, dtype=dtype)
            x = torch.randn(3, 5, 24, generator=generator).to(dtype)
            got = PackedLinear(linear)(x)
            expected = linear(x)
    except RuntimeError as exc:  # a build without the oneDNN ops, or an unsupported CPU
        log.warning("oneDNN weight packing is unavailable (%s); using plain linears", exc)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=0)


def pack_linears(model: PreTrainedModel) -> int:
    """Replace every float ``nn.Linear`` of a CPU ``model`` (output head included) by a ``PackedLinear``.

    Returns how many were replaced: 0 on other devices, for dtypes oneDNN cannot pack here, and on a second call.
    Linears stored quantized (``--quantize``) keep their library's kernels: oneDNN packs float weights only.
    """
    if model.device.type != "cpu" or not packing_works(model.dtype):
        return 0
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.dtype == model.dtype and not is_quantized(m)
    ]
    padding = RowPadding()
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(linear, padding))
    return len(targets)


# (in, out, has bias, dtype, rows) of every kernel built so far: oneDNN's cache is per process, so a second runner
# on the same model (or a second model of the same shapes) has nothing left to build.
_WARMED: set[tuple[int, int, bool, torch.dtype, int]] = set()


@torch.inference_mode()
def warm_up(model: PreTrainedModel, max_rows: int, max_head_rows: int) -> int:
    """Build oneDNN's kernel for every row bucket of every packed weight shape not built yet; returns how many
    calls that took.

    ``max_rows`` bounds the rows of a forward pass (the step's token budget); the output head sees at most
    ``max_head_rows`` (one per sequence), so its larger buckets are never needed.
    """
    head = model.get_output_embeddings()
    calls = 0
    for module in model.modules():
        if not isinstance(module, PackedLinear):
            continue
        for rows in row_buckets(max_head_rows if module is head else max_rows):
            key = (module.in_features, module.out_features, module.bias is not None, module.dtype, rows)
            if key not in _WARMED:
                module(torch.zeros(rows, module.in_features, dtype=module.dtype))
                _WARMED.add(key)
                calls += 1
    return calls
