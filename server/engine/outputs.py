"""Output processing on the engine thread: each sampled token becomes text, stop checks and a stream event.

``OutputProcessor`` holds every request in flight (by id) with its post-processing state, and is the one place that
ends a request: the scheduler frees its row and pin, the client gets its final event, then the observers (metrics)
get its timings.
"""

import logging
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from server.engine.handle import RequestHandle, RequestOutput
from server.engine.request import EngineRequest, FinishReason, Status
from server.engine.sampling import INVALID_TOKEN, RowSampler
from server.engine.scheduler import Scheduler
from server.engine.stats import FinishedRecord, finished_record

log = logging.getLogger(__name__)

NON_FINITE_ERROR = "the model produced non-finite scores for this request (NaN or infinite logits)"


@dataclass(eq=False)
class LiveRequest:
    """A request in flight and its post-processing state, owned by the engine thread."""

    request: EngineRequest
    handle: RequestHandle
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    emitted: int = 0  # characters of text already streamed
    unsent: str = ""  # generated text not streamed yet: a possible start of a stop string (< the longest stop)


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, eos_ids: frozenset[int]) -> None:
        self.scheduler = scheduler
        self.eos_ids = eos_ids
        # Observers (the metrics exporter): called on the engine thread, so they must be quick.
        self.on_finish: list[Callable[[FinishedRecord], None]] = []
        self._live: dict[str, LiveRequest] = {}

    def add(self, live: LiveRequest) -> None:
        self._live[live.request.request_id] = live

    def samplers(self, requests: Iterable[EngineRequest]) -> list[RowSampler]:
        return [self._live[r.request_id].sampler for r in requests]

    def process(self, requests: Seq[EngineRequest], tokens: Seq[int]) -> None:
        """Append each request's sampled token (``INVALID_TOKEN``: the request fails, its neighbours go on)."""
        for request, token in zip(requests, tokens, strict=True):
            live = self._live[request.request_id]
            if token == INVALID_TOKEN:
                self.finish(live, FinishReason.ERROR, error=NON_FINITE_ERROR)
            else:
                self._append_token(live, token)

    def finish_aborted(self, requests: Iterable[EngineRequest]) -> None:
        """Give their final event to requests the scheduler already finished (cancelled, timed out, adapter failed)."""
        for request in requests:
            live = self._live.get(request.request_id)
            if live is not None:
                assert request.finish_reason is not None
                self.finish(live, request.finish_reason, error=request.error)

    def fail(self, requests: Iterable[EngineRequest], error: str) -> None:
        for request in requests:
            self.finish(self._live[request.request_id], FinishReason.ERROR, error=error)

    def fail_all(self, error: str) -> None:
        """Finish every request held with an error (after an unexpected failure in a step)."""
        for live in list(self._live.values()):  # every request here still waits for its final event
            request = live.request
            if request.finish_reason is None:
                self.finish(live, FinishReason.ERROR, error=error)
            else:  # the scheduler had finished it (cancelled, timed out) but the failure came before it was told
                self.finish(live, request.finish_reason, error=request.error)

    def abandon_all(self, waiting: Iterable[LiveRequest], error: str) -> None:
        """The engine stops for good: every request held, and ``waiting`` (never added), gets an error event.

        Touches no scheduler or detokenizer state: whatever failed may be broken."""
        held, self._live = [*waiting, *self._live.values()], {}
        for live in held:
            request = live.request
            request.status, request.finish_reason, request.error = Status.FINISHED, FinishReason.ERROR, error
            try:
                live.handle.deliver(_final_event(request, None, "", FinishReason.ERROR, error))
            except Exception:  # noqa: BLE001 - one broken handle must not keep the others waiting
                log.exception("could not fail request %s", request.request_id)

    def finish(
        self,
        live: LiveRequest,
        reason: FinishReason,
        last_token: int | None = None,
        rest: str | None = None,
        error: str | None = None,
    ) -> None:
        """End ``live``: free its row and pin, stream ``rest`` (default: the held-back text) and the final event."""
        request = live.request
        self.scheduler.finish(request, reason, error)
        delta = rest if rest is not None else live.unsent
        live.emitted, live.unsent = live.emitted + len(delta), ""
        # The client hears first: an observer that fails must not leave this request without its final event.
        live.handle.deliver(_final_event(request, last_token, delta, reason, error))
        self._live.pop(request.request_id, None)
        record = finished_record(request)
        for observe in self.on_finish:
            observe(record)

    def _append_token(self, live: LiveRequest, token: int) -> None:
        request = live.request
        if not request.output_ids:
            request.first_token_at = time.monotonic()
        request.output_ids.append(token)
        # Only the new delta and the held-back tail are looked at: the cost of a token does not grow with the text.
        delta = live.detokenizer.add(token)
        live.unsent += delta
        stop_at = live.stop.feed(delta)  # index in the whole text; never before what was streamed (held back)
        reason = self._finish_reason(request, token, stop_at)
        if reason is None:
            safe = len(live.unsent) - live.stop.holdback
            out, live.unsent = live.unsent[:safe], live.unsent[safe:]
            live.emitted += safe
            live.handle.deliver(RequestOutput(request.request_id, (token,), out))
        elif stop_at is not None:
            self.finish(live, reason, last_token=token, rest=live.unsent[: stop_at - live.emitted])
        else:
            self.finish(live, reason, last_token=token, rest=live.unsent + live.detokenizer.flush())

    def _finish_reason(self, request: EngineRequest, token: int, stop_at: int | None) -> FinishReason | None:
        if stop_at is not None:
            return FinishReason.STOP
        if token in self.eos_ids and not request.params.ignore_eos:
            return FinishReason.EOS
        if len(request.output_ids) >= request.params.max_new_tokens:
            return FinishReason.LENGTH
        return None


def _final_event(
    request: EngineRequest, last_token: int | None, text: str, reason: FinishReason, error: str | None
) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        (last_token,) if last_token is not None else (),
        text,
        finished=True,
        finish_reason=reason,
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(request.output_ids),
        error=error,
    )
