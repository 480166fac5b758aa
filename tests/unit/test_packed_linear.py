"""oneDNN-packed frozen linears give ``nn.Linear``'s results, and packing a model swaps every linear exactly once."""

import pytest
import torch
from torch import nn

from server.lora.layers import BatchedLoraLinear
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.packed_linear import PackedLinear, pack_linears, packing_works

pytestmark = pytest.mark.skipif(not packing_works(torch.float32), reason="this torch build cannot pack CPU weights")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (1, 5), (2, 3)])  # leading dims of x
def test_packed_linear_equals_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape, 48)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(PackedLinear(linear)(x.mT.contiguous().mT), linear(x), atol=1e-5, rtol=1e-5)


def test_pack_linears_swaps_every_linear_once_and_keeps_the_logits(tiny_model_dir) -> None:
    plain = load_base_model(tiny_model_dir("llama"))
    model = load_base_model(tiny_model_dir("llama"))
    linears = sum(type(m) is nn.Linear for m in model.modules())
    input_ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = plain(input_ids=input_ids).logits
        assert pack_linears(model) == linears > 0
        got = model(input_ids=input_ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), PackedLinear)  # the (tied) output head too
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert pack_linears(model) == 0  # nothing left to pack
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("pack", [True, False])
def test_lora_model_packs_its_base_linears_unless_told_not_to(pack: bool, tiny_model_dir) -> None:
    model = LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=1, max_rank=8, pack_weights=pack)
    layer = next(iter(model.layers.values()))
    assert isinstance(layer, BatchedLoraLinear)
    assert isinstance(layer.base, PackedLinear) is pack
    assert (model.packed_linears > 0) is pack


def test_packing_is_refused_for_dtypes_onednn_does_not_pack() -> None:
    assert not packing_works(torch.float16)


def test_padded_rows_buckets_are_few_and_pad_at_most_a_quarter() -> None:
    from server.model.packed_linear import padded_rows, row_buckets

    rows = (1, 4, 5, 8, 9, 16, 17, 32, 33, 218, 2048)
    assert [padded_rows(m) for m in rows] == [1, 4, 5, 8, 10, 16, 20, 32, 40, 224, 2048]
    assert all(m <= padded_rows(m) <= 1.25 * m for m in range(1, 5000))
    assert len(row_buckets(2048)) == 40


def test_padded_calls_ignore_the_stale_rows_of_the_shared_buffer() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(16, 8)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        big = torch.randn(40, 16)
        packed(big)  # leaves 40 rows of data in the shared buffer
        for rows in (33, 17, 5):  # padded to 40, 20, 5 rows
            x = torch.randn(rows, 16)
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)


def test_warm_up_runs_every_bucket_of_every_weight_shape_once(tiny_model_dir, monkeypatch) -> None:
    from server.model import packed_linear
    from server.model.packed_linear import row_buckets, warm_up

    model = load_base_model(tiny_model_dir("llama"))
    head = model.get_output_embeddings()
    shapes = {(m.in_features, m.out_features) for m in model.modules() if type(m) is nn.Linear and m is not head}
    pack_linears(model)
    monkeypatch.setattr(packed_linear, "_WARMED", set())
    assert warm_up(model, max_rows=64, max_head_rows=8) == len(shapes) * len(row_buckets(64)) + len(row_buckets(8))
    assert warm_up(model, max_rows=64, max_head_rows=8) == 0  # every kernel is built already
    assert warm_up(model, max_rows=80, max_head_rows=8) == len(shapes) * (len(row_buckets(80)) - len(row_buckets(64)))
