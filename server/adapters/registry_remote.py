"""Adapter files in an object store (``--adapter-store``), with this node's copies in ``data_dir/cache/`` as a cache.

Objects: ``<prefix>/adapters/<name>/<uid>/<file>``. The uid is the record's (a fresh uuid4 per accepted upload), so
a re-upload under a deleted adapter's name never mixes its files with the old ones, and a copy names exactly what it
holds. The registry database stays the commit point:

* add:    upload the validated files under the new uid -> commit the row. A failed upload deletes what it wrote; a
          failed commit deletes the uploaded objects (best effort: what a crash leaves is swept, below). The staged
          folder then becomes this node's copy (no download for the uploader).
* delete: commit the row's removal -> delete the objects and this node's copy (best effort, swept later).
* read:   ``fetch(record)``: ``cache/<uid>/`` when this node has it; else, under ``cache/.<uid>.lock`` (so two
          threads or processes of one node download it once), download into a staging folder, check the weights'
          sha256 and the total size against the record, fsync, and rename it to ``cache/<uid>``. A copy therefore
          exists only complete and verified, and a crash leaves at most a staging folder, which startup removes.
* sweep:  at startup, objects whose (name, uid) has no row and that are older than ``ORPHAN_GRACE_S`` are deleted
          (the leftovers of a crash between upload and commit, or of a delete that could not reach the store); the
          grace period keeps an upload in flight on another node, not committed yet, safe. Copies in ``cache/``
          whose uid has no row (deleted or replaced adapters) are removed at startup and after each download.

Bound: ``max_bytes`` (``--adapter-disk-cache-bytes``; default unbounded). After a download, the least recently used
copies go until the rest fits, except copies used in the last ``RECENT_USE_S`` (a reader may be about to open them):
the bound can be exceeded by what is in use. "Used" is the folder's mtime, refreshed by ``fetch`` (at most every
``_TOUCH_EVERY_S`` per process), so the node's processes share one view. An evicted copy is downloaded again.
"""

import errno
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from server.adapters.archive import WEIGHTS_FILE
from server.adapters.data_dir import fsync_dir
from server.adapters.object_store import OBJECTS_DIR, ObjectStore
from server.adapters.registry_db import RegistryDB
from server.adapters.registry_guards import file_sha256
from server.adapters.registry_records import AdapterExists, AdapterNotFound, AdapterRecord, StoreUnavailable
from server.adapters.registry_staging import Staging

_log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 3600.0  # an upload committed within this long of its objects' writing is never swept
RECENT_USE_S = 60.0  # a copy used this recently is never evicted: a reader may be between path() and open()
_TOUCH_EVERY_S = 10.0  # well below RECENT_USE_S, so a copy in use always looks recent
_UID = re.compile(r"[0-9a-f]{32}")
_LOCK = re.compile(r"\.([0-9a-f]{32})\.lock")


class RemoteAdapters:
    """The files side of a registry whose adapters live in ``store``; ``records()`` reads the registry's rows."""

    def __init__(
        self,
        store: ObjectStore,
        cache: Path,
        staging: Staging,
        records: Callable[[], dict[str, AdapterRecord]],
        max_bytes: int | None = None,
    ) -> None:
        self.store, self.cache, self._staging, self._records = store, cache, staging, records
        self.max_bytes = max_bytes  # of copies in cache/; None: unbounded
        self._touched: dict[str, float] = {}  # uid -> when this process last refreshed its copy's mtime (monotonic)
        cache.mkdir(exist_ok=True)

    @staticmethod
    def key(record: AdapterRecord, file: str = "") -> str:
        return f"{OBJECTS_DIR}/{record.name}/{record.uid}/{file}"

    # ---- add and delete -------------------------------------------------------------------------------------------
    def add(self, record: AdapterRecord, staged: Path, db: RegistryDB) -> AdapterRecord:
        """Upload the validated folder ``staged``, then commit ``record`` (see the module docstring)."""
        self.upload(record, staged)  # outside the write lock: an upload takes seconds, other writers go on
        try:
            with db.write() as tx:
                if tx.get(record.name) is not None:
                    raise AdapterExists(f"adapter {record.name!r} already exists; delete it first to replace it")
                tx.insert(record)
        except BaseException:
            self.remove(record)
            raise
        self.keep_copy(record, staged)
        return record

    def delete(self, name: str, db: RegistryDB) -> None:
        """Commit the removal of ``name``'s row, then remove its objects and this node's copy."""
        with db.write() as tx:
            record = tx.get(name)
            if record is None:  # deleted by another thread or process since the caller's check
                raise AdapterNotFound(f"adapter {name!r} not found")
            tx.delete(name)
        self.remove(record)  # committed: the objects are garbage now, removed here or by a later sweep

    def upload(self, record: AdapterRecord, folder: Path) -> None:
        """Put the files of ``folder`` under the record's uid; on failure, delete what was put and raise."""
        written: list[str] = []
        try:
            for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
                written.append(self.key(record, path.name))
                self.store.put_file(written[-1], path)
        except BaseException:
            self._delete(written, record)
            raise

    def keep_copy(self, record: AdapterRecord, staged: Path) -> None:
        """Make the uploader's staged (validated) folder this node's copy; best effort: a miss only costs a download."""
        try:
            os.rename(staged, self.cache / record.uid)
        except OSError as e:
            _log.info("adapter %r: keeping the uploaded files as this node's copy failed (%s)", record.name, e)

    def remove(self, record: AdapterRecord) -> None:
        """After a committed delete (or a failed add): the objects and this node's copy; failures are logged."""
        shutil.rmtree(self.cache / record.uid, ignore_errors=True)
        try:
            keys = [o.key for o in self.store.list_objects(self.key(record))]
        except StoreUnavailable as e:
            _log.warning("adapter %r: its objects stay in the store until a startup sweeps them (%s)", record.name, e)
            return
        self._delete(keys, record)

    def _delete(self, keys: list[str], record: AdapterRecord) -> None:
        if not keys:
            return
        try:
            self.store.delete(keys)
        except StoreUnavailable as e:
            _log.warning("adapter %r: %d object(s) stay in the store until a startup sweeps them (%s)",
                         record.name, len(keys), e)  # fmt: skip

    # ---- reading --------------------------------------------------------------------------------------------------
    def fetch(self, record: AdapterRecord) -> Path:
        """This node's complete, verified copy of ``record``'s files, downloaded when missing (StoreUnavailable when
        the store cannot serve them, or serves files that do not match the record: never a wrong copy)."""
        final = self.cache / record.uid
        if final.is_dir():
            self._touch(final, record.uid)
            return final
        with self._lock(record.uid):
            if final.is_dir():  # downloaded by another thread or process while this one waited
                return final
            with self._staging.operation("download") as work:
                folder = work / "adapter"
                folder.mkdir()
                self._download(record, folder)
                try:
                    os.rename(folder, final)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else placed meanwhile: the same verified files
                        raise
                fsync_dir(self.cache)
        self._touch(final, record.uid)
        self.prune(keep=record.uid)
        return final

    def _download(self, record: AdapterRecord, folder: Path) -> None:
        prefix = self.key(record)
        objects = self.store.list_objects(prefix)
        names = [o.key[len(prefix) :] for o in objects]
        if WEIGHTS_FILE not in names:
            raise StoreUnavailable(f"adapter {record.name!r}: its files are missing from {self.store.url} "
                                   f"({prefix}); delete it and upload it again")  # fmt: skip
        for name in names:
            if "/" in name or name.startswith("."):
                raise StoreUnavailable(f"adapter {record.name!r}: unexpected object {prefix}{name} in the store")
            self.store.get_file(prefix + name, folder / name)
        size = sum((folder / n).stat().st_size for n in names)
        sha = file_sha256(folder / WEIGHTS_FILE)
        if sha != record.sha256 or size != record.size_bytes:
            raise StoreUnavailable(
                f"adapter {record.name!r}: the files in {self.store.url} do not match its record (sha256 of "
                f"{WEIGHTS_FILE} {sha[:12]}..., recorded {record.sha256[:12]}...; {size} bytes, recorded "
                f"{record.size_bytes}): not served; delete it and upload it again"
            )
        for name in names:  # durable before the rename: a crash must never leave a complete-looking, empty copy
            with open(folder / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)

    @contextmanager
    def _lock(self, uid: str) -> Iterator[None]:
        # The lock file stays while the uid is registered (prune removes it after): unlinking it on release would
        # let a waiter lock an unlinked file while a newcomer locks a new one. If a prune races a download anyway,
        # the worst case is a second download of the same files; the rename keeps whichever copy lands first.
        fd = os.open(self.cache / f".{uid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- cleaning -------------------------------------------------------------------------------------------------
    def prune(self, keep: str | None = None) -> list[str]:
        """Remove copies (and lock files) of uids that are no longer registered, then, above ``max_bytes``, the least
        recently used copies other than ``keep``'s; the uids removed."""
        sizes = {r.uid: r.size_bytes for r in self._records().values()}
        removed = self._prune_unregistered(set(sizes))
        if self.max_bytes is not None:
            removed += self._evict(sizes, self.max_bytes, keep)
        return removed

    def _prune_unregistered(self, live: set[str]) -> list[str]:
        removed: list[str] = []
        for entry in self.cache.iterdir():
            lock = _LOCK.fullmatch(entry.name)
            uid = lock.group(1) if lock else entry.name if _UID.fullmatch(entry.name) else None
            if uid is None or uid in live:
                continue  # not ours (never touched), or a registered adapter's
            if lock:
                with suppress(FileNotFoundError):
                    entry.unlink()
            else:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(uid)
        return removed

    def _evict(self, sizes: dict[str, int], max_bytes: int, keep: str | None) -> list[str]:
        copies: list[tuple[float, str]] = []
        for entry in self.cache.iterdir():
            if entry.name in sizes:
                with suppress(FileNotFoundError):
                    copies.append((entry.stat().st_mtime, entry.name))
        total = sum(sizes[uid] for _, uid in copies)
        now, evicted = time.time(), []
        for used, uid in sorted(copies):
            if total <= max_bytes:
                break
            if uid == keep or now - used < RECENT_USE_S:  # maybe being read right now, here or in another process
                continue
            with self._staging.operation("evict") as work:  # out of cache/ at once, then removed
                with suppress(FileNotFoundError):
                    os.rename(self.cache / uid, work / "adapter")
            total -= sizes[uid]
            evicted.append(uid)
        if total > max_bytes:
            _log.info("the adapter cache holds %d bytes, above its bound of %d: the rest was used in the last %.0f s",
                      total, max_bytes, RECENT_USE_S)  # fmt: skip
        return evicted

    def _touch(self, folder: Path, uid: str) -> None:
        """Mark the copy as used (its mtime: shared with the node's other processes), at most every few seconds."""
        now = time.monotonic()
        if now - self._touched.get(uid, -RECENT_USE_S) >= _TOUCH_EVERY_S:
            self._touched[uid] = now
            with suppress(OSError):
                os.utime(folder)

    def sweep(self, grace_s: float | None = None) -> int:
        """Delete objects of uploads that have no row and are older than ``grace_s`` (default ``ORPHAN_GRACE_S``);
        how many were deleted."""
        grace_s = ORPHAN_GRACE_S if grace_s is None else grace_s
        live = {(r.name, r.uid) for r in self._records().values()}  # before listing: see the module docstring
        now = time.time()
        stale: list[str] = []
        for obj in self.store.list_objects(OBJECTS_DIR + "/"):
            parts = obj.key.split("/")
            if len(parts) != 4 or not _UID.fullmatch(parts[2]):
                continue  # not laid out by the registry: never touched
            if (parts[1], parts[2]) not in live and now - obj.modified > grace_s:
                stale.append(obj.key)
        if stale:
            _log.warning("deleting %d object(s) in %s of uploads that were never committed or were deleted",
                         len(stale), self.store.url)  # fmt: skip
            self.store.delete(stale)
        return len(stale)
