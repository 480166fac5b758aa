"""The choices of OpenAI answers, whole or streamed: text (with the echoed prompt), log-probabilities, indices.

Choice ``index`` = prompt index * n + i, as OpenAI and vLLM number them; handle ``index`` of a request is the same
number (the handles are submitted in that order).
"""

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from server.api.logprob_format import TextOffsets, chat_logprobs, completion_logprobs
from server.api.openai_params import Prompt
from server.api.openai_responses import (
    ChatChoice,
    ChatChoiceMessage,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionUsage,
    OpenAIFinishReason,
)
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.engine.handle import RequestOutput, RequestResult
from server.engine.logprob import TokenLogprob
from server.engine.request import FinishReason


def finish_reason(reason: FinishReason | None) -> OpenAIFinishReason | None:
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage(prompts: Sequence[Prompt], completion_tokens: int) -> CompletionUsage:
    """Every choice's tokens, each prompt counted once however many choices it has (as vLLM counts)."""
    prompt_tokens = sum(len(p.ids) for p in prompts)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)  # fmt: skip


class CompletionChoices:
    """Builds one completions request's choices; for a stream, keeps each choice's text offset between chunks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, body: CompletionRequest, prompts: Sequence[Prompt]) -> None:
        self.tokenizer, self.body, self.prompts = tokenizer, body, prompts
        self._prompt_offsets: dict[int, list[int]] = {}  # prompt index -> its tokens' offsets (shared by its choices)
        self._offsets: dict[int, TextOffsets] = {}  # choice index -> its generated tokens' offsets so far

    def prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.body.n]

    def _echo(self, index: int) -> str:
        return self.prompt(index).text if self.body.echo else ""

    def _offsets_of(self, index: int) -> TextOffsets:
        if index not in self._offsets:
            skip = self.body.skip_special_tokens
            self._offsets[index] = TextOffsets(self.tokenizer, self.prompt(index).ids, skip, len(self._echo(index)))
        return self._offsets[index]

    def _prompt_part(self, index: int, entries: Sequence[TokenLogprob | None] | None) -> CompletionLogprobs:
        prompt_index = index // self.body.n
        ids = self.prompts[prompt_index].ids
        if prompt_index not in self._prompt_offsets:
            offsets = TextOffsets(self.tokenizer, (), self.body.skip_special_tokens).add(ids)
            self._prompt_offsets[prompt_index] = offsets
        assert entries is not None and len(entries) == len(ids), "echo with logprobs asked for prompt_logprobs"
        return completion_logprobs(self.tokenizer, ids, entries, self._prompt_offsets[prompt_index])

    def _generated_part(self, index: int, ids: Sequence[int], entries: Sequence[TokenLogprob]) -> CompletionLogprobs:
        return completion_logprobs(self.tokenizer, ids, entries, self._offsets_of(index).add(ids))

    def choice(self, index: int, result: RequestResult) -> CompletionChoice:
        """A whole choice: the echoed prompt, then the completion; with logprobs, the prompt's tokens first."""
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self._generated_part(index, result.token_ids, result.logprobs)
            if self.body.echo:
                logprobs = _joined(self._prompt_part(index, result.prompt_logprobs), logprobs)
        return CompletionChoice(index=index, text=self._echo(index) + result.text, logprobs=logprobs,
                                finish_reason=finish_reason(result.finish_reason))  # fmt: skip

    def choices(self, results: Sequence[RequestResult]) -> list[CompletionChoice]:
        return [self.choice(i, result) for i, result in enumerate(results)]

    def echo_chunk(self, index: int, first: RequestOutput) -> CompletionChoice | None:
        """A stream's first chunk for choice ``index`` with ``echo``: the prompt (and its tokens' logprobs)."""
        if not self.body.echo:
            return None
        logprobs = None if self.body.logprobs is None else self._prompt_part(index, first.prompt_logprobs)
        return CompletionChoice(index=index, text=self._echo(index), logprobs=logprobs, finish_reason=None)

    def chunk(self, index: int, out: RequestOutput) -> CompletionChoice:
        """A stream's chunk of choice ``index``: the output's text delta and its tokens' logprobs."""
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self._generated_part(index, out.token_ids, out.logprobs)
        return CompletionChoice(index=index, text=out.text, logprobs=logprobs,
                                finish_reason=finish_reason(out.finish_reason))  # fmt: skip


def _joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def chat_logprobs_of(
    tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest, entries: Sequence[TokenLogprob]
) -> ChatLogprobs | None:
    """``choices[i].logprobs`` of a chat answer or chunk: null unless ``logprobs: true``."""
    return ChatLogprobs(content=chat_logprobs(tokenizer, entries)) if body.logprobs else None


def chat_choice(
    tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest, index: int, result: RequestResult
) -> ChatChoice:
    reason = finish_reason(result.finish_reason)
    assert reason is not None
    return ChatChoice(index=index, message=ChatChoiceMessage(content=result.text), finish_reason=reason,
                      logprobs=chat_logprobs_of(tokenizer, body, result.logprobs))  # fmt: skip
