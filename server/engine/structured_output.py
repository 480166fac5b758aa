"""Structured output: grammars that constrain what a request may generate (JSON, a JSON schema, a regex, a choice).

CONTRACT STUB (to be implemented): the names and signatures below are what the rest of the engine and the API use.

- ``StructuredOutputSpec`` (torch-free): what the client asked for.
- ``GrammarCompiler(tokenizer, vocab_size).compile(spec) -> CompiledGrammar``: slow-ish, run off the event loop by
  the API; raises ``GrammarError`` (a ValueError, answered 400) for a spec that cannot be compiled.
- ``CompiledGrammar.matcher() -> GrammarMatcher``: fresh per-sequence state (each of ``n`` choices gets its own).
- ``GrammarMatcher.accept(token_id) -> bool``: advance by a sampled token; False if the grammar does not allow it.
- ``apply_grammar_masks(logits, matchers)``: in place, -inf on the tokens each row's grammar forbids now; rows whose
  matcher is None are untouched, and a batch without any matcher costs nothing.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

StructuredKind = Literal["json_object", "json_schema", "regex", "choice"]


class GrammarError(ValueError):
    """The spec cannot be turned into a grammar (invalid schema, unsupported regex feature, ...)."""


@dataclass(frozen=True)
class StructuredOutputSpec:
    """``kind`` and its value: json_object -> None; json_schema -> the schema as a JSON string; regex -> the pattern;
    choice -> the allowed strings."""

    kind: StructuredKind
    value: str | tuple[str, ...] | None = None


class GrammarMatcher(Protocol):
    def accept(self, token_id: int) -> bool: ...


class CompiledGrammar(Protocol):
    def matcher(self) -> GrammarMatcher: ...


def apply_grammar_masks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
    """logits [N, V] float32 (in place): -inf where row i's grammar forbids a token. STUB: implemented by the
    structured-output work."""
    if any(m is not None for m in matchers):
        raise NotImplementedError("structured output is not implemented yet")
