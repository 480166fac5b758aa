"""The engine thread: new requests handed over from any thread, the wait for work, the steps, and the watchdog.

Failures, from the smallest blast radius: a model or sampling error fails that step's batch (``Engine.step``); any
other exception in a step fails every request in flight and the loop goes on; ``MAX_FAILED_STEPS`` failing steps in
a row, or an exception while failing them, stop the engine for good (the watchdog in ``_run``): every request still
held gets an error, ``running`` turns false (``/ready`` answers 503) and ``put`` raises ``EngineStoppedError``.
"""

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from server.engine.errors import EngineStoppedError, QueueFullError

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # steps in a row failing outside the model: the engine itself is broken, not one batch

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Steps(Protocol[T_contra]):
    """What the loop drives: the engine, seen from its thread."""

    def step(self) -> int:
        """One iteration; the number of tokens processed (0 when idle)."""

    def busy(self) -> bool:
        """Requests already taken from the inbox are waiting or running."""

    def fail_all(self, error: str) -> None:
        """Finish every request held (and in the inbox) with ``error``."""

    def abandon_all(self, inbox: Iterable[T_contra], error: str) -> None:
        """The engine stops for good: give every request held and in ``inbox`` its error, touching nothing else."""


class EngineLoop(Generic[T]):
    """Owns the engine thread and its inbox (requests submitted, not yet taken by a step)."""

    def __init__(self, engine: Steps[T]) -> None:
        self._engine = engine
        self._inbox: list[T] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None  # why the loop died; set once, under _wake

    # ---- any thread ----------------------------------------------------------------------------------------------
    def put(self, items: Sequence[T], waiting: int, max_queue: int) -> None:
        """Hand ``items`` to the engine thread, all or none; ``waiting``: requests the scheduler already queues."""
        with self._wake:
            if self._dead is not None:
                raise EngineStoppedError(self._dead)
            if len(self._inbox) + waiting + len(items) > max_queue:
                raise QueueFullError(f"the queue holds {max_queue} waiting requests; retry later")
            self._inbox.extend(items)
            self._wake.notify()

    def queued(self) -> int:
        """Requests in the inbox."""
        with self._wake:
            return len(self._inbox)

    def has_work(self) -> bool:
        with self._wake:
            return bool(self._inbox) or self._engine.busy()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        """The loop is serving: started, alive and not stopped by the watchdog."""
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def stopped_reason(self) -> str | None:
        """Why the watchdog stopped the engine, or None while it has not."""
        return self._dead

    # ---- the engine thread ---------------------------------------------------------------------------------------
    def take(self) -> list[T]:
        """Empty the inbox."""
        with self._wake:
            new, self._inbox = self._inbox, []
        return new

    def _run(self) -> None:
        """The loop, under the watchdog: whatever ends it other than ``shutdown``, nobody is left waiting."""
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the last line of defence of every waiting client
            log.critical("the engine loop died; failing every request and refusing new ones", exc_info=True)
            self._stop_for_good(f"the engine stopped after an internal error ({type(exc).__name__}: {exc})")

    def _loop(self) -> None:
        failed_steps = 0
        while self._wait_for_work():
            try:
                idle = self._engine.step() == 0
                failed_steps = 0
            except Exception as exc:  # noqa: BLE001 - the loop survives one failure; the requests in flight cannot
                failed_steps += 1
                if failed_steps >= MAX_FAILED_STEPS:
                    raise  # the same failure again and again: the engine is broken, let the watchdog stop it
                log.exception("engine step failed")
                self._engine.fail_all(f"engine error: {exc}")
                continue
            if idle and self._engine.busy():
                time.sleep(0.001)  # everything waits on an adapter read: do not spin

    def _wait_for_work(self) -> bool:
        """Block until there is work; False once ``shutdown`` was called."""
        with self._wake:
            while not self._stopping and not self._inbox and not self._engine.busy():
                self._wake.wait()
            return not self._stopping

    def _stop_for_good(self, error: str) -> None:
        """Refuse new requests, then give every request still held its final event, an error (the API's 503)."""
        with self._wake:
            self._dead = error
            inbox, self._inbox = self._inbox, []
        self._engine.abandon_all(inbox, error)
