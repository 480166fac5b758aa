"""What a caller holds for one submitted request: its stream of outputs, and a way to cancel it."""

import asyncio
import queue
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

from server.engine.logprob import TokenLogprob
from server.engine.request import EngineRequest, FinishReason


@dataclass(frozen=True)
class RequestOutput:
    """One event of a request's stream: the token made this step and its text delta, or the final event."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens made since the previous event (one per step while decoding)
    text: str  # text delta since the previous event (may be "" while a character or stop string is incomplete)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # With ``SamplingParams.logprobs``: one entry per id in ``token_ids``, in order.
    logprobs: tuple[TokenLogprob, ...] = ()
    # With ``SamplingParams.prompt_logprobs``: on the first event only, one entry per prompt token (the first None).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class RequestResult:
    """A whole finished request, assembled from its stream."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None
    logprobs: list[TokenLogprob]  # one per token id when the request asked for them, else empty
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None


class RequestHandle:
    """Delivers a request's outputs to a synchronous reader or, when made with an event loop, to an async one.

    The engine thread calls ``deliver``; events cross to the event loop with ``call_soon_threadsafe``.
    """

    def __init__(self, request: EngineRequest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self._loop = loop
        self._async: asyncio.Queue[RequestOutput] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.Queue[RequestOutput] = queue.Queue()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def cancel(self) -> None:
        """Leave the batch at the next step; the KV row and adapter pin are released then."""
        self.request.cancelled = True

    def deliver(self, output: RequestOutput) -> None:
        """Hand ``output`` to the reader (engine thread); a closed event loop cancels the request."""
        if self._loop is None or self._async is None:
            self._sync.put(output)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, output)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel()

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            output = self._sync.get()
            yield output
            if output.finished:
                return

    async def __aiter__(self) -> AsyncGenerator[RequestOutput, None]:
        assert self._async is not None, "this handle was made without an event loop"
        try:
            while True:
                output = await self._async.get()
                yield output
                if output.finished:
                    return
        finally:
            if not self.request.finish_reason:
                self.cancel()  # the consumer stopped reading (client disconnected): free the row

    def result(self) -> RequestResult:
        """Block until the request finishes (synchronous handles only) and assemble the outputs."""
        return collect(list(self))


def collect(outputs: list[RequestOutput]) -> RequestResult:
    last = outputs[-1]
    assert last.finished and last.finish_reason is not None
    return RequestResult(
        request_id=last.request_id,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        error=last.error,
        logprobs=[lp for o in outputs for lp in o.logprobs],
        prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None),
    )
