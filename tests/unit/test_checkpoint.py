"""Reading PEFT saves: what is accepted, and every refusal with its own clear error."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loadtests.common.factories import build_tiny_model, save_peft_adapter
from server.adapters.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from server.adapters.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from server.model.loader import load_base_model
from server.model.lora_model import LoraModel

Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> LoraModel:
    return LoraModel(load_base_model(tiny_model_dir("llama")), num_slots=2, max_rank=32)


@pytest.fixture
def adapter(tmp_path: Path, tiny_adapters) -> Path:
    """A fresh, writable copy of a valid rank-8 attention adapter."""
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapters("llama")[1], folder)
    return folder


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


def test_reads_a_valid_adapter(model: LoraModel, adapter: Path) -> None:
    weights = model.read_adapter(adapter)
    assert weights.rank == 8 and len(weights.layers) == 4 * 3  # q,k,v,o on 3 layers
    lw = weights.layers["model.layers.0.self_attn.q_proj"]
    assert lw.a.shape == (8, 64) and lw.b.shape == (64, 8)
    assert lw.scale == pytest.approx(32 / 8**0.5)  # rslora


def test_accepts_half_precision_files(model: LoraModel, adapter: Path) -> None:
    _edit_tensors(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    weights = model.read_adapter(adapter)
    assert all(w.a.dtype == torch.float32 for w in weights.layers.values())


REFUSALS: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "pickle file": (lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04."), AdapterFormatError, "pickle"),
    "pickle only": (
        lambda f: (f / WEIGHTS_FILE).rename(f / "adapter_model.bin"),
        AdapterFormatError,
        "adapter_model.bin",
    ),
    "no config": (lambda f: (f / CONFIG_FILE).unlink(), AdapterFormatError, CONFIG_FILE),
    "no weights": (lambda f: (f / WEIGHTS_FILE).unlink(), AdapterFormatError, WEIGHTS_FILE),
    "not safetensors": (lambda f: (f / WEIGHTS_FILE).write_bytes(b"garbage"), AdapterFormatError, "safetensors"),
    "dora without magnitudes": (lambda f: _edit_config(f, use_dora=True), AdapterFormatError, "lora_magnitude_vector"),
    "bias": (lambda f: _edit_config(f, bias="lora_only"), UnsupportedAdapterError, "bias"),
    "modules_to_save": (
        lambda f: _edit_config(f, modules_to_save=["lm_head"]),
        UnsupportedAdapterError,
        "modules_to_save",
    ),
    "unknown target": (
        lambda f: _edit_config(f, target_modules=["c_attn"]),
        AdapterMismatchError,
        "match no module",
    ),
    "unserved target": (
        lambda f: _edit_config(f, target_modules=["q_proj", "lm_head"]),
        AdapterMismatchError,
        "lm_head",
    ),
    "rank above max": (lambda f: _edit_config(f, r=64), AdapterMismatchError, "maximum rank 32"),
    "rank disagrees with tensors": (lambda f: _edit_config(f, r=4), AdapterMismatchError, "rank 4"),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(Q_KEY)), AdapterFormatError, "missing tensors"),
    "extra tensor": (
        lambda f: _edit_tensors(f, lambda t: t.update({Q_KEY.replace("q_proj", "up_proj"): torch.zeros(8, 64)})),
        AdapterFormatError,
        "extra tensors",
    ),
    "stray tensor": (
        lambda f: _edit_tensors(f, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)})),
        AdapterFormatError,
        "unexpected tensor",
    ),
    "nan weights": (
        lambda f: _edit_tensors(f, lambda t: t[Q_KEY].__setitem__((0, 0), float("nan"))),
        AdapterFormatError,
        "NaN",
    ),
    "integer weights": (
        lambda f: _edit_tensors(f, lambda t: t.update({Q_KEY: t[Q_KEY].to(torch.int32)})),
        AdapterFormatError,
        "dtype",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals(case: str, model: LoraModel, adapter: Path) -> None:
    mutate, error, words = REFUSALS[case]
    mutate(adapter)
    with pytest.raises(error, match=words):
        model.read_adapter(adapter)


def test_refuses_an_adapter_for_a_different_base(model: LoraModel, tmp_path: Path) -> None:
    other = build_tiny_model("llama", vocab_size=model.model.config.vocab_size)
    other.config.hidden_size = 64
    wider = type(other)(type(other.config)(**{**other.config.to_dict(), "intermediate_size": 96}))
    folder = save_peft_adapter(wider, tmp_path / "wider", seed=1, r=4, target_modules=["gate_proj"])
    with pytest.raises(AdapterMismatchError, match="do not fit the base model"):
        model.read_adapter(folder)


def test_missing_folder(model: LoraModel, tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="does not exist"):
        read_adapter(tmp_path / "nope", model.modules, 8, torch.float32)


def _header_lies(folder: Path, header: bytes, declared: int | None = None, data: bytes = b"") -> None:
    """Write a safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    length = len(header) if declared is None else declared
    (folder / WEIGHTS_FILE).write_bytes(length.to_bytes(8, "little") + header + data)


def _lying_entry(**entry: object) -> bytes:
    return json.dumps({Q_KEY: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 8 * 64 * 4], **entry}}).encode()


HOSTILE: dict[str, Callable[[Path], None]] = {
    "header length beyond the file": lambda f: _header_lies(f, b"{}", declared=2**62),
    "header length of a huge header": lambda f: _header_lies(f, b"{" + b" " * 64 + b"}", declared=200 * 2**20),
    "header not json": lambda f: _header_lies(f, b"not json at all"),
    "offsets past the data": lambda f: _header_lies(f, _lying_entry(), data=b"\0" * 16),
    "offsets reversed": lambda f: _header_lies(f, _lying_entry(data_offsets=[64, 0]), data=b"\0" * 2048),
    "shape disagrees with bytes": lambda f: _header_lies(f, _lying_entry(shape=[800, 64]), data=b"\0" * 2048),
    "unknown dtype": lambda f: _header_lies(f, _lying_entry(dtype="Q9"), data=b"\0" * 2048),
    "truncated file": lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:-100]),
    "empty file": lambda f: (f / WEIGHTS_FILE).write_bytes(b""),
    "inf weights": lambda f: _edit_tensors(f, lambda t: t[Q_KEY].__setitem__((0, 0), float("inf"))),
    "wrong in_features": lambda f: _edit_tensors(f, lambda t: t.update({Q_KEY: torch.zeros(8, 65)})),
    "three dimensional": lambda f: _edit_tensors(f, lambda t: t.update({Q_KEY: torch.zeros(8, 64, 1)})),
    "rank zero": lambda f: _edit_config(f, r=0),
    "negative rank": lambda f: _edit_config(f, r=-8),
    "rank as text": lambda f: _edit_config(f, r="8"),
    "absurd rank": lambda f: _edit_config(f, r=10**12),
    "nan alpha": lambda f: _edit_config(f, lora_alpha=float("nan")),
    "infinite alpha": lambda f: _edit_config(f, lora_alpha=float("inf")),
    "alpha as list": lambda f: _edit_config(f, lora_alpha=[1]),
    "target modules as number": lambda f: _edit_config(f, target_modules=7),
    "unknown peft type": lambda f: _edit_config(f, peft_type="PREFIX_TUNING"),
    "config is a list": lambda f: (f / CONFIG_FILE).write_text("[]"),
    "config not json": lambda f: (f / CONFIG_FILE).write_text("{'r': 8"),
    "rank pattern absurd": lambda f: _edit_config(f, rank_pattern={"q_proj": 10**9}),
    "alpha pattern nan": lambda f: _edit_config(f, alpha_pattern={"q_proj": float("nan")}),
    # JSON that broke the stdlib reader itself (RecursionError, ValueError, OverflowError: HTTP 500 before)
    "config nested 100k deep": lambda f: _splice_config(f, "x", "[" * 100_000 + "]" * 100_000),
    "int literal over the digit limit": lambda f: _splice_config(f, "r", "8" * 5000),
    "alpha of 400 digits": lambda f: _splice_config(f, "lora_alpha", "9" * 400),
    "alpha pattern value of 400 digits": lambda f: _splice_config(f, "alpha_pattern", '{"q_proj": ' + "9" * 400 + "}"),
    "rank of 400 digits": lambda f: _splice_config(f, "r", "9" * 400),
    "config over 1 MiB": lambda f: _splice_config(f, "x", '"' + "y" * 2**20 + '"'),
}


def _splice_config(folder: Path, key: str, literal: str) -> None:
    """Set ``key`` to ``literal`` verbatim in the JSON text (values no JSON writer would produce)."""
    text = (folder / CONFIG_FILE).read_text().rstrip().removesuffix("}").rstrip()
    (folder / CONFIG_FILE).write_text(f'{text}, "{key}": {literal}}}')


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused_with_an_adapter_error(case: str, model: LoraModel, adapter: Path) -> None:
    """Whatever the file claims, reading it ends in an AdapterError (a 422 over HTTP), never another exception."""
    HOSTILE[case](adapter)
    with pytest.raises((AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError)):
        model.read_adapter(adapter)
