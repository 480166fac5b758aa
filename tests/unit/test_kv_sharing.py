import pytest

from server.adapters.kv_sharing import shares_base_kv


def names(layer: int, *modules: str) -> list[str]:
    return [f"model.layers.{layer}.{m}" for m in modules]


@pytest.mark.parametrize(
    "targets",
    [
        names(0, "mlp.down_proj"),  # an MLP adapter changes the residual stream every later layer reads
        names(2, "self_attn.o_proj") + names(1, "self_attn.q_proj"),  # q/o in an earlier layer: later K/V change
        names(3, "self_attn.k_proj"),  # the last layer's own K
        names(3, "self_attn.v_proj"),
        ["encoder.block.3.dense"],  # a name whose layer cannot be read
    ],
)
def test_adapters_that_change_some_layer_kv_do_not_share(targets: list[str]) -> None:
    assert not shares_base_kv(targets, num_layers=4)


@pytest.mark.parametrize(
    "targets",
    [
        names(3, "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        ["lm_head"],
        [],
    ],
)
def test_adapters_confined_after_every_kv_projection_share(targets: list[str]) -> None:
    assert shares_base_kv(targets, num_layers=4)
