"""Copies of adapters that another process deleted or replaced: found by the registry's ``uid`` and dropped.

Several server processes may share one registry (Ray Serve replicas, or nodes pointed at one ``--registry-db`` or
one data directory). A delete through one of them drops that process's copies at once (``Service.delete_adapter``);
every other process holds its copies (slot, CPU tier, prefix-cache blocks) until it notices. It notices here:
before queueing a request, each adapter the request names is checked against the registry, and a copy made under
another uid is dropped first, so no request is ever answered with weights that are no longer registered.
"""

import logging
import threading
from collections.abc import Callable, Iterable

from server.adapters.registry import AdapterNotFound, AdapterRecord

log = logging.getLogger(__name__)


class StaleCopies:
    """Remembers, per adapter name, the uid this process may hold copies of; ``check`` drops copies of an older uid
    (``forget(name)``: the engine's ``forget_adapter``). Thread-safe; a check costs one registry read per name."""

    def __init__(self, get: Callable[[str], AdapterRecord], forget: Callable[[str], None]) -> None:
        self._get = get
        self._forget = forget
        self._uids: dict[str, str] = {}  # adapter -> the uid seen at its last check
        self._lock = threading.Lock()

    def check(self, names: Iterable[str]) -> None:
        """Drop this process's copies of each of ``names`` that was deleted, or replaced under the same name, since
        it was last checked. Call before queueing a request that uses them."""
        for name in names:
            try:
                uid: str | None = self._get(name).uid
            except AdapterNotFound:
                uid = None
            with self._lock:
                seen = self._uids.get(name)
                if uid is None:
                    self._uids.pop(name, None)
                else:
                    self._uids[name] = uid
            if seen is not None and seen != uid:
                log.info("adapter %r was %s by another process sharing the registry: dropping this one's copy",
                         name, "deleted" if uid is None else "replaced")  # fmt: skip
                self._forget(name)

    def check_all(self) -> None:
        """``check`` every adapter checked before (a periodic sweep, so copies of deleted adapters free their memory
        even when no request names them again)."""
        with self._lock:
            names = list(self._uids)
        self.check(names)
