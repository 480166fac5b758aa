"""The prefix-cache key rule against a real forward pass: which LoRA adapters change which layers' K/V."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loadtests.common.factories import build_tiny_model
from server.adapters.kv_sharing import shares_base_kv

LAYERS = 3


def layer_kv(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return [(cache.layers[i].keys.clone(), cache.layers[i].values.clone()) for i in range(LAYERS)]


def with_lora(base: torch.nn.Module, target_modules: list[str]) -> torch.nn.Module:
    torch.manual_seed(7)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                                            init_lora_weights=False))  # fmt: skip
    return model.eval()


@pytest.mark.parametrize(
    ("targets", "first_changed"),
    [
        (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], 1),  # MLP-only: every layer after the first differs
        (["self_attn.q_proj", "self_attn.o_proj"], 1),  # q/o only: likewise
        (["self_attn.k_proj"], 0),
    ],
)
def test_adapters_off_k_and_v_still_change_later_layers_kv(targets: list[str], first_changed: int) -> None:
    """An adapter that does not touch k_proj/v_proj still changes the K/V of every later layer, so the base model's
    cached blocks must not serve it (the rule ``shares_base_kv`` encodes)."""
    base = build_tiny_model(layers=LAYERS).eval()
    ids = torch.randint(3, base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = layer_kv(base, ids)
    adapted = layer_kv(with_lora(base, targets), ids)
    for layer in range(LAYERS):
        same = torch.equal(plain[layer][0], adapted[layer][0]) and torch.equal(plain[layer][1], adapted[layer][1])
        assert same == (layer < first_changed), f"layer {layer}"
    names = [f"model.layers.{i}.{t}" for i in range(LAYERS) for t in targets]
    assert not shares_base_kv(names, LAYERS)


def test_an_adapter_on_the_last_layer_off_k_and_v_leaves_every_layer_kv_alone() -> None:
    base = build_tiny_model(layers=LAYERS).eval()
    ids = torch.randint(3, base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    targets = [f"model.layers.{LAYERS - 1}.{m}" for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    adapted_model = with_lora(base, targets)
    for (k0, v0), (k1, v1) in zip(layer_kv(base, ids), layer_kv(adapted_model, ids), strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    with torch.no_grad():  # the adapter does change the output, through the last layer
        assert not torch.allclose(base(input_ids=ids).logits, adapted_model(input_ids=ids).logits)
    assert shares_base_kv(targets, LAYERS)
