"""PEFT as the reference nobody here wrote: per-row logits with each row's adapter run alone."""

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


class PeftReference:
    """All adapters loaded into one ``PeftModel`` over a fresh copy of the base; rows are run one at a time."""

    def __init__(self, base_dir: Path, adapter_dirs: Sequence[Path]) -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.names = [f"adapter{i}" for i in range(len(adapter_dirs))]
        self.model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=self.names[0])
        for name, folder in zip(self.names[1:], adapter_dirs[1:], strict=True):
            self.model.load_adapter(folder, adapter_name=name)
        self.model.eval()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, adapter: int | None) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, V] with adapter index ``adapter`` (None = base model)."""
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(input_ids=input_ids).logits
        self.model.set_adapter(self.names[adapter])
        return self.model(input_ids=input_ids).logits

    def rows(self, input_ids: torch.Tensor, row_adapters: Sequence[int | None]) -> torch.Tensor:
        """Row ``i`` of ``input_ids`` run alone with adapter ``row_adapters[i]``; logits [B, L, V]."""
        return torch.cat([self.logits(input_ids[i : i + 1], a) for i, a in enumerate(row_adapters)])
