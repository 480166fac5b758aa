"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``; ``model`` names an adapter
or the base model. The official ``openai`` client works against these, streaming included.

A request's prompts (a completions request may batch several) and choices (``n`` per prompt) are all submitted
together, so they run concurrently in the engine; each prompt's ``n`` choices share one prefill."""

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.api.auth import require_inference
from server.api.generation import prepare_adapter, run_all, stream_all, submit_groups
from server.api.openai_choices import CompletionChoices, chat_choice, chat_logprobs_of, finish_reason, usage
from server.api.openai_params import (
    Prompt,
    adapter_for,
    chat_params,
    completion_params,
    completion_prompts,
    refuse_unsupported,
)
from server.api.openai_responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionResponse,
    CompletionUsage,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
)
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.api.prompts import encode_chat, off_loop
from server.api.sampling_fields import grammar_for
from server.api.schemas import ErrorBody, ErrorResponse, error_responses
from server.api.structured_fields import openai_spec
from server.engine.handle import RequestOutput
from server.engine.request import FinishReason
from server.engine.structured_output import CompiledGrammar
from server.service import Service

router = APIRouter(dependencies=[Depends(require_inference)])
_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503, 504)
_SSE_HEADERS = {"Cache-Control": "no-cache"}


def _sse(chunk: BaseModel | str) -> str:
    return f"data: {chunk if isinstance(chunk, str) else chunk.model_dump_json()}\n\n"


def _stream_error(out: RequestOutput) -> str | None:
    """An SSE error event for a stream that ended early (timeout, model error); the ``openai`` client raises it."""
    if out.finish_reason not in (FinishReason.TIMEOUT, FinishReason.ERROR, FinishReason.ADAPTER_DELETED):
        return None
    type_ = "timeout" if out.finish_reason is FinishReason.TIMEOUT else "unavailable"
    return _sse(ErrorResponse(error=ErrorBody(type=type_, message=out.error or "the request ended early")))


async def _grammar(service: Service, body: CompletionRequest | ChatCompletionRequest) -> CompiledGrammar | None:
    spec = openai_spec(body.response_format, body.guided_json, body.guided_regex, body.guided_choice,
                       body.structured_outputs)  # fmt: skip
    return await grammar_for(service, spec)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request):
    service: Service = request.app.state.service
    refuse_unsupported(body)
    adapter = adapter_for(service, body.model)
    prompts = await completion_prompts(service, body)
    params = completion_params(service, body, prompts)
    grammar = await _grammar(service, body)
    await prepare_adapter(service, adapter)
    handles = submit_groups(service, [(p.ids, ps) for p, ps in zip(prompts, params, strict=True)], adapter, grammar)
    choices = CompletionChoices(service.tokenizer, body, prompts)
    created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    if not body.stream:
        results = await run_all(handles, request)
        answer = await off_loop(choices.choices, results)  # log-probabilities of long prompts take a while
        used = usage(prompts, sum(r.completion_tokens for r in results))
        return CompletionResponse(id=cid, created=created, model=body.model or service.base_model_id, choices=answer,
                                  usage=used)  # fmt: skip
    outputs = await stream_all(handles, request)
    model = body.model or service.base_model_id

    def chunk(choices: list[CompletionChoice], used: CompletionUsage | None = None) -> str:
        return _sse(CompletionResponse(id=cid, created=created, model=model, choices=choices, usage=used))

    async def events() -> AsyncIterator[str]:
        started: set[int] = set()
        generated: dict[int, int] = {}
        try:
            async for index, out in outputs:
                if (error := _stream_error(out)) is not None:
                    yield error
                    break
                if index not in started:
                    started.add(index)
                    if (echo := await off_loop(choices.echo_chunk, index, out)) is not None:
                        yield chunk([echo])
                yield chunk([choices.chunk(index, out)])
                if out.finished:
                    generated[index] = out.completion_tokens
            else:
                if body.include_usage:
                    yield chunk([], usage(prompts, sum(generated.values())))
        finally:
            await outputs.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service: Service = request.app.state.service
    refuse_unsupported(body)
    adapter = adapter_for(service, body.model)
    prompt = Prompt(await encode_chat(service, [m.model_dump() for m in body.messages]), "")
    params = chat_params(service, body, len(prompt.ids))
    grammar = await _grammar(service, body)
    await prepare_adapter(service, adapter)
    handles = submit_groups(service, [(prompt.ids, params)], adapter, grammar)
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    model = body.model or service.base_model_id
    tokenizer = service.tokenizer
    if not body.stream:
        results = await run_all(handles, request)
        answer = await off_loop(lambda: [chat_choice(tokenizer, body, i, r) for i, r in enumerate(results)])
        used = usage([prompt], sum(r.completion_tokens for r in results))
        return ChatCompletionResponse(id=cid, created=created, model=model, choices=answer, usage=used)
    outputs = await stream_all(handles, request)

    def chunk(index: int, delta: ChatDelta, reason: OpenAIFinishReason | None = None,
              logprobs: ChatLogprobs | None = None) -> str:  # fmt: skip
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)
        return _sse(ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice]))

    async def events() -> AsyncIterator[str]:
        generated: dict[int, int] = {}
        try:
            for index in range(len(handles)):
                yield chunk(index, ChatDelta(role="assistant", content=""))
            async for index, out in outputs:
                if (error := _stream_error(out)) is not None:
                    yield error
                    break
                if out.text or (body.logprobs and out.token_ids):
                    logprobs = chat_logprobs_of(tokenizer, body, out.logprobs)
                    yield chunk(index, ChatDelta(content=out.text), logprobs=logprobs)
                if out.finished:
                    generated[index] = out.completion_tokens
                    yield chunk(index, ChatDelta(), finish_reason(out.finish_reason))
            else:
                if body.include_usage:
                    yield _sse(ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                                   usage=usage([prompt], sum(generated.values()))))  # fmt: skip
        finally:
            await outputs.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    service: Service = request.app.state.service
    now = int(time.time())
    cards = [ModelCard(id=service.base_model_id, created=now)]
    cards += [ModelCard(id=r.name, created=now, parent=service.base_model_id) for r in service.registry.list()]
    return ModelList(data=cards)
