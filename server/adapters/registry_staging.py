"""Staging that several server processes can share, and the mark that tells the registry's folders from a user's.

Every upload and delete works in a folder of its own, ``staging/<kind>-<uuid>/``, and holds an exclusive ``flock`` on
its sibling ``staging/<kind>-<uuid>.lock`` from before the folder exists until after it is removed. The kernel drops
a dead process's locks, so a lock that can be taken marks a dead operation. Startup recovery (``Staging.recover``)
removes an entry only when it can take its lock, or when it has no lock file at all (the leftovers of a version that
ran one process per data directory and emptied staging/ at startup): another replica's startup never removes an
upload or delete in progress. A lock per operation rather than per process keeps staging/ empty whenever nothing is
in flight, which is what an operator (and the e2e checks) read as "nothing left over".

The lock file is created (O_EXCL) and locked before its folder exists, and unlinked after the folder is removed, so
a folder without a lock file is never a live one. A recovery may take the lock of a file created a moment ago and not
locked yet; it then unlinks it, and the owner, which checks after locking that the path still names the file it
locked, starts over under a new name.

On NFS, Linux emulates ``flock`` with POSIX locks: across processes and hosts it works as here (a crashed host's locks
are freed when its lease expires), but two registries inside one process do not exclude each other.

``PENDING_FILE`` marks an adapter folder that an add or delete in flight has put in (or is taking out of)
``adapters/``; it holds that operation's record uid. Recovery removes a marked folder whose uid has no row (an add
or delete interrupted by a crash) and drops the mark of one whose row is there; a folder without the mark that has no
row was copied in by hand: kept and reported, never deleted.
"""

import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from server.adapters.data_dir import fsync_dir

_log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
PENDING_FILE = ".lora-server-pending"
_UID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
_LOCK_ATTEMPTS = 16  # each attempt loses only to a recovery removing the lock file it just made


class Staging:
    """``staging/``: per-operation work folders under their locks."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def operation(self, kind: str) -> Iterator[Path]:
        """A fresh, empty ``staging/<kind>-<uuid>/`` held under its lock; removed, and its lock file with it, on
        exit, whatever happened."""
        fd, name = self._lock_new(kind)
        work = self.root / name
        try:
            work.mkdir()
            yield work
        finally:
            _remove(work)
            with suppress(FileNotFoundError):
                os.unlink(self.root / (name + LOCK_SUFFIX))
            os.close(fd)

    def _lock_new(self, kind: str) -> tuple[int, str]:
        for _ in range(_LOCK_ATTEMPTS):
            name = f"{kind}-{uuid.uuid4().hex}"
            path = self.root / (name + LOCK_SUFFIX)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names(path, fd):
                    return fd, name
            except BlockingIOError:  # a recovery holds it and is about to unlink it
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OSError(f"could not lock a staging folder in {self.root} in {_LOCK_ATTEMPTS} attempts")

    def recover(self) -> list[str]:
        """Remove what dead operations (and older versions) left in staging/; the names removed, for the log."""
        removed: list[str] = []
        live: set[str] = set()
        for lock in sorted(p for p in self.root.iterdir() if p.name.endswith(LOCK_SUFFIX)):
            name = lock.name[: -len(LOCK_SUFFIX)]
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:  # its operation finished meanwhile
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a live process's operation: never touched
                    live.add(name)
                    continue
                _remove(self.root / name)  # the folder first, then its lock file: see the module docstring
                with suppress(FileNotFoundError):
                    os.unlink(lock)
                removed.append(name)
            finally:
                os.close(fd)
        for entry in sorted(self.root.iterdir()):
            if entry.name.endswith(LOCK_SUFFIX) or entry.name in live:
                continue
            if (self.root / (entry.name + LOCK_SUFFIX)).exists():  # an operation that began after the scan above
                continue
            _remove(entry)
            removed.append(entry.name)
        return removed


def mark_pending(folder: Path, uid: str) -> None:
    """Mark ``folder`` as moved by the operation of record ``uid`` (durably: a mark lost in a crash would leave a
    folder that looks copied in by hand, kept for ever)."""
    with open(folder / PENDING_FILE, "w", encoding="ascii") as f:
        f.write(uid)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def pending_uid(folder: Path) -> str | None:
    """The uid ``folder`` is marked with; None when it has no mark (or is not a real folder)."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        uid = (folder / PENDING_FILE).read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    return uid if _UID.fullmatch(uid) else None  # only a mark the registry wrote counts: never a user's file


def clear_pending(folder: Path) -> None:
    """Drop the mark once the row is committed; a mark left by a crash here is dropped by the next recovery."""
    with suppress(FileNotFoundError):
        os.unlink(folder / PENDING_FILE)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()
