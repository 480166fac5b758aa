"""Reading adapters from disk on a worker thread, so the engine's step loop never waits on a disk read."""

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Literal, TypeVar

W = TypeVar("W")

PrefetchState = Literal["absent", "pending", "ready", "failed"]


class AdapterPrefetcher(Generic[W]):
    """Background reads of validated host copies, handed over once to the slot cache.

    It is also the slot cache's ``AdapterSource``: ``read`` takes a finished prefetch, or reads synchronously when
    nothing was prefetched (tests and tools that do not care about the critical path).
    """

    def __init__(self, read: Callable[[str], W], workers: int = 1) -> None:
        self._read = read
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-loader")
        self._futures: dict[str, Future[W]] = {}
        self._lock = threading.Lock()

    def request(self, name: str) -> None:
        """Start reading ``name`` unless a read is already pending or finished."""
        with self._lock:
            if name not in self._futures:
                self._futures[name] = self._pool.submit(self._read, name)

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
        """Drop whatever is pending or held for ``name`` (the adapter was deleted or replaced)."""
        with self._lock:
            self._futures.pop(name, None)

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
