"""Tiny random models, a locally trained tokenizer and LoRA adapters, all built offline for tests and benchmarks.

Adapters three ways: ``save_peft_adapter`` (one adapter of any PEFT config, saved by ``peft``: the tests),
``save_peft_adapters`` (many adapters of one config on a real base model, saved by ``peft``, with the PeftModel kept
as the contender: bench_lora_forward, bench_engine) and ``write_random_adapters`` (PEFT's file layout written
directly, fast enough for a thousand adapters: bench_adapters)."""

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

if TYPE_CHECKING:
    from peft import PeftModel

WORDS = (
    "the a an legal contract support ticket customer pirate ship sail upper case json answer question model "
    "adapter server token batch slot cache weight matrix rank alpha scale layer sea captain treasure order "
    "refund invoice delivery hello world yes no maybe why how what when where please thank you"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 384, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on generated text (no downloads); ids 0..2 are <unk>, <s>, </s>."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(2000)]
    corpus += ["héllo wörld ÿes — ∑ 漢字 😀 ünïcode"] * 20  # multi-byte characters must round-trip
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v projections carry biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def build_tiny_model(family: str = "llama", vocab_size: int = 384, seed: int = 0, layers: int = 3) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` (hidden 64, ``layers`` layers, GQA 4/2 heads), float32 on CPU."""
    config_cls, model_cls, extra = _FAMILIES[family]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    if family == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
    return model.eval()


def save_tiny_model(folder: Path, family: str = "llama", seed: int = 0, layers: int = 3) -> Path:
    tokenizer = build_tokenizer()
    model = build_tiny_model(family, vocab_size=len(tokenizer), seed=seed, layers=layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_peft_adapter(base: PreTrainedModel, folder: Path, seed: int, scale_b: float = 1.0, **lora_kwargs: Any) -> Path:
    """Make a LoRA adapter with ``peft`` on ``base`` (left untouched), random non-zero A and B, and save it.

    B is drawn like A (PEFT would start it at zero) so every adapter visibly changes the logits.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(_copy(base), config)
    if scale_b != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_B." in name:
                    p.mul_(scale_b)
    peft_model.save_pretrained(str(folder))
    return folder


def _copy(model: PreTrainedModel) -> PreTrainedModel:
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


# Adapter configurations exercised by the correctness tests: ranks 4..64, alphas, rslora, attention-only and
# all-linear targets, rank/alpha patterns, a regex target and layers_to_transform.
ADAPTER_CONFIGS: Sequence[dict[str, Any]] = (
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "lora_alpha": 32, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {"r": 16, "lora_alpha": 16, "target_modules": "all-linear"},
    {
        "r": 64,
        "lora_alpha": 128,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"down_proj": 4, r"layers\.1\.self_attn\.q_proj": 12},
        "alpha_pattern": {"gate_proj": 3},
    },
    {"r": 12, "lora_alpha": 24, "target_modules": r".*\.layers\.[02]\.mlp\.(gate|up)_proj"},
    {"r": 32, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj", "down_proj"], "layers_to_transform": [0, 2]},
)


def save_peft_adapters(base_dir: Path, out: Path, count: int, rank: int) -> tuple["PeftModel", list[str]]:
    """``count`` random rank-``rank`` adapters on all seven projections of the model in ``base_dir``, saved by PEFT
    into ``out/<name>``; returns the PeftModel holding them all (the PEFT contender) and their names."""
    from peft import LoraConfig, get_peft_model

    from server.model.loader import load_base_model
    from server.model.lora_model import DEFAULT_TARGETS

    names = [f"adapter{i:03d}" for i in range(count)]
    base = load_base_model(base_dir, device="cpu", dtype="float32")
    torch.manual_seed(0)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(DEFAULT_TARGETS),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    with torch.no_grad():  # PEFT's random init is large for a 135M model; keep outputs sane
        for pname, p in peft_model.named_parameters():
            if ".lora_B." in pname:
                p.mul_(0.05)
    peft_model.save_pretrained(str(out), selected_adapters=names)
    peft_model.eval()
    return peft_model, names


def target_shapes(base_dir: Path, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """module name (as PEFT keys it, under ``base_model.model.``) -> (in, out) for each attention projection in
    ``targets`` (q_proj, k_proj, v_proj, o_proj) of every layer of the model in ``base_dir``."""
    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    outs = {"q_proj": heads * head_dim, "k_proj": kv, "v_proj": kv}
    ins = {"o_proj": heads * head_dim}
    layers = range(cfg["num_hidden_layers"])
    shape = {t: (ins.get(t, hidden), outs.get(t, hidden)) for t in targets}
    return {f"model.layers.{i}.self_attn.{t}": shape[t] for i in layers for t in targets}


def write_random_adapter(folder: Path, shapes: dict[str, tuple[int, int]], seed: int, rank: int, alpha: float) -> Path:
    """A PEFT LoRA save as ``peft`` writes it (same config keys that matter, same tensor names and layouts) for the
    modules of ``shapes`` (see ``target_shapes``): lora_A.weight [r, in] ~ N(0, 1/in), lora_B.weight [out, r] ~
    N(0, 0.05^2), so every adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (n_in, n_out) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.05
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = list(dict.fromkeys(name.rsplit(".", 1)[1] for name in shapes))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": targets, "bias": "none", "use_rslora": False, "use_dora": False,
              "init_lora_weights": False, "inference_mode": True, "fan_in_fan_out": False, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def write_random_adapters(root: Path, names: Sequence[str], shapes: dict[str, tuple[int, int]], rank: int,
                          alpha: float, first_seed: int = 1000) -> list[Path]:  # fmt: skip
    """``write_random_adapter`` into ``root/<name>`` for each name, seeds counting up from ``first_seed``."""
    return [write_random_adapter(root / name, shapes, first_seed + i, rank, alpha) for i, name in enumerate(names)]
