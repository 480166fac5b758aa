"""AdaLoRA configs and saves: what peft's AdaLoraConfig writes is parsed to the ranks and scale peft computes, the
training schedule is accepted, and everything peft's AdaLoRA would not apply or load is refused by name."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig
from safetensors.torch import save_file

from server.adapters.adalora import AdaLoraSpec
from server.adapters.checkpoint import CONFIG_FILE, WEIGHTS_FILE, TargetableModules, read_adapter
from server.adapters.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from server.adapters.peft_config import parse_lora_config

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
MODULES = TargetableModules(
    shapes={Q: (16, 16), V: (16, 8)},
    module_names=("model", "model.layers", "model.layers.0", "model.layers.0.self_attn", Q, V),
    linear_names=(Q, V),
)


def _config(**overrides: object) -> dict:
    """What peft 0.21 saves for an AdaLoRA adapter (init_r 4) on q_proj and v_proj, after pruning."""
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=50, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")  # fmt: skip
    cfg.rank_pattern = {f"{Q}.lora_E": [True, False, True, False], f"{V}.lora_E": [False] * 4}
    with tempfile.TemporaryDirectory() as folder:
        cfg.save_pretrained(folder)
        return json.loads((Path(folder) / CONFIG_FILE).read_text()) | overrides


def test_a_peft_config_gives_the_masks_ranks_and_peft_scale() -> None:
    spec = parse_lora_config(json.dumps(_config()))
    assert isinstance(spec, AdaLoraSpec) and spec.peft_type == "ADALORA" and spec.init_r == 4 and spec.r == 4
    assert dict(spec.ranks) == {Q: 2, V: 0} and spec.max_rank == 2
    assert spec.rank_for(Q) == 2 and spec.rank_for(V) == 0
    # scaling / (ranknum + 1e-5) with ranknum = init_r (not the kept rank), in float32 as peft holds it
    assert torch.tensor(spec.scale_for(Q)) == torch.tensor(6.0) / (torch.tensor(4.0) + 1e-5)
    assert spec.targets(MODULES.module_names, MODULES.linear_names) == [Q, V]


def test_no_rank_pattern_keeps_init_r_and_alpha_zero_scales_by_the_rank() -> None:
    spec = parse_lora_config(_config(rank_pattern=None, lora_alpha=0))
    assert isinstance(spec, AdaLoraSpec) and spec.ranks == {} and spec.max_rank == 4 and spec.rank_for(V) == 4
    assert spec.scale_for(Q) == pytest.approx(4 / (4 + 1e-5), rel=1e-7)  # peft: scaling = r when lora_alpha <= 0


def test_training_schedule_and_ignored_r_are_accepted() -> None:
    training = {"target_r": 1, "tinit": 3, "tfinal": 7, "deltaT": 5, "beta1": 0.5, "beta2": 0.6,
                "orth_reg_weight": 0.0, "total_step": 900, "lora_dropout": 0.3, "r": 64}  # fmt: skip
    assert parse_lora_config(_config(**training)) == parse_lora_config(_config())


REFUSED = [
    ({"use_rslora": True}, UnsupportedAdapterError, "use_rslora=True is not applied by peft's AdaLoRA"),
    ({"alpha_pattern": {"q_proj": 2}}, UnsupportedAdapterError, "alpha_pattern="),
    ({"use_dora": True}, UnsupportedAdapterError, "use_dora=True: peft's AdaLoRA does not support it"),
    ({"loftq_config": {"loftq_bits": 4}}, UnsupportedAdapterError, "loftq_config="),
    ({"init_r": 0}, AdapterFormatError, "init_r=0"),
    ({"init_r": "4"}, AdapterFormatError, "init_r='4'"),
    ({"init_r": True}, AdapterFormatError, "init_r=True"),
    ({"rank_pattern": {"q_proj": 2}}, AdapterFormatError, "rank_pattern key 'q_proj'"),
    ({"rank_pattern": {f"{Q}.lora_E": [1, 0, 1, 0]}}, AdapterFormatError, "list of 4 booleans"),
    ({"rank_pattern": {f"{Q}.lora_E": [True, False]}}, AdapterFormatError, "list of 4 booleans"),
    ({"rank_pattern": [True]}, AdapterFormatError, "rank_pattern="),
    ({"rank_pattern": {f"{Q}.lora_E": [False] * 4}}, UnsupportedAdapterError, "every module to rank 0"),
    ({"modules_to_save": ["lm_head"]}, UnsupportedAdapterError, "modules_to_save"),
    ({"bias": "all"}, UnsupportedAdapterError, "bias="),
    ({"init_lora_weights": "pissa"}, UnsupportedAdapterError, "init_lora_weights='pissa'"),
    ({"target_modules": None}, AdapterFormatError, "target_modules"),
]


@pytest.mark.parametrize(("change", "error", "message"), REFUSED, ids=[str(c) for c, _, _ in REFUSED])
def test_refusals_name_the_field(change: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        parse_lora_config(_config(**change))
    assert message in str(info.value)


def _save(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps(_config(**config)))
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def _tensors(q_rank: int = 2, v_rank: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (n_in, n_out), r in ((Q, MODULES.shapes[Q], q_rank), (V, MODULES.shapes[V], v_rank)):
        out[f"base_model.model.{name}.lora_A"] = torch.randn(r, n_in, generator=g)
        out[f"base_model.model.{name}.lora_E"] = torch.randn(r, 1, generator=g)
        out[f"base_model.model.{name}.lora_B"] = torch.randn(n_out, r, generator=g)
    return out


def test_a_save_is_read_in_the_lora_layout(tmp_path: Path) -> None:
    tensors = _tensors()
    weights = read_adapter(_save(tmp_path / "a", tensors), MODULES, max_rank=8, dtype=torch.float16)
    assert list(weights.layers) == [Q] and weights.rank == 2  # v_proj is pruned to rank 0: no weights
    a, e = tensors[f"base_model.model.{Q}.lora_A"], tensors[f"base_model.model.{Q}.lora_E"]
    assert torch.equal(weights.layers[Q].a, (a * e).half()) and weights.layers[Q].a.dtype == torch.float16


def _drop(key: str) -> dict[str, torch.Tensor]:
    tensors = _tensors()
    del tensors[key]
    return tensors


PREFIX = "base_model.model."
BAD_SAVES = {
    "no lora_E": (_drop(f"{PREFIX}{Q}.lora_E"), {}, AdapterFormatError, f"missing tensors for {Q}: lora_E"),
    "lora_E shape": (
        _tensors() | {f"{PREFIX}{Q}.lora_E": torch.ones(2)},
        {},
        AdapterMismatchError,
        "lora_E (2,)",
    ),
    "lora_E nan": (
        _tensors() | {f"{PREFIX}{Q}.lora_E": torch.tensor([[1.0], [float("nan")]])},
        {},
        AdapterFormatError,
        f"{Q}.lora_E contains NaN",
    ),
    "lora_E integer": (
        _tensors() | {f"{PREFIX}{Q}.lora_E": torch.ones(2, 1, dtype=torch.int32)},
        {},
        AdapterFormatError,
        "lora_E has dtype torch.int32",
    ),
    "rows disagree with the mask": (_tensors(q_rank=3), {}, AdapterMismatchError, "do not fit rank 2"),
    "pruned module not empty": (_tensors(v_rank=1), {}, AdapterMismatchError, "pruned to rank 0"),
    "LoRA tensor names": (
        {k.replace(".lora_A", ".lora_A.weight"): v for k, v in _tensors().items()},
        {},
        AdapterFormatError,
        "an AdaLoRA save holds only",
    ),
    "mask of an untargeted module": (
        _tensors(),
        {"target_modules": ["q_proj"]},
        AdapterMismatchError,
        f"rank_pattern names modules the adapter does not target: {V}",
    ),
    "targeted module without a mask": (
        _tensors(),
        {"rank_pattern": {f"{Q}.lora_E": [True, False, True, False]}},
        AdapterFormatError,
        f"no mask for targeted modules: {V}",
    ),
    "rank above the server's": (_tensors(), {"rank_pattern": None}, AdapterMismatchError, "maximum rank 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAVES))
def test_bad_saves_are_refused(case: str, tmp_path: Path) -> None:
    tensors, config, error, message = BAD_SAVES[case]
    with pytest.raises(error) as info:
        read_adapter(_save(tmp_path / "a", tensors, **config), MODULES, max_rank=3, dtype=torch.float32)
    assert message in str(info.value)
