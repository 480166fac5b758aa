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
* with an object store (``store``): the database's ``meta`` row ``object_store`` names the store its rows' files
  are in, set by the first start, which refuses a store that holds adapter objects already (they belong to another
  registry database: with this new, empty one, the orphan sweep would delete them all). A database of local
  adapters is refused with a store, and a database of a store's adapters without one (or with another), rather than
  read every row as damage; ``adapters/`` must be empty (a local registry's folders). Recovery then covers staging/
  only: a node's copies (``cache/``) are checked by ``registry_remote``, and a missing copy is downloaded, never a
  reason to drop a row.
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
from server.adapters.object_store import OBJECTS_DIR, ObjectStore
from server.adapters.registry_db import RegistryDB, Transaction
from server.adapters.registry_records import AdapterRecord, RegistryError
from server.adapters.registry_staging import Staging, clear_pending, pending_uid

_log = logging.getLogger(__name__)

_INDEX_VERSION = 1  # the only index.json format there was
_IMPORTED = "imported_index_json"  # meta key: when index.json was imported
_STORE = "object_store"  # meta key: the store (s3://bucket/prefix) that holds the files of every row
# A marker write of a replica starting right now has a temp file for milliseconds; one this old was interrupted.
_STALE_MARKER_TEMP_S = 60.0


def open_data_dir(
    data_dir: Path, staging: Staging, db_path: Path | None = None, store: ObjectStore | None = None
) -> RegistryDB:
    """Claim ``data_dir``, import and recover it (see the module docstring); the open database (``db_path``, default
    ``data_dir/registry.db``). ``store``: the object store holding the adapters' files, if any."""
    index, adapters = data_dir / INDEX_FILE, data_dir / ADAPTERS_DIR
    db_path = db_path if db_path is not None else data_dir / DB_FILE
    try:
        claim_data_dir(data_dir, lambda: read_index(index))
    except ForeignDataDir as e:
        raise RegistryError(str(e)) from None
    imported = read_index(index) if index.exists() else None  # a malformed index refuses before anything changes
    if store is not None:
        _check_no_local_adapters(data_dir, imported is not None)
    if imported is None and (not db_path.exists() or db_path.stat().st_size == 0):
        folders = sorted(p.name for p in adapters.iterdir()) if adapters.is_dir() else []
        if folders:  # never read as "nothing is registered": that would orphan every folder
            raise RegistryError(
                f"{db_path} is missing but {adapters} holds {len(folders)} folder(s) ({', '.join(folders[:5])}); "
                f"restore {DB_FILE} from a backup, or move those folders out and register them again with "
                "--startup-adapters; nothing was changed"
            )
    for d in (adapters, staging.root) if store is None else (staging.root,):
        d.mkdir(exist_ok=True)
    db = RegistryDB(db_path)
    try:
        with db.write() as tx:
            tx.ensure_schema(db_path)
            _check_store(tx, db_path, store)
            if imported is not None and tx.meta(_IMPORTED) is None:  # another replica may have imported it already
                _import(tx, imported, index)
            _recover_staging(data_dir, staging)
            if store is None:
                _recover_adapters(tx, data_dir)
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


def _check_no_local_adapters(data_dir: Path, has_index: bool) -> None:
    adapters = data_dir / ADAPTERS_DIR
    folders = sorted(p.name for p in adapters.iterdir()) if adapters.is_dir() else []
    if folders or has_index:
        shown = ", ".join(folders[:5]) or INDEX_FILE
        raise RegistryError(
            f"{data_dir} holds the adapters of a registry on local disk ({shown}); with --adapter-store the adapters "
            "live in the store: use a new --data-dir (and upload the adapters again), or run without --adapter-store; "
            "nothing was changed"
        )


def _check_store(tx: Transaction, db_path: Path, store: ObjectStore | None) -> None:
    stored, store_url = tx.meta(_STORE), store.url if store is not None else None
    if stored == store_url:
        return
    if stored is not None:
        raise RegistryError(
            f"the adapters of {db_path} are stored in {stored}; start with --adapter-store {stored} (this start has "
            f"{'no store' if store_url is None else store_url}); nothing was changed"
        )
    assert store is not None
    if tx.all():
        raise RegistryError(
            f"{db_path} registers adapters stored on local disk, not in {store_url}; use a new --registry-db (and "
            "upload the adapters again), or run without --adapter-store; nothing was changed"
        )
    if store.list_objects(OBJECTS_DIR + "/", limit=1):
        raise RegistryError(
            f"{store.url} holds adapters already, but {db_path} is a new registry database: point --registry-db at the "
            "database of that store (is its shared volume mounted?), or use another bucket or prefix; nothing was "
            "changed"
        )
    tx.set_meta(_STORE, store.url)


def _recover_staging(data_dir: Path, staging: Staging) -> None:
    """Remove what dead operations and interrupted writes left (see the module docstring)."""
    for name in staging.recover():
        _log.warning("removed %s: left over by an interrupted upload or delete", staging.root / name)
    now = time.time()
    for temp in data_dir.iterdir():
        if not (temp.name.startswith(TEMP_PREFIXES) and temp.name.endswith(".tmp")):
            continue
        if temp.name.startswith(".index-") or now - temp.stat().st_mtime > _STALE_MARKER_TEMP_S:
            _log.warning("removing %s: left over by an interrupted index or marker write", temp)
            temp.unlink(missing_ok=True)


def _recover_adapters(tx: Transaction, data_dir: Path) -> None:
    """Make ``adapters/`` agree with the database; removes only what the server made (see the module docstring)."""
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
