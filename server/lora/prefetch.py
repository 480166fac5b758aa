"""Reading adapters from disk on a worker thread, so the engine's step loop never waits on a disk read.

Every read held here is a second host copy of an adapter besides the slot cache's CPU tier, so the number held
(pending or finished, not yet taken) is bounded by ``capacity``, and the scheduler ``forget``s a read as soon as no
waiting request wants it any more: a pending read that is forgotten is cancelled when it has not started, and its
result is dropped when it completes (nothing keeps a reference to it).
"""

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Literal, TypeVar

W = TypeVar("W")

PrefetchState = Literal["absent", "pending", "ready", "failed"]


class AdapterPrefetcher(Generic[W]):
    """Background reads of validated host copies, handed over once to the slot cache; at most ``capacity`` held.

    It is also the slot cache's ``AdapterSource``: ``read`` takes a finished prefetch, or reads synchronously when
    nothing was prefetched (tests and tools that do not care about the critical path).
    """

    def __init__(self, read: Callable[[str], W], capacity: int, workers: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 so that a waiting adapter can be read, got {capacity}")
        self._read = read
        self._capacity = capacity
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-loader")
        self._futures: dict[str, Future[W]] = {}  # insertion order: the oldest request first
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """Reads held: pending, finished or failed, not yet taken or forgotten."""
        with self._lock:
            return len(self._futures)

    def request(self, name: str, urgent: bool = False) -> bool:
        """Start reading ``name`` unless a read is already held; False when none is held and none was started.

        At capacity nothing new starts, unless ``urgent`` (the oldest waiting request: it must never wait behind
        reads for younger requests that cannot run before it): then the oldest finished read of another adapter is
        dropped to make room (it is read again when its request comes up).
        """
        with self._lock:
            if name in self._futures:
                return True
            if len(self._futures) >= self._capacity:
                victim = next((n for n, f in self._futures.items() if f.done()), None) if urgent else None
                if victim is None:
                    return False
                del self._futures[victim]
            self._futures[name] = self._pool.submit(self._read, name)
            return True

    def state(self, name: str) -> PrefetchState:
        with self._lock:
            future = self._futures.get(name)
        if future is None:
            return "absent"
        if not future.done():
            return "pending"
        return "failed" if future.exception() is not None else "ready"

    def error(self, name: str) -> BaseException | None:
        """The failure of a finished read, forgetting it so that a later request retries the disk."""
        with self._lock:
            future = self._futures.get(name)
            if future is None or not future.done() or future.exception() is None:
                return None
            del self._futures[name]
        return future.exception()

    def forget(self, name: str) -> None:
        """Drop whatever is pending or held for ``name`` (nobody waits for it, or the adapter was deleted)."""
        with self._lock:
            future = self._futures.pop(name, None)
        if future is not None:
            future.cancel()  # a read that has not started never runs; a running one is dropped when it completes

    def read(self, name: str) -> W:
        """A finished prefetch of ``name`` (consumed), else a synchronous read."""
        with self._lock:
            future = self._futures.get(name)
            if future is not None and future.done():
                del self._futures[name]
            else:
                future = None
        return future.result() if future is not None else self._read(name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
