"""From an OpenAI body to what the engine runs: the adapter, the prompts, and each choice's ``SamplingParams``."""

import asyncio
from dataclasses import dataclass

from server.api.adapter_fields import model_adapter
from server.api.errors import ApiError
from server.api.generation import sampling_params
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.api.prompts import decode_prompt, encode_prompt
from server.api.sampling_fields import check_token_ids, logit_bias_pairs, per_choice
from server.engine.sampling_params import SamplingParams
from server.service import Service

OpenAIRequest = CompletionRequest | ChatCompletionRequest


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # as sent, or the sent token ids decoded (what ``echo`` shows)


def adapter_for(service: Service, model: str | None) -> str | None:
    """The adapter ``model`` names (or the mixture key it writes); None for the base model (its id, or no model at
    all, as vLLM takes it)."""
    return model_adapter(service, model)


def refuse_unsupported(body: OpenAIRequest) -> None:
    """400 naming every field set to something this server does not do: a wrong answer that looks right (say, one
    choice where the client asked for the best of several) is worse than none."""
    unsupported = body.unsupported()
    if isinstance(body, CompletionRequest) and body.best_of is not None and body.best_of > body.n:
        unsupported.append(f"best_of = {body.best_of} (more than n: sequences generated and not returned)")
    if unsupported:
        raise ApiError(400, "unsupported_field", f"not supported by this server: {'; '.join(unsupported)}")
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of < body.n:
            raise ApiError(422, "invalid_request", f"best_of ({body.best_of}) must be at least n ({body.n})")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(422, "invalid_request", "max_tokens: 0 only scores the prompt, which needs echo: true")
    elif not body.logprobs and body.top_logprobs:
        raise ApiError(422, "invalid_request", "top_logprobs needs logprobs: true")


def default_max_tokens(service: Service, prompt_len: int) -> int:
    """OpenAI's default for ``max_tokens`` is "as many as fit"; the per-request limit caps it when one is set."""
    fit = max(1, service.settings.max_seq_len - prompt_len)
    limit = service.settings.max_new_tokens
    return fit if limit is None else min(fit, limit)


async def completion_prompts(service: Service, body: CompletionRequest) -> list[Prompt]:
    """The prompts of a completions body, in order: strings are encoded (with the tokenizer's special tokens, as
    ``tokenizer(prompt)`` adds them), token ids are checked against the vocabulary and, for ``echo``, decoded."""
    prompt = body.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        encoded = await asyncio.gather(*(encode_prompt(service, text) for text in texts))
        return [Prompt(ids, text) for ids, text in zip(encoded, texts, strict=True)]
    several = isinstance(prompt[0], list)
    lists = [p for p in prompt if isinstance(p, list)] if several else [prompt]
    prompts = []
    for index, ids in enumerate(lists):
        ids = [t for t in ids if isinstance(t, int)]
        check_token_ids(service, ids, f"prompt[{index}]" if several else "prompt")
        text = await decode_prompt(service, ids, body.skip_special_tokens) if body.echo else ""
        prompts.append(Prompt(ids, text))
    return prompts


def _choices(
    service: Service,
    body: OpenAIRequest,
    max_new_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    logit_bias: tuple[tuple[int, float], ...],
) -> list[SamplingParams]:
    params = sampling_params(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),  # vLLM's -1 and 0 both mean off
        seed=body.seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=logit_bias,
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        skip_special_tokens=body.skip_special_tokens,
    )
    return per_choice(params, body.n)


def _checked_token_fields(service: Service, body: OpenAIRequest) -> tuple[tuple[int, float], ...]:
    check_token_ids(service, body.stop_token_ids or (), "stop_token_ids")
    return logit_bias_pairs(service, body.logit_bias)


def completion_params(service: Service, body: CompletionRequest, prompts: list[Prompt]) -> list[list[SamplingParams]]:
    """Each prompt's choices. ``logprobs`` asks for the generated tokens' log-probabilities, and with ``echo`` for
    the prompt's too; ``max_tokens: 0`` (with echo) only scores the prompt: nothing is generated, and without
    ``logprobs`` the prompt is scored anyway (``prompt_logprobs`` 0; the answer only echoes it)."""
    bias = _checked_token_fields(service, body)
    logprobs = body.logprobs
    prompt_logprobs = logprobs if body.echo else None
    if body.max_tokens == 0:
        logprobs, prompt_logprobs = None, 0 if prompt_logprobs is None else prompt_logprobs
    out = []
    for prompt in prompts:
        max_new = body.max_tokens if body.max_tokens is not None else default_max_tokens(service, len(prompt.ids))
        out.append(_choices(service, body, max_new, logprobs, prompt_logprobs, bias))
    return out


def chat_params(service: Service, body: ChatCompletionRequest, prompt_len: int) -> list[SamplingParams]:
    """The conversation's choices; ``logprobs: true`` asks for each generated token's and ``top_logprobs``
    alternatives."""
    bias = _checked_token_fields(service, body)
    max_new = body.max_completion_tokens or body.max_tokens or default_max_tokens(service, prompt_len)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _choices(service, body, max_new, logprobs, None, bias)
