"""Whose folder is the data directory: the registry writes and removes files only inside a folder it created or
adopted, so pointing ``--data-dir`` at a folder full of the user's own files can never cost them a file.

The marker ``<data_dir>/.lora-server`` (``{"format": "lora-server data directory", "version": 2}``) says the folder
is the server's. ``claim_data_dir`` decides at startup, before anything is created, moved or removed:

* missing, or empty (a fresh filesystem's ``lost+found`` aside): created and marked;
* marked by this version (or an older one): used as it is;
* unmarked but laid out exactly as a server before the marker left it (a readable ``index.json`` and nothing beside
  it except ``adapters/``, ``staging/`` and interrupted index writes), or only empty ``adapters/``/``staging/``:
  adopted, i.e. marked, so existing deployments keep working;
* anything else: refused with ``ForeignDataDir``, nothing touched.

Layout versions: 1 kept the registry in ``index.json``; 2 keeps it in ``registry.db`` (SQLite, shared by several
server processes). The registry imports a version-1 ``index.json`` and then calls ``upgrade_marker``, so a server that
reads only version 1 refuses the upgraded folder instead of finding no index. Several processes may claim one folder
at the same time: every step here is idempotent (the same marker, written atomically).
"""

import json
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from enum import Enum
from pathlib import Path

_log = logging.getLogger(__name__)

MARKER_FILE = ".lora-server"
MARKER_FORMAT = "lora-server data directory"
MARKER_VERSION = 2
INDEX_FILE = "index.json"  # layout version 1: imported into DB_FILE at startup, then removed
DB_FILE = "registry.db"
ADAPTERS_DIR = "adapters"
STAGING_DIR = "staging"
CACHE_DIR = "cache"  # with --adapter-store: this node's copies of adapters in the store (registry_remote.py)
# The temp files of an interrupted atomic write: only the server makes names of this shape here.
TEMP_PREFIXES = (".index-", ".lora-server-")
_NOT_OURS_BUT_HARMLESS = frozenset({"lost+found"})  # at the root of a fresh ext2/3/4 volume; never touched
_SHOWN_ENTRIES = 5


class ForeignDataDir(Exception):
    """The data directory is not the server's (or was written by a newer version); the message says what to do."""


class Claim(Enum):
    CREATED = "created"  # missing or empty: initialised now
    ADOPTED = "adopted"  # the layout of a server from before the marker: marked now
    OWNED = "owned"  # marked already


def claim_data_dir(root: Path, read_index: Callable[[], object]) -> Claim:
    """Make sure ``root`` is the server's own data directory, marking it when it is new or a pre-marker layout.

    ``read_index()`` parses ``root/index.json`` and raises (the registry's RegistryError) when it is not a registry
    index; it is called only to recognise a pre-marker layout. Raises ForeignDataDir for any other non-empty folder.
    """
    if root.exists() and not root.is_dir():
        raise ForeignDataDir(f"the data directory {str(root)!r} is not a folder; choose a new or empty folder")
    if not root.exists():
        root.mkdir(parents=True, exist_ok=True)  # exist_ok: another replica may be creating it right now
        _mark(root)
        return Claim.CREATED
    marker = root / MARKER_FILE
    if marker.exists() or marker.is_symlink():
        _check_marker(marker)
        return Claim.OWNED
    entries = {p.name for p in root.iterdir()} - _NOT_OURS_BUT_HARMLESS
    ours = {n for n in entries if n.startswith(TEMP_PREFIXES) and n.endswith(".tmp")}
    layout = entries - ours
    if not layout or (layout <= {ADAPTERS_DIR, STAGING_DIR} and all(_is_empty_dir(root / n) for n in layout)):
        _mark(root)
        return Claim.CREATED
    if layout <= {INDEX_FILE, ADAPTERS_DIR, STAGING_DIR} and INDEX_FILE in layout and _plain_layout(root, layout):
        read_index()  # a malformed index refuses the start with its own message, and nothing is touched
        _mark(root)
        _log.warning("adopted %s as this server's data directory (written by a version before the %s marker)",
                     root, MARKER_FILE)  # fmt: skip
        return Claim.ADOPTED
    shown = ", ".join(sorted(layout)[:_SHOWN_ENTRIES]) + (", ..." if len(layout) > _SHOWN_ENTRIES else "")
    raise ForeignDataDir(
        f"the data directory {str(root)!r} is not empty and was not created by lora-server (it has no {MARKER_FILE} "
        f"marker) and holds: {shown}. The server removes files inside its data directory, so it needs one of its "
        "own: set --data-dir (LORA_SERVER_DATA_DIR) to a new or empty folder; nothing was changed"
    )


def upgrade_marker(root: Path) -> None:
    """Mark ``root`` (claimed already) with this layout version once the registry has upgraded its contents."""
    if _marker_version(root / MARKER_FILE) != MARKER_VERSION:
        _mark(root)
        _log.info("marked %s as data directory layout version %d", root, MARKER_VERSION)


def write_json_atomic(path: Path, body: object) -> None:
    """Replace ``path`` with ``body`` as JSON atomically and durably: readers and a restart see the old or the new
    file, never a mix (temp file, fsync, os.replace, fsync of the folder). The temp file is removed on failure."""
    prefix = ".lora-server-" if path.name == MARKER_FILE else f".{path.stem}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames and file creations inside ``path`` durable (a file's fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark(root: Path) -> None:
    write_json_atomic(root / MARKER_FILE, {"format": MARKER_FORMAT, "version": MARKER_VERSION})


def _marker_version(marker: Path) -> int | None:
    try:
        body = json.loads(marker.read_text(encoding="utf-8"))
        version = body["version"] if isinstance(body, dict) and body.get("format") == MARKER_FORMAT else None
    except (OSError, ValueError, KeyError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _check_marker(marker: Path) -> None:
    version = _marker_version(marker)
    if version is None:
        raise ForeignDataDir(
            f"{marker} is not a lora-server marker: if this folder is the server's data directory, restore the "
            f'marker as {{"format": "{MARKER_FORMAT}", "version": {MARKER_VERSION}}}; otherwise choose another folder'
        )
    if version > MARKER_VERSION:
        raise ForeignDataDir(
            f"the data directory {str(marker.parent)!r} was written by a newer lora-server (layout version {version}, "
            f"this one reads {MARKER_VERSION}); run that version, or choose another folder"
        )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _plain_layout(root: Path, names: set[str]) -> bool:
    """The pre-marker layout's entries are what the server made them: a regular index file, real folders."""
    for name in names:
        path = root / name
        if path.is_symlink() or not (path.is_file() if name == INDEX_FILE else path.is_dir()):
            return False
    return True
