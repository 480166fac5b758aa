"""Submitting a generation to the engine from an async handler, shared by our API and the OpenAI-compatible one."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import ParamSpec, TypeVar

from fastapi import Request

from server.api.errors import ApiError, ClientDisconnected
from server.api.schemas import FinishReasonName, StreamFinishReason
from server.engine.errors import EngineStoppedError, QueueFullError, RequestError, UnknownAdapterError
from server.engine.handle import RequestHandle, RequestOutput, RequestResult, collect
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.service import Service

RETRY_AFTER_SECONDS = "1"
T = TypeVar("T")
P = ParamSpec("P")


def _invalid_as_422(make: Callable[P, T]) -> Callable[P, T]:
    """``make`` (same arguments), answering 422 with its message when it refuses a value with ValueError."""

    def checked(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return make(*args, **kwargs)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None

    return checked


sampling_params = _invalid_as_422(SamplingParams)


def submit(service: Service, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams) -> RequestHandle:
    """Queue the request; 404 for an unknown adapter, 400 for limits, 429 with Retry-After when the queue is full."""
    if adapter is not None and adapter not in service.registry:
        service.metrics.observe_rejected_unknown()
        raise ApiError(404, "not_found", f"adapter {adapter!r} is not registered")
    try:
        return service.engine.submit(prompt_ids, adapter, params, loop=asyncio.get_running_loop())
    except UnknownAdapterError as exc:  # deleted between the registry check and the engine's
        service.metrics.observe_rejected_unknown()
        raise ApiError(404, "not_found", str(exc)) from None
    except RequestError as exc:
        service.metrics.observe_rejected(adapter)
        raise ApiError(400, "invalid_request", str(exc)) from None
    except QueueFullError as exc:
        service.metrics.observe_rejected(adapter)
        raise ApiError(429, "queue_full", str(exc), {"Retry-After": RETRY_AFTER_SECONDS}) from None
    except EngineStoppedError as exc:  # the engine loop died: this replica serves nothing until it is restarted
        raise ApiError(503, "unavailable", str(exc)) from None


def raise_if_failed(output: RequestOutput) -> None:
    """A request the engine could not serve (its adapter failed to load, a model error, out of accelerator memory)
    answers 503; one that ran out of time answers 504."""
    if output.finish_reason is FinishReason.ERROR:
        raise ApiError(503, "unavailable", output.error or "the request could not be served", {"Retry-After": "5"})
    if output.finish_reason is FinishReason.TIMEOUT:
        raise ApiError(504, "timeout", output.error or "the request did not finish in time")
    if output.finish_reason is FinishReason.ADAPTER_DELETED:
        raise ApiError(404, "not_found", output.error or "the adapter was deleted")


async def run_to_completion(handle: RequestHandle, request: Request) -> RequestResult:
    """Wait for the whole answer; a client that disconnects first cancels the request (its row and adapter pin are
    freed at the next step) instead of leaving it to run for nobody."""

    async def gather() -> list[RequestOutput]:
        return [output async for output in handle]

    outputs = await _unless_disconnected(gather(), handle, request)
    raise_if_failed(outputs[-1])
    return collect(outputs)


async def _unless_disconnected(work: Awaitable[T], handle: RequestHandle, request: Request) -> T:
    """``work``'s result, unless the client goes away first (or this handler is cancelled, e.g. at shutdown): then
    the request is cancelled, so it leaves the queue or its row at the next step, and ClientDisconnected is raised."""
    waiting = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            handle.cancel()
            waiting.cancel()
    if waiting not in done:
        raise ClientDisconnected
    return waiting.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def stream(handle: RequestHandle, request: Request) -> AsyncIterator[RequestOutput]:
    """The handle's outputs, after waiting for the first one so a failure still answers with a status code
    (503) instead of a broken stream. The wait can be long (the request may be queued behind a full batch) and no
    response exists yet to notice a disconnect, so the client is watched here: one that goes away cancels the
    request, which leaves the queue (or its row) at the next step instead of being prefilled for nobody."""
    outputs = aiter(handle)
    first = await _unless_disconnected(anext(outputs), handle, request)
    raise_if_failed(first)

    async def chained() -> AsyncIterator[RequestOutput]:
        try:
            yield first
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()  # a client that went away cancels its request now, not at garbage collection

    return chained()


# Our API's finish reasons: length | stop | eos, and timeout | error for a stream that had to end early (a
# cancelled request has no client left to read it).
_COMPLETED_REASONS: dict[FinishReason, FinishReasonName] = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "eos",
    FinishReason.CANCELLED: "stop",
}
_PUBLIC_REASONS: dict[FinishReason, StreamFinishReason] = {
    **_COMPLETED_REASONS,
    FinishReason.TIMEOUT: "timeout",
    FinishReason.ERROR: "error",
    FinishReason.ADAPTER_DELETED: "error",
}


def public_reason(reason: FinishReason) -> StreamFinishReason:
    """A finish reason as a stream's last event says it."""
    return _PUBLIC_REASONS[reason]


def completed_reason(reason: FinishReason) -> FinishReasonName:
    """The finish reason of a request that ``run_to_completion`` returned (it raised for the ones that failed)."""
    return _COMPLETED_REASONS[reason]
