"""A request's text to prompt token ids, without stalling the event loop.

Tokenising and rendering a chat template cost time linear in the text (about 10 s for a 4 MB prompt on a busy
CPU), and the token limit can only be checked after tokenising. So, first, a prompt that cannot fit is refused by
its length in characters: no token of the vocabulary is longer than ``longest_token_chars`` characters, so a text
longer than ``max_prompt_tokens * longest_token_chars`` needs more than ``max_prompt_tokens`` tokens (a bound that
never refuses a prompt that fits, unlike a guessed chars-per-token ratio). Then the work runs on a small pool of
its own: the Rust tokenizer releases the GIL while it encodes, so the event loop keeps answering other clients, and
a flood of tokenisations cannot starve the default thread pool, which runs the synchronous key checks of every
route (``/health`` included).
"""

import asyncio
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from jinja2 import TemplateError, TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from server.api.errors import ApiError
from server.service import Service

T = TypeVar("T")

# A few workers, not one: tokenisation of unrelated requests may overlap on a multi-core host; the tokenizer is safe
# to share (encoding reads it, and we never change its truncation or padding).
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tokenize")
_LONGEST: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, int]" = weakref.WeakKeyDictionary()  # -> longest entry


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on the tokenizer pool: tokenizer work (encoding, and decoding token by token for
    log-probabilities) that grows with the text must not stall the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters of the longest vocabulary entry, added tokens included. An entry's length is at least the number
    of characters of text it stands for: byte-level entries have one character per byte, SentencePiece pieces one
    per character (a byte-fallback piece like ``<0x0A>`` stands for a single one)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


async def max_prompt_chars(service: Service) -> int:
    """The longest text that can still encode to at most the prompt token limit."""
    tokenizer = service.tokenizer
    longest = _LONGEST.get(tokenizer)
    if longest is None:  # once per process: reading a 150k-entry vocabulary takes ~0.1 s, off the loop too
        longest = _LONGEST.setdefault(tokenizer, await off_loop(longest_token_chars, tokenizer))
    settings = service.settings
    limit = settings.max_prompt_tokens if settings.max_prompt_tokens is not None else settings.max_seq_len - 1
    return limit * longest


def _check_chars(what: str, chars: int, limit: int) -> None:
    if chars > limit:
        raise ApiError(400, "invalid_request", f"the {what} has {chars} characters; the limit is {limit} (more "
                       "characters cannot fit in the prompt token limit)")  # fmt: skip


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if not ids:
        raise ApiError(422, "invalid_request", "the prompt encodes to no tokens")
    return ids


async def encode_prompt(service: Service, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a plain prompt (with the tokenizer's BOS, as ``tokenizer(prompt)`` adds it, unless
    ``add_special_tokens`` is False); 400 when it is too long in characters, before any tokenising."""
    _check_chars("prompt", len(prompt), await max_prompt_chars(service))
    return await off_loop(_encode, service.tokenizer, prompt, add_special_tokens)


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a prompt; the defaults are the chat completions endpoint's."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template writes the special tokens it wants


def _render_and_encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], limit: int, options: ChatOptions
) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            tokenize=False,
        )
    except TemplateSyntaxError:
        raise  # the server's template is broken: not the client's fault, a 500 (and a log line)
    except (TemplateError, ValueError) as exc:  # the template's raise_exception(...), e.g. "roles must alternate";
        # transformers' ValueError: continue_final_message without a final message to continue, ...
        raise ApiError(400, "invalid_request", f"the chat template refused the messages: {exc}") from None
    assert isinstance(text, str)  # tokenize=False with one conversation renders one string
    _check_chars("rendered chat", len(text), limit)
    return _encode(tokenizer, text, options.add_special_tokens)


async def encode_chat(
    service: Service, messages: list[dict[str, str]], options: ChatOptions = ChatOptions()
) -> list[int]:
    """Token ids of ``messages`` rendered by the base model's chat template; 400 when the template has none or
    refuses the conversation, or when the messages (or the rendered chat) are too long in characters."""
    if not service.tokenizer.chat_template:
        raise ApiError(400, "invalid_request", "the base model's tokenizer has no chat template")
    limit = await max_prompt_chars(service)
    _check_chars("messages' content", sum(len(m["content"]) for m in messages), limit)
    return await off_loop(_render_and_encode, service.tokenizer, messages, limit, options)


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int], skip_special_tokens: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)  # a flat id list decodes to one string
    return text


async def decode_prompt(service: Service, ids: list[int], skip_special_tokens: bool) -> str:
    """The text of a token-id prompt (to echo it), decoded off the event loop."""
    return await off_loop(_decode, service.tokenizer, ids, skip_special_tokens)
