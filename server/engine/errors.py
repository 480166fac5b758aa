"""What can go wrong with a request, as the engine's callers see it, and what the client hears when a step fails."""

import logging

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (too long, unknown adapter); the message is for the client."""


class UnknownAdapterError(RequestError):
    """The request names an adapter that is not registered."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine loop died after an internal error: this replica serves nothing more (the API answers 503)."""


class AcceleratorOutOfMemory(RuntimeError):
    """A step ran out of device memory; the runner released its cached blocks and the next step may run."""


def step_failure(exc: Exception, num_tokens: int) -> str:
    """The error message for every request of a step whose model run or sampling raised ``exc`` (logged here)."""
    if isinstance(exc, AcceleratorOutOfMemory):
        log.warning("out of accelerator memory in a step of %d tokens: failing its requests", num_tokens)
        return f"out of accelerator memory ({exc}); retry later or with a shorter request"
    log.exception("model step failed", exc_info=exc)
    return f"model error: {exc}"
