"""Tiny random models, a locally trained tokenizer and PEFT adapters, all built offline for tests and benchmarks."""

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
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

_WORDS = (
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
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 20))) for _ in range(2000)]
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
    peft_model.save_pretrained(folder)
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
