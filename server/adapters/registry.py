"""The adapter registry: name -> ``AdapterRecord``, persisted under ``data_dir``; the source of truth of /v1/adapters.
Several server processes (e.g. Ray Serve replicas) may share one data directory, on one host or on a network
filesystem with POSIX locks: each sees what any of them committed at its next read.

Layout (the folder is claimed first: ``data_dir.claim_data_dir`` refuses a non-empty folder that is not the server's)::

    data_dir/.lora-server        {"format": "lora-server data directory", "version": 2}: the folder is the server's
    data_dir/registry.db         SQLite, one row per adapter: what is registered (the commit point; registry_db.py)
    data_dir/adapters/<name>/    adapter_config.json, adapter_model.safetensors (and README.md when one came along)
    data_dir/staging/            one folder per upload or delete in progress, each under its process's flock

Crash consistency: a change is committed when its database transaction commits. A folder the registry puts into or
takes out of ``adapters/`` carries a mark (``registry_staging.PENDING_FILE``, the record's uid) until the commit is
done, so a crash leaves only marked folders without a row, which startup removes; a folder without the mark and
without a row is not the server's (copied in by hand, or left by a version before the marker): kept and reported.

* add:    stream into staging/upload-<uuid>/adapter, fsync the files -> validate (outside any lock) -> mark the folder
          -> in one write transaction: check the name, insert the row, rename the folder to adapters/<name>, fsync
          adapters/ -> commit (the API answers 201) -> drop the mark. A failed rename rolls back; a failed commit
          (a full disk: StorageFull) moves the folder back. Once this returns, the adapter survives any restart.
* delete: in one write transaction: mark adapters/<name>, delete the row -> commit (from now on every process reads
          "not found": 404, never a registered name over a folder that is gone) -> rename the folder into staging and
          remove it. A failed mark or commit (StorageFull) rolls back and drops the mark: nothing changed.
* startup: ``registry_startup.open_data_dir``: claim, import a layout-1 index.json, recover under the write lock.

With an object store (``--adapter-store``) the files live in the store and ``data_dir/cache/<uid>/`` holds this
node's copies; the database may be elsewhere (``--registry-db``), shared by several nodes. Add, delete and reading
then follow registry_remote.py (upload before the commit, remove after it, download and verify on a miss).

Torch-free: validating an adapter folder is the injected ``validate`` callable's job (the checkpoint reader).
"""

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from server.adapters.archive import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    UploadLimits,
    extract_adapter_archive,
    kept_limit,
    receive_file,
)
from server.adapters.data_dir import ADAPTERS_DIR, CACHE_DIR, DB_FILE, STAGING_DIR, fsync_dir
from server.adapters.errors import AdapterFormatError
from server.adapters.object_store import ObjectStore
from server.adapters.registry_guards import file_sha256, storage_full, upload_errors
from server.adapters.registry_records import (
    NAME_PATTERN,
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    AdapterSummary,
    BadArchive,
    InvalidAdapterName,
    RegistryError,
    Source,
    StorageFull,
    StoreUnavailable,
    UploadTooLarge,
    check_name,
)
from server.adapters.registry_remote import RemoteAdapters
from server.adapters.registry_staging import Staging, clear_pending, mark_pending, pending_uid
from server.adapters.registry_startup import open_data_dir

__all__ = [
    "NAME_PATTERN",
    "AdapterExists",
    "AdapterNotFound",
    "AdapterRecord",
    "AdapterRegistry",
    "AdapterSummary",
    "BadArchive",
    "InvalidAdapterName",
    "RegistryError",
    "StorageFull",
    "StoreUnavailable",
    "UploadLimits",
    "UploadTooLarge",
    "check_name",
]

_log = logging.getLogger(__name__)

DEFAULT_LIMITS = UploadLimits()


class AdapterRegistry:
    """Registered adapters by name, stored under ``data_dir`` (layout and crash-consistency order: module docstring).

    ``validate(folder)`` reads and checks a PEFT folder and returns its AdapterSummary, or raises AdapterError,
    which propagates unchanged. Every ``add_*`` leaves nothing behind when it fails. Thread-safe, and safe with other
    processes on the same ``data_dir``.

    With ``store`` (``--adapter-store``) the files live in the object store and ``data_dir/cache/`` holds this node's
    copies (registry_remote.py); ``registry_db`` (default ``data_dir/registry.db``) may then be shared by several
    nodes while each has a ``data_dir`` of its own.
    """

    def __init__(
        self,
        data_dir: Path,
        validate: Callable[[Path], AdapterSummary],
        limits: UploadLimits = DEFAULT_LIMITS,
        store: ObjectStore | None = None,
        registry_db: Path | None = None,
        disk_cache_bytes: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.limits = limits
        self._validate = validate
        self._adapters = self.data_dir / ADAPTERS_DIR
        self._staging = Staging(self.data_dir / STAGING_DIR)
        db_path = Path(registry_db) if registry_db is not None else self.data_dir / DB_FILE
        self._db = open_data_dir(self.data_dir, self._staging, db_path, store)
        self._remote: RemoteAdapters | None = None
        if store is not None:
            cache = self.data_dir / CACHE_DIR
            self._remote = RemoteAdapters(store, cache, self._staging, self._db.records, disk_cache_bytes)
            for uid in self._remote.prune():
                _log.info("removed this node's copy of %s: no longer registered, or over its disk bound", uid)
            try:
                self._remote.sweep()
            except StoreUnavailable as e:  # checked reachable a moment ago; sweeping can wait for the next start
                _log.warning("could not sweep the adapter store: %s", e)

    # ---- adding ---------------------------------------------------------------------------------------------------
    def add_files(self, name: str, config: BinaryIO, weights: BinaryIO, source: Source = "upload") -> AdapterRecord:
        """Register the two PEFT files streamed from ``config`` and ``weights`` under ``name``."""
        self._check_new(name)
        with upload_errors(), self._new_staging() as folder:
            receive_file(config, folder / CONFIG_FILE, self.limits.max_config_bytes, CONFIG_FILE)
            receive_file(weights, folder / WEIGHTS_FILE, self.limits.max_file_bytes, WEIGHTS_FILE)
            return self._commit(name, folder, source)

    def add_archive(self, name: str, archive: BinaryIO, source: Source = "upload") -> AdapterRecord:
        """Register the PEFT folder inside a .zip or .tar.gz (see ``archive.extract_adapter_archive``)."""
        self._check_new(name)
        with upload_errors(), self._new_staging() as folder:
            extract_adapter_archive(archive, folder.parent / "unpacked", folder, self.limits)
            return self._commit(name, folder, source)

    def add_folder(self, name: str, folder: Path, source: Source = "startup") -> AdapterRecord:
        """Register a copy of the local PEFT folder ``folder`` (symlinks followed: it is trusted, e.g. an HF cache
        snapshot). Raises AdapterExists when ``name`` is taken: at boot, check ``name in registry`` first."""
        self._check_new(name)
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterFormatError(f"adapter folder {str(folder)!r} does not exist")
        with upload_errors(), self._new_staging() as staged:
            for entry in sorted(folder.iterdir()):
                limit = kept_limit(entry.name, self.limits)
                if limit is not None and entry.is_file():
                    with entry.open("rb") as src:
                        receive_file(src, staged / entry.name, limit, entry.name)
            return self._commit(name, staged, source)

    # ---- reading (each reflects every process's last commit: registry_db.RegistryDB.records) ----------------------
    def get(self, name: str) -> AdapterRecord:
        """The record of ``name``; AdapterNotFound when it is not registered (invalid names included)."""
        try:
            return self._db.records()[name]
        except (KeyError, TypeError):
            raise AdapterNotFound(f"adapter {name!r} not found") from None

    @property
    def has_store(self) -> bool:
        """Whether adapters live in an object store, so that ``path`` may download (slow: call it off the loop)."""
        return self._remote is not None

    def path(self, name: str) -> Path:
        """Folder of registered adapter ``name``; AdapterNotFound (a KeyError) otherwise. With a store, this node's
        copy, downloaded first when it has none (StoreUnavailable when that fails)."""
        record = self.get(name)
        if self._remote is None:
            return self._adapters / record.name
        try:
            return self._remote.fetch(record)
        except StoreUnavailable:
            self.get(name)  # deleted while it downloaded (its objects went first): AdapterNotFound, a 404 not a 503
            raise

    def list(self) -> list[AdapterRecord]:
        """All records, sorted by name."""
        records = self._db.records()
        return [records[n] for n in sorted(records)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._db.records()

    def __len__(self) -> int:
        return len(self._db.records())

    # ---- deleting -------------------------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Unregister ``name`` and remove its files; AdapterNotFound when it is not registered, StorageFull (and
        nothing changed) when the disk is too full to mark the folder or commit."""
        self.get(name)  # early: an unknown name costs no staging folder
        if self._remote is not None:
            with storage_full("nothing was deleted"):
                self._remote.delete(name, self._db)
            return
        folder = self._adapters / name
        with storage_full("nothing was deleted"), self._staging.operation("deleted") as trash:
            marked = False
            try:
                with self._db.write() as tx:
                    record = tx.get(name)
                    if record is None:  # deleted by another thread or process since the early check
                        raise AdapterNotFound(f"adapter {name!r} not found")
                    if folder.is_dir() and not folder.is_symlink():
                        marked = True
                        mark_pending(folder, record.uid)
                    tx.delete(name)
            except BaseException:
                if marked:
                    clear_pending(folder)
                raise
            # Committed: every process now reads "not found". The folder is marked, so if what follows is cut
            # short, the next startup removes it.
            if marked:
                try:
                    os.rename(folder, trash / "adapter")
                except OSError:
                    _log.exception("adapter %r: its folder could not be moved out; removing it in place", name)
                    shutil.rmtree(folder, ignore_errors=True)

    # ---- internals ------------------------------------------------------------------------------------------------
    def _check_new(self, name: str) -> None:
        check_name(name)
        if name in self:  # early, so a duplicate costs no upload; _commit checks again under the write lock
            raise AdapterExists(f"adapter {name!r} already exists; delete it first to replace it")
        self._check_not_in_the_way(self._adapters / name)

    def _check_not_in_the_way(self, final: Path) -> None:
        if pending_uid(final) is not None:  # an add or delete of that name in flight, maybe in another process
            raise AdapterExists(
                f"adapter {final.name!r} is being added or deleted right now (or was, when a server stopped: its next "
                "start finishes that); try again"
            )
        if final.exists() or final.is_symlink():  # not the server's (see the module docstring): never replaced
            raise AdapterExists(
                f"the data directory holds a folder {str(final)!r} that is not a registered adapter (copied in by hand "
                "or left by an older version); the server does not delete it: move it away, then upload again"
            )

    @contextmanager
    def _new_staging(self) -> Iterator[Path]:
        """A fresh, empty staging folder (``staging/upload-<uuid>/adapter``) under this process's lock; removed on
        exit, whatever happened."""
        with self._staging.operation("upload") as work:
            (work / "adapter").mkdir()
            yield work / "adapter"

    def _commit(self, name: str, staged: Path, source: Source) -> AdapterRecord:
        fsync_dir(staged)
        summary = self._validate(staged)
        files = [p for p in staged.iterdir() if p.is_file()]
        record = AdapterRecord(
            name=name,
            rank=summary.rank,
            alpha=summary.alpha,
            target_modules=summary.target_modules,
            size_bytes=sum(p.stat().st_size for p in files),
            sha256=file_sha256(staged / WEIGHTS_FILE),
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            source=source,
            uid=uuid.uuid4().hex,
        )
        if self._remote is not None:
            return self._remote.add(record, staged, self._db)
        mark_pending(staged, record.uid)
        final = self._adapters / name
        moved = False
        try:
            with self._db.write() as tx:
                if tx.get(name) is not None:
                    raise AdapterExists(f"adapter {name!r} already exists; delete it first to replace it")
                self._check_not_in_the_way(final)
                tx.insert(record)
                os.rename(staged, final)
                moved = True
                fsync_dir(self._adapters)
        except BaseException:
            if moved:  # rolled back: the folder must not stay in adapters/
                self._undo_rename(final, staged, name)
            raise
        clear_pending(final)
        return record

    def _undo_rename(self, final: Path, staged: Path, name: str) -> None:
        try:
            os.rename(final, staged)
        except OSError:  # it is marked and has no row: removed here, or by the next startup if this fails too
            _log.exception("adapter %r: the folder could not be moved back after a failed commit; removing it", name)
            shutil.rmtree(final, ignore_errors=True)
