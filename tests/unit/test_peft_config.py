"""parse_lora_config / LoraSpec against the installed peft, the reference nobody here wrote.

Every config is built with ``peft.LoraConfig`` and parsed from the exact JSON peft writes; target matching is
compared with ``check_target_module_exists`` and with the modules ``get_peft_model`` really wraps, and rank/scale
with what peft assigns to each wrapped module.
"""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from transformers import LlamaConfig, LlamaForCausalLM

from server.adapters.errors import AdapterFormatError, UnsupportedAdapterError
from server.adapters.peft_config import ALL_LINEAR, LoraSpec, parse_lora_config

_PREFIX = "base_model.model."


def _tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    return _tiny_llama()


def _module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def _linear_names(model: LlamaForCausalLM) -> list[str]:
    """What the model layer passes as linear_names: every nn.Linear except the output head."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def _config_json(config: LoraConfig) -> str:
    """The adapter_config.json peft writes for ``config`` as given (before get_peft_model expands anything)."""
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        return (Path(folder) / "adapter_config.json").read_text()


def _wrap(model: LlamaForCausalLM, config: LoraConfig) -> tuple[PeftModel, dict[str, torch.nn.Module]]:
    """get_peft_model on copies, and base-model name -> the LoRA layer peft put there."""
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    adapted = {
        name.removeprefix(_PREFIX): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and name.startswith(_PREFIX)
    }
    return peft_model, adapted


def _saved_adapter_json(peft_model: PeftModel, folder: Path) -> bytes:
    """The adapter_config.json of a real save, as a trained adapter arrives at the server."""
    peft_model.save_pretrained(folder)
    return (folder / "adapter_config.json").read_bytes()


def _assert_rank_and_scale(spec: LoraSpec, adapted: dict[str, torch.nn.Module]) -> None:
    for name, module in adapted.items():
        assert spec.rank_for(name) == module.r["default"], name
        assert spec.alpha_for(name) == module.lora_alpha["default"], name
        assert spec.scale_for(name) == pytest.approx(module.scaling["default"], rel=1e-12), name


_QKV = ["q_proj", "k_proj", "v_proj"]
MATCHING_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.layers\.[02]\.mlp\.(up|down)_proj"),
    "rslora": dict(target_modules=["q_proj", "k_proj"], r=4, lora_alpha=16, use_rslora=True),
    "patterns": dict(
        target_modules=["q_proj", "o_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"down_proj": 6, r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"o_proj": 3.5, r"layers\.1\.self_attn\.q_proj": 5},
    ),
    "patterns_rslora": dict(
        target_modules=["q_proj", "down_proj"],
        r=4,
        lora_alpha=12,
        use_rslora=True,
        rank_pattern={r"layers\.[12]\.mlp\.down_proj": 9},
        alpha_pattern={"q_proj": -2},
    ),
    "layers_int": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=1),
    "layers_list": dict(target_modules=_QKV, layers_to_transform=[0, 2]),
    "layers_pattern_str": dict(target_modules=_QKV, layers_to_transform=[0, 2], layers_pattern="layers"),
    "layers_pattern_list": dict(target_modules=["gate_proj"], layers_to_transform=2, layers_pattern=["h", "layers"]),
    # an entry equal to a full name matches before peft looks at the layer index
    "full_name_skips_layers": dict(
        target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]
    ),
    "exclude_list": dict(target_modules=_QKV, exclude_modules=["model.layers.1.self_attn.k_proj", "v_proj"]),
    "exclude_regex": dict(target_modules=["o_proj", "up_proj"], exclude_modules=r".*layers\.0\..*"),
    "exclude_with_regex_target": dict(target_modules=r".*_proj", exclude_modules=["mlp.gate_proj", "q_proj"]),
    # Regex features RE2 and peft's re share: classes, alternation, lazy and bounded repeats, inline flags, groups.
    "regex_features": dict(
        target_modules=r"(?i)model\.layers\.[0-9]{1,2}\.(self_attn\.(Q|v)_proj|mlp\.(down|up)_proj)",
        r=4,
        rank_pattern={r"(q|v)_proj": 2, r"layers\.[12]\..*?": 6, "model.layers.0.mlp.up_proj": 3},
        alpha_pattern={r"mlp\.\w+_proj": 3, r"(?:self_attn)\.v_proj$": 5},
        exclude_modules=r".*\.1\.self_attn\..*",
    ),
    # A layers_pattern entry with a top-level "|": on mlp modules its first branch matches without the index group,
    # which leaves them out (peft does not try the next entry); attention modules fall through to "layers".
    "layers_pattern_alternation": dict(
        target_modules=[*_QKV, "gate_proj"], layers_to_transform=[1], layers_pattern=["mlp|h", "layers"]
    ),
}


@pytest.mark.parametrize("kwargs", MATCHING_CASES.values(), ids=MATCHING_CASES.keys())
def test_matching_rank_and_scale_equal_peft(kwargs: dict, tiny_llama: LlamaForCausalLM, tmp_path: Path) -> None:
    config = LoraConfig(task_type="CAUSAL_LM", **kwargs)
    spec = parse_lora_config(_config_json(config))
    names, linears = _module_names(tiny_llama), _linear_names(tiny_llama)

    expected = [n for n in names if n and check_target_module_exists(config, n)]
    assert expected, "a case must adapt something"
    assert spec.targets(names, linears) == expected

    peft_model, adapted = _wrap(tiny_llama, config)
    assert set(adapted) == set(expected)
    _assert_rank_and_scale(spec, adapted)
    assert spec.max_rank == max([config.r, *config.rank_pattern.values()])  # peft's own slot-size formula

    # The save a trained adapter arrives as must mean the same.
    saved = parse_lora_config(_saved_adapter_json(peft_model, tmp_path / "adapter"))
    assert saved.targets(names, linears) == expected
    _assert_rank_and_scale(saved, adapted)


def test_layers_pattern_that_matches_nothing_targets_nothing(tiny_llama: LlamaForCausalLM, tmp_path: Path) -> None:
    config = LoraConfig(target_modules=_QKV, layers_to_transform=[0], layers_pattern="blocks")
    spec = parse_lora_config(_config_json(config))
    names = _module_names(tiny_llama)
    assert [n for n in names if n and check_target_module_exists(config, n)] == []
    assert spec.targets(names) == []


def _reloaded(config: LoraConfig) -> LoraConfig:
    """``config`` saved and loaded back, as peft sees it when it loads an adapter folder."""
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        return LoraConfig.from_pretrained(folder)


@pytest.mark.parametrize(
    "patterns",
    [
        {"q_proj": 2, "proj": 3},
        {r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 5},
        {"q_proj": 5, r"layers\.1\.self_attn\.q_proj": 2},
        {r".*\.mlp\..*": 7, "self_attn.o_proj": 3, "model.layers.2.mlp.up_proj": 1},
        {"ayers.0.self_attn.q_proj": 4},  # not a dotted suffix: never matches
    ],
)
def test_rank_for_equals_get_pattern_key(patterns: dict[str, int], tiny_llama: LlamaForCausalLM) -> None:
    alphas = {k: v * 1.5 for k, v in patterns.items()}
    config = LoraConfig(target_modules=["q_proj"], r=8, lora_alpha=16, rank_pattern=patterns, alpha_pattern=alphas)
    spec = parse_lora_config(_config_json(config))
    loaded = _reloaded(config)
    for name in _module_names(tiny_llama):
        rank_key = get_pattern_key(loaded.rank_pattern.keys(), name)
        assert spec.rank_for(name) == loaded.rank_pattern.get(rank_key, loaded.r)
        alpha_key = get_pattern_key(loaded.alpha_pattern.keys(), name)
        assert spec.alpha_for(name) == loaded.alpha_pattern.get(alpha_key, loaded.lora_alpha)
    assert spec.max_rank == max(8, *patterns.values())


def test_overlapping_patterns_follow_file_order(tiny_llama: LlamaForCausalLM) -> None:
    """peft writes adapter_config.json with sort_keys=True, so when two keys match one module the alphabetically
    first wins once the adapter is loaded, whatever order the trainer passed: the file is what we serve."""
    config = LoraConfig(target_modules=["q_proj"], r=8, rank_pattern={"q_proj": 5, r"layers\.1\.self_attn\.q_proj": 2})
    spec = parse_lora_config(_config_json(config))
    _, adapted = _wrap(tiny_llama, _reloaded(config))
    assert (
        spec.rank_for("model.layers.1.self_attn.q_proj") == 2 == adapted["model.layers.1.self_attn.q_proj"].r["default"]
    )
    assert spec.rank_for("model.layers.0.self_attn.q_proj") == 5
    _assert_rank_and_scale(spec, adapted)


@pytest.mark.parametrize("layers", [3, 2], ids=["21-linears", "14-linears"])
@pytest.mark.parametrize("exclude", [None, ["q_proj"]], ids=["plain", "exclude"])
def test_all_linear_equals_get_peft_model(layers: int, exclude: list[str] | None, tmp_path: Path) -> None:
    model = _tiny_llama(layers)
    names, linears = _module_names(model), _linear_names(model)
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", exclude_modules=exclude, r=4)
    spec = parse_lora_config(_config_json(config))
    assert spec.target_modules == ALL_LINEAR

    peft_model, adapted = _wrap(model, config)
    assert "lm_head" not in adapted
    assert set(spec.targets(names, linears)) == set(adapted)

    # peft expands "all-linear" in place and saves the expansion: every linear module but the output head, and
    # from 20 names up condensed to the shortest suffixes that still single them out.
    raw = _saved_adapter_json(peft_model, tmp_path / "adapter")
    saved_targets = json.loads(raw)["target_modules"]
    assert isinstance(saved_targets, list)
    if len(linears) >= 20:
        assert set(saved_targets) == {n.rsplit(".", 1)[-1] for n in linears}
    else:
        assert set(saved_targets) == set(linears)
    saved = parse_lora_config(raw)
    assert set(saved.targets(names, linears)) == set(adapted)
    _assert_rank_and_scale(saved, adapted)


def test_all_linear_is_case_insensitive_and_needs_linear_names() -> None:
    spec = parse_lora_config({"peft_type": "LORA", "target_modules": "ALL-Linear"})
    assert spec.target_modules == ALL_LINEAR
    assert spec.targets(["a", "a.q", "a.head"], ["a.q"]) == ["a.q"]
    with pytest.raises(ValueError, match="linear_names"):
        spec.targets(["a.q"])


def test_normalisation_defaults_and_input_forms() -> None:
    config = LoraConfig(target_modules=["v_proj", "q_proj", "q_proj"], layers_to_transform=1, layers_pattern="layers")
    raw = _config_json(config)
    spec = parse_lora_config(raw)
    assert spec == parse_lora_config(raw.encode()) == parse_lora_config(json.loads(raw))
    assert spec.target_modules == ("q_proj", "v_proj")
    assert spec.layers_to_transform == (1,)
    assert spec.layers_pattern == ("layers",)
    assert (spec.r, spec.lora_alpha, spec.use_rslora, spec.max_rank) == (8, 8.0, False, 8)
    assert spec.exclude_modules is None and spec.base_model_name_or_path is None
    hash(spec)  # usable as a key despite its dict fields
    with pytest.raises(AttributeError):
        spec.r = 4  # type: ignore[misc]

    minimal = parse_lora_config({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": []})
    assert (minimal.r, minimal.lora_alpha, minimal.layers_to_transform) == (8, 8.0, None)
    assert minimal.rank_pattern == {} and minimal.alpha_pattern == {}


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_accepted_values_and_unknown_keys(init: object) -> None:
    config = json.loads(_config_json(LoraConfig(target_modules=["q_proj"], lora_alpha=0)))
    config |= {
        "init_lora_weights": init,
        "base_model_name_or_path": "org/base",
        "some_future_key": {"x": 1},
        "megatron_config": {"tp": 2},
    }
    config |= {"lora_bias": False, "modules_to_save": [], "trainable_token_indices": {}, "layer_replication": None}
    spec = parse_lora_config(json.dumps(config))
    assert spec.lora_alpha == 0.0 and spec.scale_for("q_proj") == 0.0
    assert spec.base_model_name_or_path == "org/base"


def _base_config() -> dict:
    return json.loads(_config_json(LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])))


_NAN, _INF = float("nan"), float("inf")
UNSUPPORTED = [
    ("use_dora", "yes"),  # true and false are served
    ("bias", "all"),
    ("bias", "lora_only"),
    ("modules_to_save", ["lm_head"]),
    ("fan_in_fan_out", True),
    ("lora_bias", True),
    ("target_parameters", ["model.layers.0.mlp.experts.gate_up_proj"]),
    ("trainable_token_indices", [1, 2]),
    ("trainable_token_indices", {"embed_tokens": [1]}),
    ("layer_replication", [[0, 2], [1, 3]]),
    ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]),
    ("task_type", "SEQ_CLS"),
    ("velora_config", {}),
    ("monteclora_config", {"n": 2}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {}),
    ("use_bdlora", {}),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "lora_ga"),
    ("init_lora_weights", "loftq"),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED, ids=[f"{f}={v}" for f, v in UNSUPPORTED])
def test_unsupported_features_are_refused(field: str, value: object) -> None:
    config = _base_config() | {field: value}
    with pytest.raises(UnsupportedAdapterError) as info:
        parse_lora_config(json.dumps(config))
    assert field in str(info.value) and "accepted" in str(info.value)


BAD_FORMAT = [
    ("peft_type", None, "peft_type"),
    ("peft_type", "IA3", "peft_type"),
    ("r", 0, "r="),
    ("r", -4, "r="),
    ("r", 2.5, "r="),
    ("r", True, "r="),
    ("r", "8", "r="),
    ("r", None, "r="),
    ("lora_alpha", _NAN, "lora_alpha"),
    ("lora_alpha", _INF, "lora_alpha"),
    ("lora_alpha", "16", "lora_alpha"),
    ("lora_alpha", None, "lora_alpha"),
    ("use_rslora", "yes", "use_rslora"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ("rank_pattern", {"q_proj": 2.0}, "rank_pattern"),
    ("rank_pattern", {"q_proj(": 4}, "rank_pattern"),
    ("rank_pattern", "q_proj", "rank_pattern"),
    ("alpha_pattern", {"q_proj": _NAN}, "alpha_pattern"),
    ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern"),
    ("alpha_pattern", {"[q": 1}, "alpha_pattern"),
    ("target_modules", None, "target_modules"),
    ("target_modules", [], "target_modules"),
    ("target_modules", "", "target_modules"),
    ("target_modules", "(q_proj", "target_modules"),
    ("target_modules", [""], "target_modules"),
    ("target_modules", [1], "target_modules"),
    ("target_modules", 5, "target_modules"),
    ("exclude_modules", "(", "exclude_modules"),
    ("exclude_modules", [None], "exclude_modules"),
    ("layers_to_transform", "1", "layers_to_transform"),
    ("layers_to_transform", [1, "2"], "layers_to_transform"),
    ("layers_to_transform", 1.5, "layers_to_transform"),
    ("layers_to_transform", [-1], "layers_to_transform"),
    ("layers_to_transform", True, "layers_to_transform"),
    ("layers_pattern", "layers", "layers_pattern"),  # without layers_to_transform, as peft refuses
    ("base_model_name_or_path", 5, "base_model_name_or_path"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FORMAT, ids=[f"{f}={v!r}" for f, v, _ in BAD_FORMAT])
def test_malformed_fields_are_refused(field: str, value: object, named: str) -> None:
    config = _base_config() | {field: value}
    with pytest.raises(AdapterFormatError) as info:
        parse_lora_config(json.dumps(config))
    assert named in str(info.value)


def test_missing_keys_are_refused() -> None:
    for field in ("peft_type", "target_modules"):
        config = _base_config()
        del config[field]
        with pytest.raises(AdapterFormatError, match=field):
            parse_lora_config(config)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern"),
        ({"target_modules": "all-linear", "layers_to_transform": 1}, "layers_to_transform"),
        ({"layers_to_transform": [0], "layers_pattern": "layers.("}, "layers_pattern"),
    ],
)
def test_layer_filters_peft_rejects_are_refused(extra: dict, field: str) -> None:
    with pytest.raises(AdapterFormatError, match=field):
        parse_lora_config(_base_config() | extra)
    if "layers.(" not in str(extra):  # peft's own LoraConfig refuses the same combination
        with pytest.raises(ValueError, match=field):
            LoraConfig(**{k: v for k, v in extra.items()})


@pytest.mark.parametrize("raw", [b"not json", b"\xff\xfe", "[1, 2]", "3", "null"])
def test_not_a_json_object_is_refused(raw: bytes | str) -> None:
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        parse_lora_config(raw)


def test_refusal_messages_name_the_value() -> None:
    with pytest.raises(UnsupportedAdapterError, match=r"bias='all'.*accepted: \"none\""):
        parse_lora_config(_base_config() | {"bias": "all"})
    with pytest.raises(AdapterFormatError, match=r"lora_alpha=nan"):
        parse_lora_config(_base_config() | {"lora_alpha": math.nan})


def _saved(config: object) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)  # type: ignore[attr-defined]
        return json.loads((Path(folder) / "adapter_config.json").read_text())


def _still_refused() -> list[tuple[str, dict, str]]:
    """(kind, the config peft saves for it, what the refusal must say): each kind served neither as LoRA nor AdaLoRA."""
    import peft

    t = ["q_proj", "v_proj"]
    others = {
        "LOHA": peft.LoHaConfig(target_modules=t),
        "LOKR": peft.LoKrConfig(target_modules=t),
        "IA3": peft.IA3Config(target_modules=t, feedforward_modules=[]),
        "OFT": peft.OFTConfig(target_modules=t, r=4, oft_block_size=0),
        "BOFT": peft.BOFTConfig(target_modules=t, boft_block_size=4),
        "VERA": peft.VeraConfig(target_modules=t),
        "FOURIERFT": peft.FourierFTConfig(target_modules=t),
        "PROMPT_TUNING": peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    served = "served kinds: LoRA"
    cases = [(kind, _saved(c), f"peft_type='{kind}' is not served; {served}") for kind, c in others.items()]
    ada = _saved(peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=t))
    cases += [
        ("LoRA modules_to_save", _base_config() | {"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
        ("AdaLoRA modules_to_save", ada | {"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
        ("AdaLoRA rslora", ada | {"use_rslora": True}, "use_rslora=True is not applied by peft's AdaLoRA"),
    ]
    for init in ("pissa", "pissa_niter_16", "olora", "loftq", "corda", "lora_ga"):  # they rewrite the base weights
        cases.append((f"init {init}", _base_config() | {"init_lora_weights": init}, f"init_lora_weights='{init}'"))
    return cases


STILL_REFUSED = _still_refused()


@pytest.mark.parametrize(("kind", "config", "message"), STILL_REFUSED, ids=[k for k, _, _ in STILL_REFUSED])
def test_kinds_still_refused_say_what_and_why(kind: str, config: dict, message: str) -> None:
    with pytest.raises((AdapterFormatError, UnsupportedAdapterError)) as info:
        parse_lora_config(json.dumps(config))
    assert message in str(info.value)
    if "init_lora_weights" in message:
        assert "leaves the base weights untouched" in str(info.value)
