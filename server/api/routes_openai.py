"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``; ``model`` names an adapter
or the base model. The official ``openai`` client works against these, streaming included."""

import time
import uuid
from collections.abc import AsyncIterator
from typing import overload

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.api.auth import require_inference
from server.api.errors import ApiError
from server.api.generation import run_to_completion, sampling_params, stream, submit
from server.api.openai_schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
)
from server.api.prompts import encode_chat, encode_prompt
from server.api.schemas import ErrorBody, ErrorResponse, error_responses
from server.engine.handle import RequestHandle, RequestOutput, RequestResult
from server.engine.request import FinishReason
from server.service import Service

router = APIRouter(dependencies=[Depends(require_inference)])
_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503, 504)


def _adapter_for(service: Service, model: str) -> str | None:
    if model == service.base_model_id:
        return None
    if model in service.registry:
        return model
    raise ApiError(404, "not_found", f"model {model!r} does not exist; GET /v1/models lists the base and adapters")


@overload
def _reason(reason: FinishReason) -> OpenAIFinishReason: ...
@overload
def _reason(reason: None) -> None: ...
def _reason(reason: FinishReason | None) -> OpenAIFinishReason | None:
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def _start(service: Service, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int]) -> RequestHandle:
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    params = sampling_params(
        max_new_tokens=max_tokens or _default_max_tokens(service, len(prompt_ids)),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
    )
    return submit(service, prompt_ids, _adapter_for(service, body.model), params)


def _default_max_tokens(service: Service, prompt_len: int) -> int:
    """OpenAI's default for ``max_tokens`` is "as many as fit"; the per-request limit caps it when one is set."""
    fit = max(1, service.settings.max_seq_len - prompt_len)
    limit = service.settings.max_new_tokens
    return fit if limit is None else min(fit, limit)


def _usage(result: RequestResult) -> CompletionUsage:
    total = result.prompt_tokens + result.completion_tokens
    return CompletionUsage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                           total_tokens=total)  # fmt: skip


def _usage_of(out: RequestOutput) -> CompletionUsage:
    """Usage from a stream's final output (``stream_options.include_usage``)."""
    total = out.prompt_tokens + out.completion_tokens
    return CompletionUsage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                           total_tokens=total)  # fmt: skip


def _sse(chunk: BaseModel | str) -> str:
    return f"data: {chunk if isinstance(chunk, str) else chunk.model_dump_json()}\n\n"


def _stream_error(out: RequestOutput) -> str | None:
    """An SSE error event for a stream that ended early (timeout, model error); the ``openai`` client raises it."""
    if out.finish_reason not in (FinishReason.TIMEOUT, FinishReason.ERROR, FinishReason.ADAPTER_DELETED):
        return None
    type_ = "timeout" if out.finish_reason is FinishReason.TIMEOUT else "unavailable"
    return _sse(ErrorResponse(error=ErrorBody(type=type_, message=out.error or "the request ended early")))


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 naming every field set to something this server does not do: a wrong answer that looks right (say, no
    log-probabilities where an evaluation harness asked for them) is worse than none."""
    if unsupported := body.unsupported():
        raise ApiError(400, "unsupported_field", f"not supported by this server: {'; '.join(unsupported)}")


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request):
    service: Service = request.app.state.service
    _refuse_unsupported(body)
    try:
        prompt = body.single_prompt()
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    handle = _start(service, body, await encode_prompt(service, prompt))
    created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    prefix = prompt if body.echo else ""
    if not body.stream:
        result = await run_to_completion(handle, request)
        usage = _usage(result)
        choice = CompletionChoice(text=prefix + result.text, finish_reason=_reason(result.finish_reason))
        return CompletionResponse(id=cid, created=created, model=body.model, choices=[choice], usage=usage)
    outputs = await stream(handle, request)

    async def events() -> AsyncIterator[str]:
        if prefix:
            yield _sse(CompletionResponse(id=cid, created=created, model=body.model,
                                          choices=[CompletionChoice(text=prefix, finish_reason=None)]))  # fmt: skip
        async for out in outputs:
            if (error := _stream_error(out)) is not None:
                yield error
                break
            choice = CompletionChoice(text=out.text, finish_reason=_reason(out.finish_reason))
            yield _sse(CompletionResponse(id=cid, created=created, model=body.model, choices=[choice]))
            if out.finished and body.include_usage:
                usage = _usage_of(out)
                yield _sse(CompletionResponse(id=cid, created=created, model=body.model, choices=[], usage=usage))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service: Service = request.app.state.service
    _refuse_unsupported(body)
    prompt_ids = await encode_chat(service, [m.model_dump() for m in body.messages])
    handle = _start(service, body, prompt_ids)
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    if not body.stream:
        result = await run_to_completion(handle, request)
        usage = _usage(result)
        choice = ChatChoice(message=ChatChoiceMessage(content=result.text), finish_reason=_reason(result.finish_reason))
        return ChatCompletionResponse(id=cid, created=created, model=body.model, choices=[choice], usage=usage)
    outputs = await stream(handle, request)

    def chunk(delta: ChatDelta, reason: OpenAIFinishReason | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        return _sse(ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[choice]))

    async def events() -> AsyncIterator[str]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for out in outputs:
            if (error := _stream_error(out)) is not None:
                yield error
                break
            if out.text:
                yield chunk(ChatDelta(content=out.text))
            if out.finished:
                yield chunk(ChatDelta(), _reason(out.finish_reason))
                if body.include_usage:
                    yield _sse(ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[],
                                                   usage=_usage_of(out)))  # fmt: skip
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    service: Service = request.app.state.service
    now = int(time.time())
    cards = [ModelCard(id=service.base_model_id, created=now)]
    cards += [ModelCard(id=r.name, created=now, parent=service.base_model_id) for r in service.registry.list()]
    return ModelList(data=cards)
