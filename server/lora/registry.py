"""The adapter registry: name -> ``AdapterRecord``, persisted under ``data_dir``; the source of truth of /v1/adapters.

Layout::

    data_dir/index.json          {"version": 1, "adapters": {name: record}}: what is registered (the commit point)
    data_dir/adapters/<name>/    adapter_config.json, adapter_model.safetensors (and README.md when one came along)
    data_dir/staging/            uploads in progress and folders being deleted; emptied at startup

Crash consistency: index.json only ever names complete, fsynced folders, and it is replaced atomically.

* add:    stream into staging/<tmp>/adapter, fsync the files -> validate (outside the lock) -> under the lock: rename
          the folder to adapters/<name>, fsync adapters/, replace index.json (temp file, fsync, os.replace, fsync
          data_dir) -> return (the API answers 201). A crash before os.replace leaves a staging leftover or an
          unindexed folder, both removed at startup; once this returns, the adapter survives any restart.
* delete: under the lock: replace index.json without the name (the commit point), rename the folder into staging/,
          then remove it. A crash leaves the old index with an intact folder, or an unindexed folder or staging
          leftover that startup removes; never a registered, half-deleted folder.
* startup: empty staging/, load index.json, drop entries whose folder is missing, remove folders not in the index.

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

from server.lora.archive import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TooLarge,
    UnsafeArchive,
    UploadLimits,
    extract_adapter_archive,
    kept_limit,
    receive_file,
)
from server.lora.errors import AdapterFormatError

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
    """The disk (or quota) ran out while storing an upload (HTTP 507); nothing was stored."""


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
            rank=int(raw["rank"]),  # type: ignore[call-overload]
            alpha=float(raw["alpha"]),  # type: ignore[arg-type]
            target_modules=targets,
            size_bytes=int(raw["size_bytes"]),  # type: ignore[call-overload]
            sha256=str(raw["sha256"]),
            created_at=str(raw["created_at"]),
            source=source,
        )


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
        self._adapters = self.data_dir / "adapters"
        self._staging = self.data_dir / "staging"
        self._index = self.data_dir / "index.json"
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
        """Unregister ``name`` and remove its files; AdapterNotFound when it is not registered."""
        with self._lock:
            self.get(name)
            records = {n: r for n, r in self._records.items() if n != name}
            self._write_index(records)
            self._records = records
            try:  # the delete is committed: a failure here only leaves an unindexed folder, removed later
                trash = self._move_to_staging(self._adapters / name)
            except OSError:
                _log.exception("adapter %r is unregistered but its folder could not be moved away", name)
                return
        shutil.rmtree(trash, ignore_errors=True)

    # ---- internals ------------------------------------------------------------------------------------------------
    def _check_new(self, name: str) -> None:
        check_name(name)
        if name in self._records:  # early, so a duplicate costs no upload; _commit checks again under the lock
            raise AdapterExists(f"adapter {name!r} already exists; delete it first to replace it")

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
        _fsync_dir(staged)
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
            if final.exists() or final.is_symlink():  # unindexed leftover of a delete whose cleanup failed
                shutil.rmtree(self._move_to_staging(final), ignore_errors=True)
            os.rename(staged, final)
            records = {**self._records, name: record}
            try:
                _fsync_dir(self._adapters)
                self._write_index(records)
            except BaseException:
                with suppress(OSError):  # back into staging, removed with it; else startup removes it
                    os.rename(final, staged)
                raise
            self._records = records
        return record

    def _move_to_staging(self, path: Path) -> Path:
        trash = Path(tempfile.mkdtemp(prefix="deleted-", dir=self._staging))
        os.rename(path, trash / "adapter")
        return trash

    def _write_index(self, records: dict[str, AdapterRecord]) -> None:
        """Replace index.json atomically: readers (and a restart) see the old or the new index, never a mix."""
        body = {"version": _INDEX_VERSION, "adapters": {n: records[n].to_json() for n in sorted(records)}}
        fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".tmp", dir=self.data_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._index)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.data_dir)

    def _recover(self) -> dict[str, AdapterRecord]:
        """Load the index and make the disk agree with it (see the module docstring)."""
        for d in (self.data_dir, self._adapters, self._staging):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in [*self._staging.iterdir(), *self.data_dir.glob(".index-*.tmp")]:
            _log.warning("removing %s: left over by an interrupted upload, delete or index write", leftover)
            _remove(leftover)
        indexed = self._read_index()
        records: dict[str, AdapterRecord] = {}
        for name, record in indexed.items():
            folder = self._adapters / name
            if folder.is_dir() and not folder.is_symlink():
                records[name] = record
            else:
                _log.warning("dropping adapter %r from the index: its folder %s is missing", name, folder)
        for entry in self._adapters.iterdir():
            if entry.name not in records:
                _log.warning("removing %s: not in the index (an upload interrupted before its commit)", entry)
                _remove(entry)
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
        yield
    except TooLarge as e:
        raise UploadTooLarge(str(e)) from None
    except UnsafeArchive as e:
        raise BadArchive(str(e)) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = os.strerror(e.errno)
            raise StorageFull(f"the server's adapter storage is full ({reason}); nothing was stored") from e
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make renames and file creations inside ``path`` durable (a file's fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()
