"""``POST /v1/generate``: our own generation API, JSON or Server-Sent Events."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.adapter_fields import requested_adapter
from server.api.auth import require_inference
from server.api.generation import (
    completed_reason,
    prepare_adapter,
    public_reason,
    run_to_completion,
    sampling_params,
    stream,
    submit,
)
from server.api.logprob_format import token_info, token_infos
from server.api.prompts import encode_prompt, off_loop
from server.api.sampling_fields import check_token_ids, grammar_for, logit_bias_pairs
from server.api.schemas import (
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    StreamToken,
    TokenLogprobInfo,
    Usage,
    error_responses,
)
from server.api.structured_fields import generate_spec
from server.engine.handle import RequestOutput
from server.engine.logprob import TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.service import Service

router = APIRouter(dependencies=[Depends(require_inference)])
_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503, 504)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _params(service: Service, body: GenerateRequest) -> SamplingParams:
    check_token_ids(service, body.stop_token_ids, "stop_token_ids")
    return sampling_params(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=logit_bias_pairs(service, body.logit_bias),
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids),
        skip_special_tokens=body.skip_special_tokens,
    )


def _prompt_infos(
    service: Service, entries: tuple[TokenLogprob | None, ...] | None
) -> list[TokenLogprobInfo | None] | None:
    return None if entries is None else token_infos(service.tokenizer, entries)


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when streaming"}},
)
async def generate(body: GenerateRequest, request: Request):
    """Generate with ``adapter`` (a name or a weighted mixture; absent: the base model). With ``stream: true`` the
    answer is Server-Sent Events: one ``data: {"id", "token": {"id", "text"}}`` per token (with ``logprob`` and
    ``top`` when ``logprobs`` is set), a last event with ``finish_reason`` and ``usage`` (and ``prompt_logprobs``),
    then ``data: [DONE]``."""
    service: Service = request.app.state.service
    adapter = requested_adapter(body.adapter)
    params = _params(service, body)
    grammar = await grammar_for(service, generate_spec(body.structured_output))
    await prepare_adapter(service, adapter)
    handle = submit(service, await encode_prompt(service, body.prompt), adapter, params, grammar)
    tokenizer = service.tokenizer
    if not body.stream:
        result = await run_to_completion(handle, request)
        return GenerateResponse(
            id=result.request_id,
            adapter=adapter,
            text=result.text,
            finish_reason=completed_reason(result.finish_reason),
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            logprobs=None if body.logprobs is None else [token_info(tokenizer, e) for e in result.logprobs],
            prompt_logprobs=await off_loop(_prompt_infos, service, result.prompt_logprobs),
        )
    outputs = await stream(handle, request)

    def token_events(out: RequestOutput) -> list[str]:
        events = []
        for i, token in enumerate(out.token_ids):  # the delta rides on the step's (only) token
            text = out.text if i == len(out.token_ids) - 1 else ""
            event = StreamToken(id=token, text=text)
            if body.logprobs is not None:
                info = token_info(tokenizer, out.logprobs[i])
                event = event.model_copy(update={"logprob": info.logprob, "top": info.top})
            events.append(sse(StreamEvent(id=out.request_id, token=event).model_dump_json(exclude_none=True)))
        return events

    async def events() -> AsyncIterator[str]:
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        async for out in outputs:
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs
            for event in token_events(out):
                yield event
            if out.finished:
                assert out.finish_reason is not None  # every final output carries its reason
                final = StreamEvent(
                    id=out.request_id,
                    finish_reason=public_reason(out.finish_reason),
                    usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
                    error=out.error,
                    prompt_logprobs=await off_loop(_prompt_infos, service, prompt_logprobs),
                )
                if out.text and not out.token_ids:
                    final = final.model_copy(update={"token": StreamToken(id=-1, text=out.text)})
                yield sse(final.model_dump_json(exclude_none=True))
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
