"""AdaLoRA adapters saved by ``peft`` as a finished AdaLoRA training leaves them: random non-zero singular vectors
and values, and a rank_pattern of pruning masks (what ``update_and_allocate`` sets), so the save holds pruned ranks."""

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

ATTENTION_AND_DOWN = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def save_adalora_adapter(
    base: PreTrainedModel,
    folder: Path,
    seed: int,
    init_r: int = 6,
    lora_alpha: float = 12,
    target_modules: Sequence[str] = ATTENTION_AND_DOWN,
    prune: bool = True,
) -> Path:
    """An AdaLoRA adapter on a copy of ``base`` (left untouched), saved by peft into ``folder``.

    lora_A, lora_E (which peft starts at zero) and lora_B are drawn at random. ``prune``: a random mask per module
    with the first module (in name order) pruned to rank 0 and the second kept whole; otherwise no rank_pattern
    (a save from before the first allocation), every module at ``init_r``.
    """
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=init_r, target_r=max(1, init_r // 2), lora_alpha=lora_alpha, total_step=100,
                           tinit=10, tfinal=20, target_modules=list(target_modules), task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_E." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    if prune:
        # the allocator's keys: parameter names inside the wrapped model, adapter name included
        names = sorted(n for n, _ in peft_model.base_model.model.named_parameters() if ".lora_E." in n)
        masks = {}
        for i, name in enumerate(names):
            keep = torch.rand(init_r, generator=gen) > 0.4
            keep[int(torch.randint(init_r, (1,), generator=gen))] = True  # at least one rank survives
            masks[name] = [False] * init_r if i == 0 else [True] * init_r if i == 1 else keep.tolist()
        peft_model.peft_config["default"].rank_pattern = masks
    peft_model.save_pretrained(str(folder))
    return folder
