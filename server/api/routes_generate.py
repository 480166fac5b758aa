"""``POST /v1/generate``: our own generation API, JSON or Server-Sent Events."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.auth import require_inference
from server.api.generation import completed_reason, public_reason, run_to_completion, sampling_params, stream, submit
from server.api.prompts import encode_prompt
from server.api.schemas import GenerateRequest, GenerateResponse, StreamEvent, StreamToken, Usage, error_responses
from server.service import Service

router = APIRouter(dependencies=[Depends(require_inference)])
_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 503, 504)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when streaming"}},
)
async def generate(body: GenerateRequest, request: Request):
    """Generate with ``adapter`` (or the base model). With ``stream: true`` the answer is Server-Sent Events: one
    ``data: {"id", "token": {"id", "text"}}`` per token, a last event with ``finish_reason`` and ``usage``, then
    ``data: [DONE]``."""
    service: Service = request.app.state.service
    params = sampling_params(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
    )
    handle = submit(service, await encode_prompt(service, body.prompt), body.adapter, params)
    if not body.stream:
        result = await run_to_completion(handle, request)
        return GenerateResponse(
            id=result.request_id,
            adapter=body.adapter,
            text=result.text,
            finish_reason=completed_reason(result.finish_reason),
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        )
    outputs = await stream(handle, request)

    async def events() -> AsyncIterator[str]:
        async for out in outputs:
            for i, token in enumerate(out.token_ids):  # the delta rides on the step's (only) token
                text = out.text if i == len(out.token_ids) - 1 else ""
                event = StreamEvent(id=out.request_id, token=StreamToken(id=token, text=text))
                yield sse(event.model_dump_json(exclude_none=True))
            if out.finished:
                assert out.finish_reason is not None  # every final output carries its reason
                final = StreamEvent(
                    id=out.request_id,
                    finish_reason=public_reason(out.finish_reason),
                    usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
                    error=out.error,
                )
                if out.text and not out.token_ids:
                    final = final.model_copy(update={"token": StreamToken(id=-1, text=out.text)})
                yield sse(final.model_dump_json(exclude_none=True))
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
