"""The C decode kernel on bfloat16 storage: float32 arithmetic, output rounded to nearest even like torch, and its
selection for CPU bfloat16. The float32 kernel and the shared shapes are in test_paged_attention.py."""

import pytest
import torch

from server.kernels.attention import native, select
from server.kernels.attention.native import decode_library, native_decode_usable, paged_decode_native
from server.kernels.attention.reference import paged_decode_reference
from server.kernels.attention.select import select_decode
from tests.unit.test_paged_attention import DECODE_SHAPES, random_case

# Skip only where the library does not build: a bfloat16 path failing its self-check must fail a test, not skip.
needs_library = pytest.mark.skipif(decode_library() is None, reason="no native paged attention kernel here")
BF16 = torch.bfloat16


@needs_library
def test_bf16_self_check_passes_where_the_kernel_builds() -> None:
    assert native_decode_usable(BF16)
    assert select_decode(torch.device("cpu"), BF16) == "native"


@needs_library
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "bs", "contexts"), DECODE_SHAPES)
def test_bf16_equals_float32_reference_rounded(
    heads: int, kv_heads: int, dim: int, bs: int, contexts: list[int]
) -> None:
    case = random_case(heads + dim + bs, heads, kv_heads, dim, bs, contexts)
    q, k_pool, v_pool, tables, ctx = (t.to(BF16) if t.is_floating_point() else t for t in case)
    exact = torch.empty(q.shape)
    paged_decode_reference(exact, q.float(), k_pool.float(), v_pool.float(), tables, ctx, max(contexts), 0.125)
    expected, got = exact.to(BF16), torch.full_like(q, float("nan"))
    paged_decode_native(got, q, k_pool, v_pool, tables, ctx, max(contexts), 0.125)
    # Both sides round float32 results that differ only by summation order (~1e-6), so they agree to one bfloat16
    # ulp (<= 2**-7 relative; rtol 1.6e-2, torch's bfloat16 default, allows two), and almost always exactly: a
    # float32 difference that small straddles a rounding boundary about once in 10**4 elements. A kernel rounding
    # another way (truncating, say) would be off by an ulp on about half of them.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1.6e-2)
    assert (got == expected).float().mean() > 0.99


def _equal_weights_case(values: torch.Tensor, bs: int) -> tuple[torch.Tensor, ...]:
    """A zero query over keys values[r, :n] (n = values.shape[1]): every weight is exactly 1/n, so out[r] is the
    exact mean of its keys' values, rounded once. values: [rows, n, D] -> q, k/v pools, tables, ctx."""
    rows, n, dim = values.shape
    per_row = -(-n // bs)
    padded = torch.zeros(rows, per_row * bs, dim, dtype=BF16)
    padded[:, :n] = values
    order = torch.randperm(rows * per_row, generator=torch.Generator().manual_seed(n))  # blocks out of order
    v_pool = torch.empty(rows * per_row, bs, 1, dim, dtype=BF16)
    v_pool[order] = padded.view(rows * per_row, bs, 1, dim)
    k_pool = torch.randn(v_pool.shape).to(BF16)
    tables = order.to(torch.int32).view(rows, per_row)
    return torch.zeros(rows, 1, dim, dtype=BF16), k_pool, v_pool, tables, torch.full((rows,), n, dtype=torch.int32)


@needs_library
@pytest.mark.parametrize(("n", "bs"), [(2, 2), (4, 2), (4, 16)])
def test_bf16_rounds_to_nearest_even_like_torch(n: int, bs: int) -> None:
    """Means of n bfloat16 values with exponents in [-3, 3] are exact in float32 and often exact ties (a half-ulp
    bit): the kernel's bits must equal torch's float32 -> bfloat16 conversion of the exact mean."""
    g = torch.Generator().manual_seed(n + bs)
    mantissa = 1 + torch.randint(0, 128, (64, n, 32), generator=g) / 128
    sign = torch.randint(0, 2, mantissa.shape, generator=g) * 2 - 1
    values = (sign * mantissa * 2.0 ** torch.randint(-3, 4, mantissa.shape, generator=g)).to(BF16)
    values[0, :2, 0] = torch.tensor([1 + 2**-7, 1 + 2**-6])  # mean 1 + 3 * 2**-8: a tie, even is 1 + 2**-6
    assert torch.equal(values.float().to(BF16).float(), values.float())  # exactly representable, as constructed
    q, k_pool, v_pool, tables, ctx = _equal_weights_case(values, bs)
    out = torch.empty_like(q)
    paged_decode_native(out, q, k_pool, v_pool, tables, ctx, n, 1.0)
    expected = (values.float().sum(1) / n).to(BF16)
    assert torch.equal(out[:, 0].view(torch.int16), expected.view(torch.int16))
    if n == 2:
        assert out[0, 0, 0].item() == 1 + 2**-6


@needs_library
def test_bf16_nan_in_context_gives_nan_and_stale_values_past_it_are_ignored() -> None:
    values = torch.ones(2, 6, 16, dtype=BF16)
    values[0, 1, 3] = float("nan")
    values[1, 5] = float("nan")
    q, k_pool, v_pool, tables, ctx = _equal_weights_case(values, 4)
    ctx[1] = 5  # row 1 stops before its last position, which holds stale non-finite values
    k_pool[tables[1, 1], 1] = float("inf")
    out = torch.empty_like(q)
    paged_decode_native(out, q, k_pool, v_pool, tables, ctx, 6, 1.0)
    assert out[0, 0, 3].isnan() and out[0, 0].isnan().sum() == 1
    assert torch.equal(out[1], torch.ones(1, 16, dtype=BF16))


@needs_library
def test_native_refuses_other_and_mixed_dtypes() -> None:
    q, k_pool, v_pool, tables, ctx = random_case(3, 4, 2, 16, 4, [5, 8])
    out = torch.zeros_like(q, dtype=BF16)
    with pytest.raises(TypeError):  # a bfloat16 query against float32 pools
        paged_decode_native(out, q.to(BF16), k_pool, v_pool, tables, ctx, 8, 1.0)
    with pytest.raises(TypeError):  # float16 stays on the torch path
        paged_decode_native(q.half(), q.half(), k_pool.half(), v_pool.half(), tables, ctx, 8, 1.0)
    assert not out.any()


def test_select_decode_by_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert select_decode(cpu, BF16) == ("native" if native_decode_usable(BF16) else "torch")
    assert select_decode(cpu, torch.float16) == "torch"
    monkeypatch.setattr(select, "native_decode_usable", lambda dtype: dtype != BF16)  # bf16 self-check failed
    assert select_decode(cpu, BF16) == "torch"


@needs_library
def test_bf16_self_check_rejects_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def three_ulps_off(out: torch.Tensor, *args: object) -> None:
        paged_decode_native(out, *args)  # type: ignore[arg-type]
        out.view(torch.int16).add_(3)  # three ulps further from zero

    monkeypatch.setattr(native, "paged_decode_native", three_ulps_off)
    native_decode_usable.cache_clear()
    try:
        assert not native_decode_usable(BF16)
    finally:
        monkeypatch.undo()
        native_decode_usable.cache_clear()
    assert native_decode_usable(BF16)
