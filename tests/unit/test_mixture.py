"""Mixture keys, the checks on parts, ``cat_adapters`` against PEFT's ``add_weighted_adapter(..., "cat")`` on a small
module, the tracking of cached mixtures, and the API's mixture fields (no model)."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from torch import nn

from server.adapters.checkpoint import AdapterWeights, LayerWeights, TargetableModules
from server.adapters.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from server.adapters.mixture import (
    MAX_MIXTURE_PARTS,
    MixtureCopies,
    MixtureError,
    MixturePart,
    cat_adapters,
    check_mixable,
    check_parts,
    mixture_key,
    parse_mixture_key,
)
from server.adapters.peft_config import LoraSpec, parse_lora_config
from server.api.adapter_fields import requested_adapter
from server.api.errors import ApiError
from server.api.schemas import GenerateRequest


def test_keys_round_trip_and_are_canonical() -> None:
    parts = (
        MixturePart("legal-v2", 0.7),
        MixturePart("tone_1.b", -1.0),
        MixturePart("x", 1e20),
        MixturePart("y", 1e-5),
    )
    key = mixture_key(parts)
    assert key == "mix:legal-v2*0.7+tone_1.b*-1.0+x*1e+20+y*1e-05"
    assert parse_mixture_key(key) == parts
    assert parse_mixture_key("mix:a*1+b*.5+c*+2E-1") == (MixturePart("a", 1.0), MixturePart("b", 0.5),
                                                         MixturePart("c", 0.2))  # fmt: skip
    assert parse_mixture_key("legal-v2") is None


@pytest.mark.parametrize(
    "key",
    ["mix:", "mix:a", "mix:a*", "mix:a*inf", "mix:a*nan", "mix:a*1_0", "mix:a*0.5+", "mix:a b*1", "mix:*1",
     "mix:a*1e+5*2", "mix:-a*1", "mix:a*0.5,b*0.5", "mix:a*0x10"],
)  # fmt: skip
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(MixtureError, match="not a mixture"):
        parse_mixture_key(key)


@pytest.mark.parametrize(
    ("parts", "problem"),
    [
        ([], "1 to 8 adapters, not 0"),
        ([MixturePart(f"a{i}", 1.0) for i in range(MAX_MIXTURE_PARTS + 1)], "not 9"),
        ([MixturePart("a", 0.5), MixturePart("b", 1.0), MixturePart("a", 0.5)], "'a' appears more than once"),
        ([MixturePart("a", 100.5)], "in \\[-100, 100\\]"),
        ([MixturePart("a", math.nan)], "finite"),
    ],
)
def test_check_parts_refuses(parts: list[MixturePart], problem: str) -> None:
    with pytest.raises(MixtureError, match=problem):
        check_parts(parts)


MODULES = TargetableModules(
    shapes={f"layers.{i}.{m}": (6, 5) for i in range(2) for m in ("q", "v")},
    module_names=("layers", "layers.0", "layers.0.q", "layers.0.v", "layers.1", "layers.1.q", "layers.1.v"),
    linear_names=("layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"),
)


def spec(**cfg: object) -> LoraSpec:
    return parse_lora_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], **cfg})


def test_check_mixable_counts_rows_and_refuses_what_cat_cannot_mix() -> None:
    patterned = spec(r=2, rank_pattern={"layers.1.q": 6})
    assert check_mixable([("a", spec()), ("b", patterned)], MODULES) == 4 + 6  # layers.1.q: 4 + 6 rows
    with pytest.raises(AdapterMismatchError, match="'b' and 'a' differ on layers.0.v, layers.1.v"):
        check_mixable([("a", spec()), ("b", spec(target_modules=["q"]))], MODULES)
    with pytest.raises(AdapterMismatchError, match="share a base model"):
        check_mixable([("a", spec(base_model_name_or_path="x")), ("b", spec(base_model_name_or_path="y"))], MODULES)
    dora = LoraSpec(4, 8.0, False, ("q", "v"), {}, {}, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="'d' is a DoRA adapter"):
        check_mixable([("a", spec()), ("d", dora)], MODULES)
    adalora = LoraSpec(4, 8.0, False, ("q", "v"), {}, {}, peft_type="ADALORA")
    with pytest.raises(UnsupportedAdapterError, match="'e' is an ADALORA adapter"):
        check_mixable([("e", adalora)], MODULES)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(6, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum() + self.v(x).sum()


PEFT_PARTS = [
    {"r": 3, "lora_alpha": 12, "use_rslora": True, "target_modules": ["q", "v"]},
    {"r": 2, "lora_alpha": 5, "target_modules": ["q", "v"], "rank_pattern": {"v": 4}, "alpha_pattern": {"q": 7}},
    {"r": 1, "lora_alpha": 1, "target_modules": ["q", "v"]},
]


@pytest.mark.parametrize("weights", [[0.7, -0.3, 2.0], [-1.0, 0.5, 0.0]])
def test_cat_adapters_is_peft_cat(weights: list[float]) -> None:
    """The mixed adapter's A, B and scale, and so its delta, equal PEFT's (PEFT's rows past the real ranks are 0)."""
    torch.manual_seed(0)
    names = [f"p{i}" for i in range(len(PEFT_PARTS))]
    peft = get_peft_model(_Net(), LoraConfig(init_lora_weights=False, **PEFT_PARTS[0]), adapter_name=names[0])
    for name, cfg in zip(names[1:], PEFT_PARTS[1:], strict=True):
        peft.add_adapter(name, LoraConfig(init_lora_weights=False, **cfg))
    peft.base_model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    ours = []
    for name, cfg in zip(names, PEFT_PARTS, strict=True):
        layers = {m: LayerWeights(getattr(peft.base_model.model, m).lora_A[name].weight.detach(),
                                  getattr(peft.base_model.model, m).lora_B[name].weight.detach(),
                                  getattr(peft.base_model.model, m).scaling[name]) for m in ("q", "v")}  # fmt: skip
        ours.append(AdapterWeights(spec(**cfg), layers))
    mixed = cat_adapters(list(zip(ours, weights, strict=True)))
    assert mixed.spec.r == 3 + 4 + 1 and mixed.spec.use_rslora
    for m in ("q", "v"):
        layer = getattr(peft.base_model.model, m)
        a, b = layer.lora_A["mix"].weight.detach(), layer.lora_B["mix"].weight.detach()
        r = mixed.layers[m].a.shape[0]
        torch.testing.assert_close(mixed.layers[m].a, a[:r], rtol=1e-6, atol=0)  # (w * s) * A vs A * w * s
        torch.testing.assert_close(mixed.layers[m].b, b[:, :r], rtol=0, atol=0)
        assert not a[r:].any() and not b[:, r:].any()
        assert mixed.layers[m].scale == pytest.approx(layer.scaling["mix"], rel=1e-12)
        delta = mixed.layers[m].scale * mixed.layers[m].b @ mixed.layers[m].a
        torch.testing.assert_close(delta, layer.get_delta_weight("mix"), rtol=0, atol=1e-6)


def test_cat_adapters_refuses_mismatches_and_overflow() -> None:
    one = {m: LayerWeights(torch.ones(2, 6), torch.ones(5, 2), 1.0) for m in ("q", "v")}
    with pytest.raises(AdapterMismatchError, match="same modules"):
        cat_adapters([(AdapterWeights(spec(), one), 1.0), (AdapterWeights(spec(), {"q": one["q"]}), 1.0)])
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        cat_adapters([(AdapterWeights(LoraSpec(4, 8.0, False, ("q", "v"), {}, {}, use_dora=True), one), 1.0)])
    half = {m: LayerWeights(torch.full((2, 6), 60000.0, dtype=torch.float16), torch.ones(5, 2).half(), 1.0)
            for m in ("q", "v")}  # fmt: skip
    with pytest.raises(AdapterFormatError, match="overflow"):
        cat_adapters([(AdapterWeights(spec(), half), 2.0)])


def test_mixture_copies_tracks_cached_keys_and_prunes_the_rest() -> None:
    cached: set[str] = set()
    copies = MixtureCopies(lambda key: key in cached)
    a = parse_mixture_key("mix:x*1.0+y*0.5")
    b = parse_mixture_key("mix:y*1.0")
    assert a is not None and b is not None
    with copies.reading("mix:x*1.0+y*0.5", a):
        assert copies.containing("x") == ["mix:x*1.0+y*0.5"]
        with copies.reading("mix:y*1.0", b):  # the first read is in flight: never pruned
            assert sorted(copies.containing("y")) == ["mix:x*1.0+y*0.5", "mix:y*1.0"]
    cached.add("mix:y*1.0")
    with copies.reading("mix:z*1.0", (MixturePart("z", 1.0),)):  # prunes the uncached, idle key
        assert copies.containing("x") == [] and copies.containing("y") == ["mix:y*1.0"]
    assert len(copies) == 2


def test_api_mixture_object_and_key_become_one_canonical_key() -> None:
    mix = [{"name": "a", "weight": 0.70}, {"name": "b", "weight": -1}]
    body = GenerateRequest.model_validate({"prompt": "p", "adapter": {"mix": mix}})
    assert requested_adapter(body.adapter) == "mix:a*0.7+b*-1.0"
    assert requested_adapter("mix:a*0.70+b*-1") == "mix:a*0.7+b*-1.0"
    assert requested_adapter("plain") == "plain" and requested_adapter(None) is None
    with pytest.raises(ApiError, match="adapter: 'mix:a\\*x' is not a mixture") as info:
        requested_adapter("mix:a*x")
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("mix", "problem"),
    [
        ([], "at least 1 item"),
        ([{"name": f"a{i}", "weight": 1.0} for i in range(9)], "at most 8 items"),
        ([{"name": "a", "weight": 1.0}, {"name": "a", "weight": 2.0}], "appears once"),
        ([{"name": "a", "weight": 1e300}], "less than or equal to 100"),
        ([{"name": "a", "weight": "0.5"}], "valid number"),
        ([{"name": "a:b", "weight": 0.5}], "pattern"),
        ([{"name": "a", "weight": 0.5, "scale": 2}], "Extra inputs"),
        ([{"name": "a"}], "Field required"),
    ],
)
def test_api_mixture_object_is_validated(mix: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        GenerateRequest.model_validate({"prompt": "p", "adapter": {"mix": mix}})


def test_api_mixture_object_refuses_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        GenerateRequest.model_validate({"prompt": "p", "adapter": {"mix": [{"name": "a", "weight": 1}], "how": "x"}})


def test_every_mixture_counts_under_one_metrics_label() -> None:
    from server.metrics import MIXTURE_LABEL, AdapterLabels

    labels = AdapterLabels(limit=10, registered=lambda name: name == "a")
    assert {labels(f"mix:a*{w}") for w in (0.1, 0.2, -1.0)} == {MIXTURE_LABEL}
    assert labels("a") == "a" and labels(None) != MIXTURE_LABEL


def test_mixture_checks_are_remembered_until_a_part_is_uploaded_again(tmp_path, monkeypatch) -> None:
    import json

    from server.adapters import mixture

    def write(name: str, **cfg: object) -> tuple[str, object]:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        tmp = folder / "tmp.json"  # replaced as the registry replaces a folder: a new file
        tmp.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], **cfg}))
        tmp.replace(folder / "adapter_config.json")
        return name, folder

    parsed: list[object] = []
    monkeypatch.setattr(mixture, "parse_lora_config", lambda raw: parsed.append(raw) or parse_lora_config(raw))
    checks = mixture.MixtureChecks(MODULES)
    parts = [write("a"), write("b", r=2)]
    assert checks.rows(parts) == 6 and checks.rows(parts) == 6 and len(parsed) == 2  # read once
    parts[1] = write("b", target_modules=["q"])  # "b" deleted and uploaded again, adapting other modules
    for _ in range(2):
        with pytest.raises(AdapterMismatchError, match="same modules"):
            checks.rows(parts)
    assert len(parsed) == 4
