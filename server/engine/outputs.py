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
from server.engine.logprob import TokenLogprob
from server.engine.request import EngineRequest, FinishReason, Status
from server.engine.sampling import INVALID_TOKEN, RowSampler, SampleOutput
from server.engine.scheduler import Scheduler
from server.engine.stats import FinishedRecord, finished_record

log = logging.getLogger(__name__)

NON_FINITE_ERROR = "the model produced non-finite scores for this request (NaN or infinite logits)"
GRAMMAR_ERROR = "the sampled token does not continue the request's structured-output grammar"


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
    # Log-probabilities of the prompt tokens computed so far (``prompt_logprobs``; entry 0 is None), sent with the
    # request's first event; None once sent or when not asked for.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def take_prompt_logprobs(self) -> tuple[TokenLogprob | None, ...] | None:
        held, self.prompt_logprobs = self.prompt_logprobs, None
        return tuple(held) if held is not None else None


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

    def add_prompt_logprobs(self, request: EngineRequest, logprobs: Seq[TokenLogprob | None]) -> None:
        """Log-probabilities of the next prompt tokens (this step's chunk of the prompt)."""
        live = self._live[request.request_id]
        if live.prompt_logprobs is None:
            live.prompt_logprobs = []
        live.prompt_logprobs.extend(logprobs)

    def process(self, requests: Seq[EngineRequest], sampled: SampleOutput) -> None:
        """Append each request's sampled token (``INVALID_TOKEN``: the request fails, its neighbours go on)."""
        for request, token, logprob in zip(requests, sampled.tokens, sampled.logprobs, strict=True):
            live = self._live[request.request_id]
            if token == INVALID_TOKEN:
                self.finish(live, FinishReason.ERROR, error=NON_FINITE_ERROR)
            elif not live.sampler.record(token):
                self.finish(live, FinishReason.ERROR, error=GRAMMAR_ERROR)
            else:
                self._append_token(live, token, logprob)

    def finish_scored(self, requests: Iterable[EngineRequest]) -> None:
        """Requests that only scored their prompt (``max_new_tokens`` 0) end once the prompt is done."""
        for request in requests:
            self.finish(self._live[request.request_id], FinishReason.LENGTH)

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
        last_logprob: TokenLogprob | None = None,
    ) -> None:
        """End ``live``: free its row and pin, stream ``rest`` (default: the held-back text) and the final event."""
        request = live.request
        self.scheduler.finish(request, reason, error)
        delta = rest if rest is not None else live.unsent
        live.emitted, live.unsent = live.emitted + len(delta), ""
        # The client hears first: an observer that fails must not leave this request without its final event.
        logprob = (last_logprob,) if last_logprob is not None else ()
        live.handle.deliver(_final_event(request, last_token, delta, reason, error, logprob,
                                         live.take_prompt_logprobs()))  # fmt: skip
        self._live.pop(request.request_id, None)
        record = finished_record(request)
        for observe in self.on_finish:
            observe(record)

    def _append_token(self, live: LiveRequest, token: int, logprob: TokenLogprob | None) -> None:
        request = live.request
        if not request.output_ids:
            request.first_token_at = time.monotonic()
        request.output_ids.append(token)
        params = request.params
        # A stop token (end-of-sequence or one of stop_token_ids) ends the request and its text is not output.
        stop_token = token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)
        if stop_token and len(request.output_ids) > params.min_tokens:
            reason = FinishReason.STOP if token in params.stop_token_ids else FinishReason.EOS
            self.finish(live, reason, token, live.unsent + live.detokenizer.flush(), last_logprob=logprob)
            return
        # Only the new delta and the held-back tail are looked at: the cost of a token does not grow with the text.
        delta = live.detokenizer.add(token)
        live.unsent += delta
        stop_at = live.stop.feed(delta)  # index in the whole text; never before what was streamed (held back)
        if stop_at is not None and len(request.output_ids) >= params.min_tokens:
            self.finish(live, FinishReason.STOP, token, live.unsent[: stop_at - live.emitted], last_logprob=logprob)
        elif len(request.output_ids) >= params.max_new_tokens:
            self.finish(live, FinishReason.LENGTH, token, live.unsent + live.detokenizer.flush(), last_logprob=logprob)
        else:
            safe = len(live.unsent) - live.stop.holdback
            out, live.unsent = live.unsent[:safe], live.unsent[safe:]
            live.emitted += safe
            live.handle.deliver(RequestOutput(request.request_id, (token,), out,
                                              logprobs=(logprob,) if logprob is not None else (),
                                              prompt_logprobs=live.take_prompt_logprobs()))  # fmt: skip


def _final_event(
    request: EngineRequest,
    last_token: int | None,
    text: str,
    reason: FinishReason,
    error: str | None,
    logprobs: tuple[TokenLogprob, ...] = (),
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
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
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
