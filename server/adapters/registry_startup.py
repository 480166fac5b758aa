"""Opening the registry's data directory: claim it, import a layout-1 ``index.json`` into ``registry.db``, and make
the disk and the database agree after a crash. Several processes may run this at once on one folder, and while
others serve from it: everything that changes the folder runs inside one write transaction (the database's write
lock), so it never races another process's add, delete or startup.

* claim: ``data_dir.claim_data_dir`` refuses a folder that is not the server's, before anything is touched.
* import: a layout-1 folder's ``index.json`` is parsed first (a malformed one refuses the start, nothing touched),
  its records (each given a fresh uid) inserted in the startup transaction with a ``meta`` row saying so, and the
  file removed (and its removal fsynced) after the commit; then the marker says layout 2. A crash after the commit
  leaves an ``index.json`` that the ``meta`` row says is imported already: it is removed, never read twice.
* a missing database while ``adapters/`` holds folders refuses the start rather than serve an empty registry.
* recovery: dead operations' staging folders (``registry_staging``), interrupted index writes of layout 1, rows
  whose folder is gone, and marked folders in ``adapters/`` that have no row (an add or delete a crash interrupted)
  are removed; a folder without the mark and without a row is not the server's: kept and reported.
"""

import json
import logging
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from server.adapters.data_dir import (
    ADAPTERS_DIR,
    DB_FILE,
    INDEX_FILE,
    TEMP_PREFIXES,
    ForeignDataDir,
    claim_data_dir,
    fsync_dir,
    upgrade_marker,
)
from server.adapters.registry_db import RegistryDB, Transaction
from server.adapters.registry_records import AdapterRecord, RegistryError
from server.adapters.registry_staging import Staging, clear_pending, pending_uid

_log = logging.getLogger(__name__)

_INDEX_VERSION = 1  # the only index.json format there was
_IMPORTED = "imported_index_json"  # meta key: when index.json was imported
# A marker write of a replica starting right now has a temp file for milliseconds; one this old was interrupted.
_STALE_MARKER_TEMP_S = 60.0


def open_data_dir(data_dir: Path, staging: Staging) -> RegistryDB:
    """Claim ``data_dir``, import and recover it (see the module docstring); the open database."""
    index, db_path, adapters = data_dir / INDEX_FILE, data_dir / DB_FILE, data_dir / ADAPTERS_DIR
    try:
        claim_data_dir(data_dir, lambda: read_index(index))
    except ForeignDataDir as e:
        raise RegistryError(str(e)) from None
    imported = read_index(index) if index.exists() else None  # a malformed index refuses before anything changes
    if imported is None and (not db_path.exists() or db_path.stat().st_size == 0):
        folders = sorted(p.name for p in adapters.iterdir()) if adapters.is_dir() else []
        if folders:  # never read as "nothing is registered": that would orphan every folder
            raise RegistryError(
                f"{db_path} is missing but {adapters} holds {len(folders)} folder(s) ({', '.join(folders[:5])}); "
                f"restore {DB_FILE} from a backup, or move those folders out and register them again with "
                "--startup-adapters; nothing was changed"
            )
    for d in (adapters, staging.root):
        d.mkdir(exist_ok=True)
    db = RegistryDB(db_path)
    try:
        with db.write() as tx:
            tx.ensure_schema(db_path)
            if imported is not None and tx.meta(_IMPORTED) is None:  # another replica may have imported it already
                _import(tx, imported, index)
            _recover(tx, data_dir, staging)
    except BaseException:
        db.close()
        raise
    if index.exists():  # imported (now or by an earlier start): the database holds its records
        index.unlink(missing_ok=True)
        fsync_dir(data_dir)
    upgrade_marker(data_dir)
    return db


def read_index(index: Path) -> dict[str, AdapterRecord]:
    """The records of a layout-1 ``index.json`` (fresh uids); RegistryError when it is not one."""
    try:
        body = json.loads(index.read_text(encoding="utf-8"))
        if body.get("version") != _INDEX_VERSION:
            raise ValueError(f"unsupported version {body.get('version')!r}")
        records = {name: AdapterRecord.from_json(raw, uid=uuid.uuid4().hex) for name, raw in body["adapters"].items()}
        if any(name != r.name for name, r in records.items()):
            raise ValueError("an entry's key differs from its name")
    except (ValueError, TypeError, KeyError, AttributeError, RegistryError) as e:
        # Refuse to start rather than treat every adapter folder as unindexed.
        raise RegistryError(f"{index} is malformed ({e}); fix or remove it") from e
    return records


def _import(tx: Transaction, records: dict[str, AdapterRecord], index: Path) -> None:
    for name in sorted(records):
        if tx.get(name) is None:
            tx.insert(records[name])
    tx.set_meta(_IMPORTED, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    _log.warning("imported %d adapter(s) from %s into %s; %s will be removed", len(records), index, DB_FILE, index)


def _recover(tx: Transaction, data_dir: Path, staging: Staging) -> None:
    """Make the disk agree with the database; removes only what the server made (see the module docstring)."""
    for name in staging.recover():
        _log.warning("removed %s: left over by an interrupted upload or delete", staging.root / name)
    now = time.time()
    for temp in data_dir.iterdir():
        if not (temp.name.startswith(TEMP_PREFIXES) and temp.name.endswith(".tmp")):
            continue
        if temp.name.startswith(".index-") or now - temp.stat().st_mtime > _STALE_MARKER_TEMP_S:
            _log.warning("removing %s: left over by an interrupted index or marker write", temp)
            temp.unlink(missing_ok=True)
    adapters = data_dir / ADAPTERS_DIR
    records = tx.all()
    for name in sorted(records):
        folder = adapters / name
        if folder.is_symlink() or not folder.is_dir():
            _log.warning("dropping adapter %r from the registry: its folder %s is missing", name, folder)
            tx.delete(name)
            del records[name]
    unregistered: list[str] = []
    for folder in sorted(adapters.iterdir()):
        uid, record = pending_uid(folder), records.get(folder.name)
        if uid is None:
            if record is None:
                unregistered.append(folder.name)
        elif record is not None and record.uid == uid:
            clear_pending(folder)  # a commit that crashed just before dropping its mark
        else:
            _log.warning("removing %s: an add or delete that a crash interrupted left it", folder)
            shutil.rmtree(folder, ignore_errors=True)
    if unregistered:
        _log.warning("keeping %d folder(s) in %s that are not registered adapters (%s): the server did not make "
                     "them and never deletes them; move them away, or register them with --startup-adapters",
                     len(unregistered), adapters, ", ".join(unregistered[:5]))  # fmt: skip
    fsync_dir(adapters)
