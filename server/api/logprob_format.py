"""Log-probabilities as each API writes them, from the engine's ``TokenLogprob`` entries.

OpenAI's completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; OpenAI's chat: ``content``
entries ``{"token", "logprob", "bytes", "top_logprobs"}``; our ``/v1/generate``: ``{"id", "text", "logprob", "top"}``.
A token's text is the token id decoded alone (as vLLM reports it), special tokens included; minus infinity (a token
top-k/top-p filtered out, or masked by a grammar or a bias) is written -9999.0, as vLLM and OpenAI do, since JSON has
no infinity.
"""

import weakref
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from server.api.openai_responses import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.api.schemas import TokenAlternative, TokenLogprobInfo
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.logprob import TokenLogprob

NEG_INF_LOGPROB = -9999.0

# token id -> its text, per tokenizer (at most one entry per vocabulary entry).
_TEXTS: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[int, str]]" = weakref.WeakKeyDictionary()


def finite(logprob: float) -> float:
    """``logprob`` as JSON can carry it: -inf (and NaN, which no entry should hold) become -9999.0."""
    return logprob if logprob > NEG_INF_LOGPROB else NEG_INF_LOGPROB


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The token decoded alone (a piece of a multi-byte character decodes to U+FFFD)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS.setdefault(tokenizer, {})
    text = texts.get(token_id)
    if text is None:
        decoded = tokenizer.decode([token_id], skip_special_tokens=False)
        assert isinstance(decoded, str)
        text = texts[token_id] = decoded
    return text


class TextOffsets:
    """OpenAI's ``text_offset``, fed token by token: where each token's text starts in a choice's text, counted in
    the text the tokens decode to from ``start`` on (after an echoed prompt). A token's text starts after every
    character the tokens before it complete: a token that ends inside a multi-byte character has the offset of the
    one that completes it. ``context`` (the prompt, for generated tokens) only guides the decoder's spacing."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, context: Sequence[int], skip_special_tokens: bool, start: int = 0
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, context, skip_special_tokens)
        self._at = start

    def add(self, token_ids: Sequence[int]) -> list[int]:
        offsets = []
        for token_id in token_ids:
            offsets.append(self._at)
            self._at += len(self._detokenizer.add(token_id))
        return offsets


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    offsets: Sequence[int],
) -> CompletionLogprobs:
    """OpenAI's completions shape. ``entries[i]`` is ``token_ids[i]``'s (None: nothing precedes the first prompt
    token, whose logprob and top_logprobs are then null). Each ``top_logprobs`` dict holds the asked alternatives and
    the chosen token (so up to logprobs + 1 entries, as OpenAI documents); two ids that decode alike keep the more
    probable one's log-probability."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for token, entry in zip(tokens, entries, strict=True):
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for alternative, logprob in entry.top:
            top.setdefault(token_text(tokenizer, alternative), finite(logprob))
        top.setdefault(token, finite(entry.logprob))
        values.append(finite(entry.logprob))
        tops.append(top)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=list(offsets))


def _top(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode("utf-8")))


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
    """OpenAI's chat shape: one entry per generated token with exactly the asked number of alternatives. ``bytes``
    are the UTF-8 bytes of the token's text (as vLLM answers them: U+FFFD's for a piece of a character)."""
    out = []
    for entry in entries:
        chosen = _top(tokenizer, entry.token_id, entry.logprob)
        alternatives = [_top(tokenizer, t, lp) for t, lp in entry.top]
        out.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return out


def _alternative(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> TokenAlternative:
    return TokenAlternative(id=token_id, text=token_text(tokenizer, token_id), logprob=finite(logprob))


def token_info(tokenizer: PreTrainedTokenizerBase, entry: TokenLogprob) -> TokenLogprobInfo:
    """Our ``/v1/generate`` shape: the token, its log-probability and the asked alternatives."""
    top = [_alternative(tokenizer, t, lp) for t, lp in entry.top]
    return TokenLogprobInfo(**_alternative(tokenizer, entry.token_id, entry.logprob).model_dump(), top=top)


def token_infos(
    tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob | None]
) -> list[TokenLogprobInfo | None]:
    return [None if entry is None else token_info(tokenizer, entry) for entry in entries]
