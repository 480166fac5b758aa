"""The reference the OpenAI-parity tests compare the server with: transformers (and PEFT for adapters) run directly
on the tiny model, with plain-Python greedy decoding, and the text offsets of a token sequence computed from
``tokenizer.decode`` alone."""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loadtests.common.peft_reference import PeftReference

# Logit processing of one greedy step: (logits [V] float64, prompt ids, output ids so far) -> logits [V].
Process = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]
# Log-probabilities from the server (float32 on its own batched LoRA path) and from transformers + PEFT (float32,
# one sequence at a time) differ by float rounding only: 1e-4 is ~100x the differences seen, and far below the
# ~1e-2 gaps between a tiny random model's neighbouring log-probabilities.
ATOL = 1e-4


class LmReference:
    def __init__(self, model_dir: Path, adapter_dirs: Sequence[Path]) -> None:
        self.peft = PeftReference(model_dir, adapter_dirs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, ids: Sequence[int], adapter: int | None) -> torch.Tensor:
        """[L, V] float64: row i is the model's log-distribution of the token after ids[: i + 1]."""
        logits = self.peft.logits(torch.tensor([list(ids)]), adapter)[0]
        return torch.log_softmax(logits.double(), dim=-1)

    def greedy(self, ids: Sequence[int], adapter: int | None, steps: int, process: Process | None = None) -> list[int]:
        """``steps`` greedy tokens after ``ids``, each step's logits through ``process`` first (no end-of-sequence
        handling: the callers ask the server to ignore it, or force it themselves)."""
        out: list[int] = []
        for _ in range(steps):
            logits = self.peft.logits(torch.tensor([[*ids, *out]]), adapter)[0, -1].double()
            if process is not None:
                logits = process(logits, list(ids), out)
            out.append(int(logits.argmax()))
        return out

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def offsets(self, ids: Sequence[int], context: Sequence[int] = (), start: int = 0) -> list[int]:
        """Where token i's text starts: the length of what ``ids[:i]`` (after ``context``) decode to, without a
        trailing run of U+FFFD (the bytes of a character not complete yet, or invalid ones not followed by text
        yet: the text they stand for starts there), plus ``start``."""
        base = self.decode(context)
        return [start + len(self.decode([*context, *ids[:i]])[len(base) :].rstrip("\ufffd")) for i in range(len(ids))]
