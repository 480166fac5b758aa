"""How the registry turns the failures of storing an upload into its own refusals, and the weights' checksum."""

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.adapters.archive import TooLarge, UnsafeArchive
from server.adapters.registry_db import is_disk_full
from server.adapters.registry_records import BadArchive, StorageFull, UploadTooLarge


@contextmanager
def upload_errors() -> Iterator[None]:
    """The intake module's refusals as registry errors (HTTP 413 and 400), and a full disk as StorageFull (507).
    Whatever fails, the staging folder is removed and the database is unchanged."""
    try:
        with storage_full("nothing was stored"):
            yield
    except TooLarge as e:
        raise UploadTooLarge(str(e)) from None
    except UnsafeArchive as e:
        raise BadArchive(str(e)) from None


@contextmanager
def storage_full(outcome: str) -> Iterator[None]:
    """A full disk or quota (ENOSPC, EDQUOT, SQLite's SQLITE_FULL) as StorageFull (HTTP 507); ``outcome`` says what
    the caller undid."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"the server's adapter storage is full ({os.strerror(e.errno)}); {outcome}") from e
        raise
    except Exception as e:
        if is_disk_full(e):
            raise StorageFull(f"the server's adapter storage is full ({e}); {outcome}") from e
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
