"""DoRA pieces on their own: the wrapped layer against PEFT's DoRA layer, reading magnitudes, configs, pool rows."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from loadtests.common.dora import MAGNITUDE, save_dora_adapter
from server.adapters.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from server.adapters.peft_config import parse_lora_config
from server.kernels.mapping import TokenSlotMapping
from server.kernels.reference import ReferenceOp
from server.lora.context import DoraTokens, LoraContext, LoraStep
from server.lora.dora import weight_row_norms_sq
from server.lora.layers import BatchedLoraLinear
from server.lora.pool_fit import resident_under_budget
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel
from server.model.packed_linear import PackedLinear, packing_works

Q = "base_model.model.model.layers.0.self_attn.q_proj"


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# The step's two DoRA runs (tokens 0-1 and 6-7, g - 1 in pool row 4) as slices, gathered, or one of each.
DORA_PATHS = {
    "spans": DoraTokens(((0, 2, 4), (6, 8, 4)), None, None, frozenset({1})),
    "gathered": DoraTokens((), torch.tensor([0, 1, 6, 7]), torch.full((4,), 4), frozenset({1})),
    "mixed": DoraTokens(((6, 8, 4),), torch.tensor([0, 1]), torch.full((2,), 4), frozenset({1})),
}


@pytest.mark.parametrize("path", sorted(DORA_PATHS))
@pytest.mark.parametrize(
    "packed",
    [False, pytest.param(True, marks=pytest.mark.skipif(not packing_works(torch.float32), reason="no oneDNN"))],
)
def test_the_layer_equals_peft_dora_linear(packed: bool, path: str) -> None:
    """Tokens on a DoRA adapter (rsLoRA), a plain one and the base, through one BatchedLoraLinear (its base packed
    for oneDNN or not: the norms come from running the base on A) against PEFT on the same linear with a bias."""
    torch.manual_seed(0)
    toy = Toy().eval()
    dora_cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["proj"], use_dora=True,
                          init_lora_weights=False)  # fmt: skip
    peft = get_peft_model(copy.deepcopy(toy), dora_cfg, adapter_name="dora")
    peft.add_adapter("plain", LoraConfig(r=6, lora_alpha=12, target_modules=["proj"], init_lora_weights=False))
    layer = peft.base_model.model.proj
    with torch.no_grad():
        magnitude = layer.lora_magnitude_vector["dora"].weight
        magnitude.mul_(torch.rand(40) + 0.5)  # off PEFT's start value, where DoRA equals plain LoRA
    x = torch.randn(7, 24)
    expected = []
    for name in ("dora", None, "plain", "dora"):
        with torch.no_grad():
            if name is None:
                with peft.disable_adapter():
                    expected.append(peft(x[:2]))
            else:
                peft.set_adapter(name)
                expected.append(peft(x[:2]))

    base = copy.deepcopy(toy.proj)
    norms = weight_row_norms_sq(base.weight.detach())
    context = LoraContext()
    ours = BatchedLoraLinear(base, 2, 12, context, ReferenceOp(), norms, torch.float32)
    if packed:  # as pack_linears does after wrapping: the dense weight is gone
        ours.base = PackedLinear(base)
    ours.write_slot(1, layer.lora_A["dora"].weight, layer.lora_B["dora"].weight, layer.scaling["dora"], offset=0)
    ours.write_dora(1, 4, magnitude.detach())
    ours.write_slot(2, layer.lora_A["plain"].weight, layer.lora_B["plain"].weight, layer.scaling["plain"], offset=5)
    slots = [1, 1, 0, 0, 2, 2, 1, 1]
    mapping = TokenSlotMapping.build(slots)
    context.set(LoraStep(len(slots), ReferenceOp().prepare(mapping), DORA_PATHS[path]))
    with torch.no_grad():
        got = ours(torch.cat([x[:2], x[:2], x[:2], x[:2]]))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=0)
    context.set(LoraStep(len(slots), ReferenceOp().prepare(mapping)))  # the same step without its DoRA rescale
    with torch.no_grad():
        unscaled = ours(torch.cat([x[:2], x[:2], x[:2], x[:2]]))
    assert (unscaled[:2] - expected[0]).abs().max() > 1e-2  # so the test above can fail


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> LoraModel:
    return LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=2, max_rank=32)


@pytest.fixture(scope="module")
def saved_dora(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    return save_dora_adapter(base, tmp_path_factory.mktemp("dora") / "d", seed=3, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])  # fmt: skip


@pytest.fixture
def dora_copy(saved_dora: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_dora, tmp_path / "copy"))


def _edit(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


def test_reads_the_magnitudes(model: LoraModel, saved_dora: Path) -> None:
    weights = model.read_adapter(saved_dora)
    stored = load_file(saved_dora / WEIGHTS_FILE)
    assert weights.spec.use_dora and model.rows_of(weights) == 9
    for name, lw in weights.layers.items():
        assert lw.magnitude is not None and lw.magnitude.dtype == torch.float32
        torch.testing.assert_close(lw.magnitude, stored[f"base_model.model.{name}{MAGNITUDE}"], atol=0, rtol=0)


MAGNITUDE_REFUSALS = {
    "missing": (lambda t: t.pop(Q + MAGNITUDE), AdapterFormatError, "missing tensor .* lora_magnitude_vector"),
    "wrong shape": (lambda t: t.update({Q + MAGNITUDE: torch.ones(63)}), AdapterMismatchError, r"\(64,\)"),
    "not finite": (lambda t: t[Q + MAGNITUDE].__setitem__(3, float("inf")), AdapterFormatError, "NaN or infinite"),
    "integer": (lambda t: t.update({Q + MAGNITUDE: torch.ones(64, dtype=torch.int32)}), AdapterFormatError, "dtype"),
    "untargeted module": (
        lambda t: t.update({Q.replace("q_proj", "k_proj") + MAGNITUDE: torch.ones(32)}),
        AdapterFormatError,
        "extra tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(MAGNITUDE_REFUSALS))
def test_magnitude_refusals(case: str, model: LoraModel, dora_copy: Path) -> None:
    edit, error, words = MAGNITUDE_REFUSALS[case]
    _edit(dora_copy, edit)
    with pytest.raises(error, match=words):
        model.read_adapter(dora_copy)


def test_magnitudes_without_use_dora_are_refused(model: LoraModel, dora_copy: Path) -> None:
    config = json.loads((dora_copy / CONFIG_FILE).read_text())
    (dora_copy / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(AdapterFormatError, match="use_dora=false"):
        model.read_adapter(dora_copy)


def test_config_accepts_use_dora_and_refuses_it_where_peft_does() -> None:
    base = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    assert parse_lora_config(json.dumps({**base, "use_dora": True})).use_dora
    assert not parse_lora_config(json.dumps({**base, "use_dora": False})).use_dora
    assert not parse_lora_config(json.dumps(base)).use_dora
    with pytest.raises(UnsupportedAdapterError, match="megatron_config"):
        parse_lora_config(json.dumps({**base, "use_dora": True, "megatron_config": {"tensor_model_parallel_size": 2}}))
    with pytest.raises(UnsupportedAdapterError, match="lora_bias"):  # PEFT's LoraConfig refuses DoRA with it too
        parse_lora_config(json.dumps({**base, "use_dora": True, "lora_bias": True}))


def test_pool_fit_counts_the_dora_row() -> None:
    # Four adapters of rank 8 in 33 rows: all four as plain LoRA, three when two of them are DoRA (9 rows each).
    assert resident_under_budget([8] * 4, 33 * 100, 100, num_slots=4).resident == 4
    assert resident_under_budget([8] * 4, 33 * 100, 100, num_slots=4, dora=[True, False, True]).resident == 3
