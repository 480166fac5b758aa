"""Submitting a generation to the engine from an async handler, shared by our API and the OpenAI-compatible one."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import ParamSpec, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.adapters.mixture_keys import part_names
from server.adapters.registry import AdapterNotFound
from server.api.adapter_fields import unregistered
from server.api.errors import ApiError, ClientDisconnected
from server.api.schemas import FinishReasonName, StreamFinishReason
from server.engine.errors import EngineStoppedError, QueueFullError, RequestError, UnknownAdapterError
from server.engine.handle import RequestHandle, RequestOutput, RequestResult, collect
from server.engine.request import FinishReason
from server.engine.sampling_params import SamplingParams
from server.engine.structured_output import CompiledGrammar
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


def submit(
    service: Service,
    prompt_ids: Sequence[int],
    adapter: str | None,
    params: SamplingParams,
    grammar: CompiledGrammar | None = None,
) -> RequestHandle:
    """Queue the request; 404 for an unknown adapter (or mixture part), 400 for limits, 429 with Retry-After when
    the queue is full."""
    [handle] = submit_group(service, prompt_ids, adapter, [params], grammar)
    return handle


async def prepare_adapter(service: Service, adapter: str | None) -> None:
    """Before a request is queued, on a worker thread: drop this process's copies of the adapter (each mixture part)
    if another process sharing the registry deleted or replaced it (``StaleCopies``), and with an object store
    (``--adapter-store``) download the files of a part this node holds no copy of, so ``submit``, which runs on the
    event loop, never waits on the network. Unregistered names are left to ``submit``'s 404; a failed download
    answers 503 (StoreUnavailable)."""
    if adapter is None:
        return
    await run_in_threadpool(_prepare, service, part_names(adapter))


def _prepare(service: Service, names: list[str]) -> None:
    service.stale_copies.check(names)
    if service.registry.has_store:
        for name in names:
            try:
                service.registry.path(name)
            except AdapterNotFound:
                return


def submit_group(
    service: Service,
    prompt_ids: Sequence[int],
    adapter: str | None,
    params: Sequence[SamplingParams],
    grammar: CompiledGrammar | None = None,
) -> list[RequestHandle]:
    """Queue one sequence per ``params`` on one prompt (OpenAI's ``n``; the engine prefills the prompt once), with
    ``submit``'s answers for what cannot be queued: all the group's sequences are queued, or none."""
    missing = unregistered(service, adapter)
    if missing is not None:
        service.metrics.observe_rejected_unknown()
        where = "" if missing == adapter else " (in the mixture)"
        raise ApiError(404, "not_found", f"adapter {missing!r}{where} is not registered")
    try:
        return service.engine.submit_group(prompt_ids, adapter, params, loop=asyncio.get_running_loop(),
                                           grammar=grammar)  # fmt: skip
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


def submit_groups(
    service: Service,
    groups: Sequence[tuple[Sequence[int], Sequence[SamplingParams]]],
    adapter: str | None,
    grammar: CompiledGrammar | None = None,
) -> list[RequestHandle]:
    """Queue several prompts' groups together (a batched completions request), in order, so they run concurrently;
    a group that cannot be queued cancels the ones queued before it and answers its error."""
    handles: list[RequestHandle] = []
    try:
        for prompt_ids, params in groups:
            handles += submit_group(service, prompt_ids, adapter, params, grammar)
    except ApiError:
        cancel(handles)
        raise
    return handles


def cancel(handles: Iterable[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


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
    [result] = await run_all([handle], request)
    return result


async def run_all(handles: Sequence[RequestHandle], request: Request) -> list[RequestResult]:
    """``run_to_completion`` for every handle of one client request, together: the first one that fails cancels
    the others and answers its error; a client that disconnects cancels them all."""

    async def one(handle: RequestHandle) -> RequestResult:
        outputs = [output async for output in handle]
        raise_if_failed(outputs[-1])
        return collect(outputs)

    async def every() -> list[RequestResult]:
        tasks = [asyncio.ensure_future(one(handle)) for handle in handles]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # after a failure: the others stop reading, and a handle whose reader stops cancels its request
            for task in tasks:
                task.cancel()

    return await _unless_disconnected(every(), handles, request)


async def _unless_disconnected(work: Awaitable[T], handles: Sequence[RequestHandle], request: Request) -> T:
    """``work``'s result, unless the client goes away first (or this handler is cancelled, e.g. at shutdown): then
    every handle's request is cancelled, so it leaves the queue or its row at the next step, and ClientDisconnected
    is raised."""
    waiting = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            cancel(handles)
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
    """``stream_all`` for one handle, without the index."""
    outputs = await stream_all([handle], request)

    async def plain() -> AsyncIterator[RequestOutput]:
        try:
            async for _, output in outputs:
                yield output
        finally:
            await outputs.aclose()

    return plain()


async def stream_all(
    handles: Sequence[RequestHandle], request: Request
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """The handles' outputs as (handle index, output), interleaved as they come, after waiting for each handle's
    first output so a failure still answers with a status code (503) instead of a broken stream. The wait can be
    long (the requests may be queued behind a full batch) and no response exists yet to notice a disconnect, so the
    client is watched here: one that goes away cancels every request, which leaves the queue (or its row) at the
    next step instead of being prefilled for nobody. Closing the returned generator (a client gone while streaming)
    cancels every request still running."""
    iterators = [aiter(handle) for handle in handles]

    async def firsts() -> list[RequestOutput]:
        return list(await asyncio.gather(*(anext(it) for it in iterators)))

    first = await _unless_disconnected(firsts(), handles, request)
    try:
        for output in first:
            raise_if_failed(output)
    except ApiError:
        cancel(handles)
        for iterator in iterators:
            await iterator.aclose()
        raise
    return _interleaved(iterators, first)


async def _interleaved(
    iterators: list[AsyncGenerator[RequestOutput, None]], first: list[RequestOutput]
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Each iterator's first output (in order), then all their outputs as they come."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            if not first[index].finished:
                async for output in iterators[index]:
                    await queue.put((index, output))
        finally:
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(iterators))]
    try:
        for index, output in enumerate(first):
            yield index, output
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in pumps:  # a handle whose reader stops cancels its request (RequestHandle.__aiter__)
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for iterator in iterators:  # the ones no pump read (finished at their first output)
            await iterator.aclose()


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
