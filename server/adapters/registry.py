"""The adapter registry: name -> ``AdapterRecord``, persisted under ``data_dir``; the source of truth of /v1/adapters.

Layout (the folder is claimed first: ``data_dir.claim_data_dir`` refuses a non-empty folder that is not the server's)::

    data_dir/.lora-server        {"format": "lora-server data directory", "version": 1}: the folder is the server's
    data_dir/index.json          {"version": 1, "adapters": {name: record}}: what is registered (the commit point)
    data_dir/adapters/<name>/    adapter_config.json, adapter_model.safetensors (and README.md when one came along)
    data_dir/staging/            uploads in progress and folders being deleted; emptied at startup

Crash consistency: index.json is replaced atomically, and the server never leaves a folder in adapters/ that the
index does not name, so startup never has to remove anything there: a folder it finds unindexed is not the server's
(copied in by hand, or left by a version before the marker), and it is kept and reported, never deleted.

* add:    stream into staging/<tmp>/adapter, fsync the files -> validate (outside the lock) -> under the lock: replace
          index.json with the name added (the commit point: temp file, fsync, os.replace, fsync data_dir), rename the
          folder to adapters/<name>, fsync adapters/ -> return (the API answers 201). A crash before the rename
          leaves an index entry without its folder, dropped at startup; once this returns, the adapter survives any
          restart. A failed rename puts the old index back.
* delete: under the lock: rename the folder into staging/, replace index.json without the name (the commit point),
          then remove the folder. A failed index write (a full disk: StorageFull) renames the folder back, so nothing
          changes; a crash leaves the old index naming a folder that is gone, which startup drops.
* startup: claim data_dir, empty staging/, load index.json (a missing one with folders in adapters/ refuses the
           start), drop entries whose folder is missing, report unindexed folders and keep them.

One server process per ``data_dir``: the lock is a ``threading.Lock``. Reads are lock-free, because every change
swaps in a new dict instead of mutating the current one. Torch-free: validating an adapter folder is the injected
``validate`` callable's job (the model layer's checkpoint reader).
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from server.adapters.archive import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TooLarge,
    UnsafeArchive,
    UploadLimits,
    extract_adapter_archive,
    kept_limit,
    receive_file,
)
from server.adapters.data_dir import (
    ADAPTERS_DIR,
    INDEX_FILE,
    STAGING_DIR,
    TEMP_PREFIXES,
    ForeignDataDir,
    claim_data_dir,
    fsync_dir,
    write_json_atomic,
)
from server.adapters.errors import AdapterFormatError

_log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # and no ".." anywhere: names are folder names on disk
_NAME = re.compile(NAME_PATTERN)
_INDEX_VERSION = 1
Source = Literal["upload", "startup"]
DEFAULT_LIMITS = UploadLimits()


class RegistryError(Exception):
    """Base of the registry's refusals; each message says what to change."""


class InvalidAdapterName(RegistryError):
    """The name does not match NAME_PATTERN or contains '..' (HTTP 400)."""


class AdapterExists(RegistryError):
    """An adapter of that name is already registered (HTTP 409)."""


class AdapterNotFound(RegistryError, KeyError):
    """No adapter of that name (HTTP 404). A KeyError, so ``AdapterRegistry.path`` can serve as a name lookup."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class UploadTooLarge(RegistryError):
    """A file or archive is above its UploadLimits cap (HTTP 413)."""


class StorageFull(RegistryError):
    """The disk (or quota) ran out while storing an upload or deleting (HTTP 507); nothing was changed."""


class BadArchive(RegistryError):
    """The archive is unsafe, broken, not a .zip/.tar.gz, or holds no adapter (HTTP 400)."""


@dataclass(frozen=True)
class AdapterSummary:
    """What the validator reports about a valid adapter folder."""

    rank: int
    alpha: float
    target_modules: list[str] | str  # a list of module names, or one regex / "all-linear" as PEFT stores it


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter as the API shows it; ``sha256`` is of adapter_model.safetensors, ``size_bytes`` the
    total of its stored files, ``created_at`` ISO 8601 UTC ("2026-11-24T14:05:00Z")."""

    name: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    size_bytes: int
    sha256: str
    created_at: str
    source: Source

    def to_json(self) -> dict[str, object]:
        """A JSON-safe dict (a copy: changing it leaves the record alone)."""
        out = asdict(self)
        out["alpha"] = float(self.alpha)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> "AdapterRecord":
        """The inverse of ``to_json``; raises ValueError/TypeError/KeyError on a malformed entry."""
        targets = raw["target_modules"]
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise TypeError(f"target_modules must be a string or a list of strings, got {targets!r}")
        source = raw["source"]
        if source not in ("upload", "startup"):
            raise ValueError(f"unknown source {source!r}")
        return cls(
            name=check_name(raw["name"]),
            rank=int(_numeric(raw["rank"])),
            alpha=float(_numeric(raw["alpha"])),
            target_modules=targets,
            size_bytes=int(_numeric(raw["size_bytes"])),
            sha256=str(raw["sha256"]),
            created_at=str(raw["created_at"]),
            source=source,
        )


def _numeric(value: object) -> int | float | str:
    """A JSON value that int() and float() accept by type; TypeError (as they would raise) for any other."""
    if not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def check_name(name: object) -> str:
    """``name`` when it is a valid adapter name, else InvalidAdapterName. Checked before any upload byte is read."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or ".." in name:
        shown = repr(name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "...")
        raise InvalidAdapterName(
            f"invalid adapter name {shown}: use 1 to 64 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


class AdapterRegistry:
    """Registered adapters by name, stored under ``data_dir`` (layout and crash-consistency order: module docstring).

    ``validate(folder)`` reads and checks a PEFT folder and returns its AdapterSummary, or raises AdapterError,
    which propagates unchanged. Every ``add_*`` leaves nothing behind when it fails.
    """

    def __init__(
        self, data_dir: Path, validate: Callable[[Path], AdapterSummary], limits: UploadLimits = DEFAULT_LIMITS
    ) -> None:
        self.data_dir = Path(data_dir)
        self.limits = limits
        self._validate = validate
        self._adapters = self.data_dir / ADAPTERS_DIR
        self._staging = self.data_dir / STAGING_DIR
        self._index = self.data_dir / INDEX_FILE
        self._lock = threading.Lock()
        self._records: dict[str, AdapterRecord] = self._recover()

    # ---- adding ---------------------------------------------------------------------------------------------------
    def add_files(self, name: str, config: BinaryIO, weights: BinaryIO, source: Source = "upload") -> AdapterRecord:
        """Register the two PEFT files streamed from ``config`` and ``weights`` under ``name``."""
        self._check_new(name)
        with self._new_staging() as folder:
            with _upload_errors():
                receive_file(config, folder / CONFIG_FILE, self.limits.max_config_bytes, CONFIG_FILE)
                receive_file(weights, folder / WEIGHTS_FILE, self.limits.max_file_bytes, WEIGHTS_FILE)
                return self._commit(name, folder, source)

    def add_archive(self, name: str, archive: BinaryIO, source: Source = "upload") -> AdapterRecord:
        """Register the PEFT folder inside a .zip or .tar.gz (see ``archive.extract_adapter_archive``)."""
        self._check_new(name)
        with self._new_staging() as folder:
            with _upload_errors():
                extract_adapter_archive(archive, folder.parent / "unpacked", folder, self.limits)
                return self._commit(name, folder, source)

    def add_folder(self, name: str, folder: Path, source: Source = "startup") -> AdapterRecord:
        """Register a copy of the local PEFT folder ``folder`` (symlinks followed: it is trusted, e.g. an HF cache
        snapshot). Raises AdapterExists when ``name`` is taken: at boot, check ``name in registry`` first."""
        self._check_new(name)
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterFormatError(f"adapter folder {str(folder)!r} does not exist")
        with self._new_staging() as staged:
            with _upload_errors():
                for entry in sorted(folder.iterdir()):
                    limit = kept_limit(entry.name, self.limits)
                    if limit is not None and entry.is_file():
                        with entry.open("rb") as src:
                            receive_file(src, staged / entry.name, limit, entry.name)
                return self._commit(name, staged, source)

    # ---- reading --------------------------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterRecord:
        """The record of ``name``; AdapterNotFound when it is not registered (invalid names included)."""
        try:
            return self._records[name]
        except (KeyError, TypeError):
            raise AdapterNotFound(f"adapter {name!r} not found") from None

    def path(self, name: str) -> Path:
        """Folder of registered adapter ``name``; AdapterNotFound (a KeyError) otherwise."""
        return self._adapters / self.get(name).name

    def list(self) -> list[AdapterRecord]:
        """All records, sorted by name."""
        records = self._records
        return [records[n] for n in sorted(records)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._records

    def __len__(self) -> int:
        return len(self._records)

    # ---- deleting -------------------------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Unregister ``name`` and remove its files; AdapterNotFound when it is not registered, StorageFull (and
        nothing changed) when the disk is too full to write the new index."""
        with self._lock:
            self.get(name)
            folder = self._adapters / name
            before = self._records
            # Readers stop seeing the name before its folder moves, so a request that looks it up from now on gets
            # "not found" (404), not a half-gone folder (503). A failed delete puts the record back when the folder
            # is back in place.
            self._records = {n: r for n, r in before.items() if n != name}
            with _storage_full("nothing was deleted"):
                try:
                    trash = self._move_to_staging(folder)
                except BaseException:
                    self._records = before
                    raise
                try:
                    self._write_index(self._records)  # the commit point
                except BaseException:
                    if self._put_back(trash, folder, name):
                        self._records = before
                    raise
        shutil.rmtree(trash, ignore_errors=True)

    # ---- internals ------------------------------------------------------------------------------------------------
    def _check_new(self, name: str) -> None:
        check_name(name)
        if name in self._records:  # early, so a duplicate costs no upload; _commit checks again under the lock
            raise AdapterExists(f"adapter {name!r} already exists; delete it first to replace it")
        self._check_not_in_the_way(self._adapters / name)

    def _check_not_in_the_way(self, final: Path) -> None:
        if final.exists() or final.is_symlink():  # not the server's (see the module docstring): never replaced
            raise AdapterExists(
                f"the data directory holds a folder {str(final)!r} that is not a registered adapter (copied in by hand "
                "or left by an older version); the server does not delete it: move it away, then upload again"
            )

    @contextmanager
    def _new_staging(self) -> Iterator[Path]:
        """A fresh, empty staging/<tmp>/adapter folder; staging/<tmp> is removed on exit, whatever happened."""
        work = Path(tempfile.mkdtemp(prefix="upload-", dir=self._staging))
        try:
            (work / "adapter").mkdir()
            yield work / "adapter"
        finally:
            shutil.rmtree(work, ignore_errors=True)

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
            sha256=_sha256(staged / WEIGHTS_FILE),
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            source=source,
        )
        final = self._adapters / name
        with self._lock:
            if name in self._records:
                raise AdapterExists(f"adapter {name!r} already exists; delete it first to replace it")
            self._check_not_in_the_way(final)
            records = {**self._records, name: record}
            self._write_index(records)  # the commit point; until the rename, startup would drop the entry
            try:
                os.rename(staged, final)
                fsync_dir(self._adapters)
            except BaseException:
                self._undo_commit(final, staged, name)
                raise
            self._records = records
        return record

    def _undo_commit(self, final: Path, staged: Path, name: str) -> None:
        """The folder of a just-indexed adapter could not be put (durably) in place: back to the old index."""
        if final.exists():
            try:
                os.rename(final, staged)
            except OSError:  # it stays in place and indexed: registered after a restart, never an unindexed folder
                _log.exception("adapter %r: the folder could not be moved back after a failed commit", name)
                return
        try:
            self._write_index(self._records)
        except OSError:  # the index names a folder that is not there: startup drops the entry
            _log.exception("adapter %r: the index could not be restored after a failed commit", name)

    def _put_back(self, trash: Path, folder: Path, name: str) -> bool:
        """Undo a delete's rename when its index write failed; True when the folder is back (the adapter stays
        registered and intact), False when it could not be moved (then it stays unregistered)."""
        try:
            os.rename(trash / "adapter", folder)
        except OSError:  # the index still names it, the folder is gone: startup drops the entry
            _log.exception("adapter %r: its folder could not be moved back from %s after a failed delete", name, trash)
            return False
        with suppress(OSError):
            os.rmdir(trash)
        return True

    def _move_to_staging(self, path: Path) -> Path:
        trash = Path(tempfile.mkdtemp(prefix="deleted-", dir=self._staging))
        try:
            os.rename(path, trash / "adapter")
        except BaseException:
            os.rmdir(trash)
            raise
        return trash

    def _write_index(self, records: dict[str, AdapterRecord]) -> None:
        """Replace index.json atomically: readers (and a restart) see the old or the new index, never a mix."""
        body = {"version": _INDEX_VERSION, "adapters": {n: records[n].to_json() for n in sorted(records)}}
        write_json_atomic(self._index, body)

    def _recover(self) -> dict[str, AdapterRecord]:
        """Claim data_dir, load the index and make the disk agree with it (see the module docstring). Removes only
        what the server made: staging leftovers and interrupted index writes."""
        try:
            claim_data_dir(self.data_dir, self._read_index)
        except ForeignDataDir as e:
            raise RegistryError(str(e)) from None
        for d in (self._adapters, self._staging):
            d.mkdir(exist_ok=True)
        temps = [p for p in self.data_dir.iterdir() if p.name.startswith(TEMP_PREFIXES) and p.name.endswith(".tmp")]
        for leftover in [*self._staging.iterdir(), *temps]:
            _log.warning("removing %s: left over by an interrupted upload, delete or index write", leftover)
            _remove(leftover)
        folders = sorted(p.name for p in self._adapters.iterdir())
        if not self._index.exists():
            if folders:  # never read as "nothing is registered": that would orphan every folder
                raise RegistryError(
                    f"{self._index} is missing but {self._adapters} holds {len(folders)} folder(s) "
                    f"({', '.join(folders[:5])}); restore index.json from a backup, or move those folders out and "
                    "register them again with --startup-adapters; nothing was changed"
                )
            self._write_index({})
        indexed = self._read_index()
        records: dict[str, AdapterRecord] = {}
        for name, record in indexed.items():
            folder = self._adapters / name
            if folder.is_dir() and not folder.is_symlink():
                records[name] = record
            else:
                _log.warning("dropping adapter %r from the index: its folder %s is missing", name, folder)
        unindexed = [n for n in folders if n not in records]
        if unindexed:
            _log.warning("keeping %d folder(s) in %s that are not registered adapters (%s): the server did not make "
                         "them and never deletes them; move them away, or register them with --startup-adapters",
                         len(unindexed), self._adapters, ", ".join(unindexed[:5]))  # fmt: skip
        if records != indexed:
            self._write_index(records)
        return records

    def _read_index(self) -> dict[str, AdapterRecord]:
        if not self._index.exists():
            return {}
        try:
            body = json.loads(self._index.read_text(encoding="utf-8"))
            if body.get("version") != _INDEX_VERSION:
                raise ValueError(f"unsupported version {body.get('version')!r}")
            records = {name: AdapterRecord.from_json(raw) for name, raw in body["adapters"].items()}
            if any(name != r.name for name, r in records.items()):
                raise ValueError("an entry's key differs from its name")
        except (ValueError, TypeError, KeyError, AttributeError, RegistryError) as e:
            # Refuse to start rather than treat every adapter folder as unindexed and delete it.
            raise RegistryError(f"{self._index} is malformed ({e}); fix or remove it") from e
        return records


@contextmanager
def _upload_errors() -> Iterator[None]:
    """The intake module's refusals as registry errors (HTTP 413 and 400), and a full disk as StorageFull (507).
    Whatever fails, the staging folder is removed by ``_new_staging`` and the index is untouched."""
    try:
        with _storage_full("nothing was stored"):
            yield
    except TooLarge as e:
        raise UploadTooLarge(str(e)) from None
    except UnsafeArchive as e:
        raise BadArchive(str(e)) from None


@contextmanager
def _storage_full(outcome: str) -> Iterator[None]:
    """A full disk or quota (ENOSPC, EDQUOT) as StorageFull (HTTP 507); ``outcome`` says what the caller undid."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"the server's adapter storage is full ({os.strerror(e.errno)}); {outcome}") from e
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()
