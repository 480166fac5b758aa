"""Structured output: grammars that constrain what a request may generate (JSON, a JSON schema, a regex, a choice).

Built on llguidance, chosen over xgrammar by measurement on a 2-core host with SmolLM2's 49k vocabulary: a nested
JSON schema compiles in ~1.5 ms (xgrammar ~10 ms), a request's matcher is a ~1 us copy, a row's mask costs ~0.04 ms a
step (xgrammar about the same), and it refuses the JSON-schema keywords it does not implement (``not``,
``uniqueItems``, ``if``/``then``, ...) where xgrammar silently ignores them and the output could fail the schema.

- ``StructuredOutputSpec`` (torch-free): what the client asked for.
- ``GrammarCompiler(tokenizer, vocab_size).compile(spec) -> CompiledGrammar``: ~1-2 ms, run off the event loop by
  the API; raises ``GrammarError`` (a ValueError, answered 400) for a spec that cannot be compiled. Bounded LRU cache.
- ``CompiledGrammar.matcher() -> GrammarMatcher``: fresh per-sequence state (each of ``n`` choices gets its own).
- ``GrammarMatcher.accept(token_id) -> bool``: advance by a sampled token; False if the grammar does not allow it.
  Once the grammar is complete only an end-of-sequence token is allowed, so generation ends with reason EOS.
- ``apply_grammar_masks(logits, matchers)``: in place, -inf on the tokens each row's grammar forbids now; rows whose
  matcher is None are untouched, and a batch without any matcher costs nothing.

JSON is generated on one line with Python's ``json.dumps`` separators (``", "``, ``": "``): free whitespace would let
a model pad forever instead of closing the object.
"""

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

StructuredKind = Literal["json_object", "json_schema", "regex", "choice"]

# Pinned for every JSON grammar (as overrides, so a schema's "x-guidance" cannot loosen them): no free whitespace,
# never skip a schema keyword that is not implemented (``lenient``), oneOf stays exclusive.
JSON_OPTIONS: "JsonCompileOptions" = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
    "coerce_one_of": False,
}


class GrammarError(ValueError):
    """The spec cannot be turned into a grammar (invalid schema, unsupported regex feature, ...)."""


@dataclass(frozen=True)
class StructuredOutputSpec:
    """``kind`` and its value: json_object -> None; json_schema -> the schema as a JSON string; regex -> the pattern;
    choice -> the allowed strings."""

    kind: StructuredKind
    value: str | tuple[str, ...] | None = None


class GrammarMatcher:
    """One sequence's position in a grammar (engine thread only)."""

    __slots__ = ("_matcher", "vocab_size", "mask_words")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, mask_words: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # the logits width the masks are for
        self.mask_words = mask_words  # int32 words of one bitmask row (the grammar's vocabulary, 32 tokens a word)

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (and the matcher stays failed) when the grammar does not allow it."""
        if not 0 <= token_id < self.vocab_size:
            return False
        return bool(self._matcher.consume_token(token_id))

    def is_finished(self) -> bool:
        """The grammar is complete (or failed): only an end-of-sequence token may follow."""
        return bool(self._matcher.is_stopped())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """bitmask [R, mask_words] int32, CPU, contiguous: row ``row`` gets bit t%32 of word t//32 set iff token t
        is allowed next. Releases the GIL while it computes."""
        assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
        assert bitmask.shape[1] == self.mask_words and 0 <= row < bitmask.shape[0]
        row_bytes = self.mask_words * 4
        self._matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * row_bytes, row_bytes)


class CompiledGrammar:
    """A checked grammar for one tokenizer; ``matcher()`` copies a pristine matcher (about a microsecond)."""

    def __init__(self, spec: StructuredOutputSpec, prototype: llguidance.LLMatcher, vocab_size: int, words: int):
        self.spec = spec
        self._prototype = prototype  # never advanced: only copied
        self.vocab_size = vocab_size
        self.mask_words = words

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._prototype.deep_copy(), self.vocab_size, self.mask_words)


class GrammarCompiler:
    """Compiles specs for one tokenizer and a model whose logits are ``vocab_size`` wide (which may exceed the
    tokenizer's vocabulary: the extra columns are always forbidden). Thread-safe; keeps the last ``cache_size``
    grammars.

    ``eos_ids`` are the tokens that end a sequence once the grammar is complete (default: the tokenizer's EOS). Pass
    the engine's own set, so that the token the grammar allows at the end is one the engine stops on. Without any,
    every ``compile`` raises GrammarError: a grammar could never be ended."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_ids: Iterable[int] | None = None,
        cache_size: int = 256,
    ) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"structured output needs a fast (Rust) tokenizer, not {type(tokenizer).__name__}")
        eos = sorted(set(eos_ids)) if eos_ids is not None else _tokenizer_eos(tokenizer)
        self.vocab_size = vocab_size
        self.eos_ids = tuple(eos)
        # The grammar's vocabulary covers every logits column and every token the tokenizer knows (its masks are
        # sliced to the logits' width when applied).
        width = max(vocab_size, len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
        self.mask_words = (width + 31) // 32
        # ~0.5 s for a 50k vocabulary, once.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width, eos_token=eos) if eos else None
        self._cache: OrderedDict[StructuredOutputSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        compiled = self._compile(spec)
        with self._lock:
            # Two threads may compile the same spec at once: the first one stored is kept and returned to both, so
            # every caller of a spec holds the cached grammar.
            compiled = self._cache.setdefault(spec, compiled)
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def _compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        if self._tokenizer is None:
            raise GrammarError("structured output is unavailable: the model's tokenizer has no end-of-sequence token")
        # Building the matcher checks the grammar against the tokenizer (an error leaves it failed, it never raises).
        prototype = llguidance.LLMatcher(self._tokenizer, _grammar_text(spec), log_level=0)
        if prototype.is_error():
            raise GrammarError(f"{_WHAT[spec.kind]}: {_readable(prototype.get_error())}")
        return CompiledGrammar(spec, prototype, self.vocab_size, self.mask_words)


_WHAT = {
    "json_object": "json_object",
    "json_schema": "invalid or unsupported JSON schema",
    "regex": "invalid or unsupported regex",
    "choice": "invalid choice",
}


def _readable(error: str) -> str:
    """llguidance's message without what is about its internal grammar text (a position in it, an excerpt of it)."""
    lines = re.sub(r"^at \d+\(\d+\): ", "", error.strip()).splitlines()
    excerpt = next((i for i, line in enumerate(lines) if re.match(r"\s*\d+ \| ", line)), len(lines))
    return "\n".join(lines[:excerpt]).rstrip()


def _tokenizer_eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else []


def _grammar_text(spec: StructuredOutputSpec) -> str:
    """llguidance's grammar for ``spec`` (not yet checked), or GrammarError for a malformed spec."""
    kind, value = spec.kind, spec.value
    if kind == "json_object":
        if value is not None:
            raise GrammarError("json_object takes no value")
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=JSON_OPTIONS)
    if kind == "json_schema":
        if not isinstance(value, str):
            raise GrammarError("json_schema needs the schema as a JSON string")
        try:
            schema = json.loads(value)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be a JSON object")
        if "x-guidance" in schema:
            raise GrammarError('the JSON schema keyword "x-guidance" is not supported')
        return llguidance.LLMatcher.grammar_from_json_schema(value, overrides=JSON_OPTIONS)
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError("regex needs the pattern as a string")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, tuple) or not value or not all(isinstance(c, str) for c in value):
            raise GrammarError("choice needs a non-empty list of strings")
        # Lark string literals take JSON's escapes, so json.dumps writes any string as one literal.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    raise GrammarError(f"unknown structured output kind {kind!r}")


# ---- applying the masks (engine thread) ------------------------------------------------------------------------------
class _MaskWorkspace:
    """Buffers reused by every step that masks up to ``capacity`` rows on one device (allocated once, grown rarely).

    The bitmask's bytes index a [256, 8] table of additive penalties (0 where the bit is set, -inf where not), so
    unpacking the bits and masking are one gather and one ``index_add_`` (measured faster on CPU than unpacking to a
    bool mask for masked_fill).
    """

    def __init__(self, capacity: int, words: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity = capacity
        pin = device.type == "cuda"
        self.bitmask = torch.empty(capacity, words, dtype=torch.int32, pin_memory=pin)  # [C, W] filled on the host
        self.index = torch.empty(capacity * words * 4, dtype=torch.int32, device=device)  # [C*4W] the bitmask bytes
        self.penalty = torch.empty(capacity * words * 4, 8, dtype=dtype, device=device)  # [C*4W, 8] -> [C, 32W]
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [256, 8]; bit k of byte b (little-endian)
        self.table = torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)


_local = threading.local()


def _workspace(rows: int, words: int, device: torch.device, dtype: torch.dtype) -> _MaskWorkspace:
    spaces: dict[tuple[torch.device, torch.dtype, int], _MaskWorkspace] = _local.__dict__.setdefault("spaces", {})
    key = (device, dtype, words)
    space = spaces.get(key)
    if space is None or space.capacity < rows:
        space = spaces[key] = _MaskWorkspace(max(rows, 2 * space.capacity if space else 8), words, device, dtype)
    return space


def apply_grammar_masks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
    """``logits[i, t] = -inf`` for every token t that row i's grammar forbids now; rows whose matcher is None are
    untouched (and a batch without matchers does no work at all).

    logits: [N, V] float (in place; V = the compiler's ``vocab_size``)    matchers: N entries
    Each grammar row's bitmask is filled on the host into one reused [G, W] int32 buffer, then applied to the G rows
    at once: ``logits[rows] += penalty`` with penalty [G, V] 0 / -inf (for finite logits the same as masked_fill).
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    assert logits.dim() == 2 and logits.shape[0] == len(matchers), "one logits row per matcher"
    n, vocab = len(rows), logits.shape[1]
    first = matchers[rows[0]]
    assert first is not None
    words = first.mask_words
    space = _workspace(n, words, logits.device, logits.dtype)
    bitmask = space.bitmask[:n]  # [G, W]
    for j, i in enumerate(rows):
        matcher = matchers[i]
        assert matcher is not None and (matcher.vocab_size, matcher.mask_words) == (vocab, words), "another vocabulary"
        matcher.fill_bitmask(bitmask, j)
    index = space.index[: n * words * 4]
    # Asynchronous from the pinned buffer on CUDA: the buffer is refilled only next step, after the sampler's
    # device->host transfer has waited for this step's work.
    index.copy_(bitmask.view(torch.uint8).view(-1), non_blocking=True)  # [G*4W] bytes as table rows
    penalty = torch.index_select(space.table, 0, index, out=space.penalty[: n * words * 4])  # [G*4W, 8]
    logits.index_add_(0, torch.tensor(rows, device=logits.device), penalty.view(n, words * 32)[:, :vocab])
