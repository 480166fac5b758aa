"""Submitting a generation to the engine from an async handler, shared by our API and the OpenAI-compatible one."""

import asyncio
from collections.abc import AsyncIterator, Sequence

from server.api.errors import ApiError
from server.engine.engine import QueueFullError, RequestError, UnknownAdapterError
from server.engine.handle import RequestHandle, RequestOutput, RequestResult, collect
from server.engine.request import FinishReason
from server.engine.sampling import SamplingParams
from server.service import Service

RETRY_AFTER_SECONDS = "1"


def sampling_params(**fields: object) -> SamplingParams:
    try:
        return SamplingParams(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


def tokenize(service: Service, prompt: str) -> list[int]:
    ids = service.tokenizer(prompt)["input_ids"]
    if not ids:
        raise ApiError(422, "invalid_request", "the prompt encodes to no tokens")
    return list(ids)


def submit(service: Service, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams) -> RequestHandle:
    """Queue the request; 404 for an unknown adapter, 400 for limits, 429 with Retry-After when the queue is full."""
    if adapter is not None and adapter not in service.registry:
        service.metrics.observe_rejected(None)
        raise ApiError(404, "not_found", f"adapter {adapter!r} is not registered")
    try:
        return service.engine.submit(prompt_ids, adapter, params, loop=asyncio.get_running_loop())
    except UnknownAdapterError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except RequestError as exc:
        service.metrics.observe_rejected(adapter)
        raise ApiError(400, "invalid_request", str(exc)) from None
    except QueueFullError as exc:
        service.metrics.observe_rejected(adapter)
        raise ApiError(429, "queue_full", str(exc), {"Retry-After": RETRY_AFTER_SECONDS}) from None


def raise_if_failed(output: RequestOutput) -> None:
    """A request the engine could not serve (its adapter failed to load, a model error) answers 503."""
    if output.finish_reason is FinishReason.ERROR:
        raise ApiError(503, "unavailable", output.error or "the request could not be served", {"Retry-After": "5"})


async def run_to_completion(handle: RequestHandle) -> RequestResult:
    outputs = [output async for output in handle]
    raise_if_failed(outputs[-1])
    return collect(outputs)


async def stream(handle: RequestHandle) -> AsyncIterator[RequestOutput]:
    """The handle's outputs, after waiting for the first one so a failure still answers with a status code
    (503) instead of a broken stream."""
    outputs = aiter(handle)
    first = await anext(outputs)
    raise_if_failed(first)

    async def chained() -> AsyncIterator[RequestOutput]:
        try:
            yield first
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()  # a client that went away cancels its request now, not at garbage collection

    return chained()


def public_reason(reason: FinishReason) -> str:
    """Our API's finish reasons: length | stop | eos (a cancelled request has no client left to read it)."""
    return reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP, FinishReason.EOS) else "stop"
