"""The registry's metadata in SQLite (stdlib ``sqlite3``): ``data_dir/registry.db``, one row per registered adapter,
the commit point of every add and delete, shared by every server process on the data directory.

Journal mode: a rollback journal (``journal_mode=DELETE``, ``synchronous=FULL``), not WAL. WAL keeps its index in a
``-shm`` file that every process maps as shared memory, which a network filesystem cannot share between hosts
(SQLite's docs: WAL does not work over a network filesystem); a rollback journal needs only POSIX advisory locks
(fcntl), which a local filesystem, and NFSv4 (or v3 with a working lock manager), provide. What that costs here is
small: a commit blocks readers for the few milliseconds it writes, and a writer waits for reads in flight; each
statement is one short query over a few hundred rows at most. A commit is durable when COMMIT returns.

Writes are ``BEGIN IMMEDIATE`` transactions (the write lock is taken up front, so two writers never deadlock
upgrading a read lock) on a write connection of their own, with a busy timeout of ``BUSY_TIMEOUT_S``: a writer that
finds another process's transaction open waits for it, it does not fail. Within a process a ``threading.Lock``
serialises writers on that connection.

Reads are on the hot path (every generation request looks its adapter up), so each process keeps the records in a
dict and re-reads the table only when ``PRAGMA data_version`` on its read connection says that another connection
(another process's, or this process's write connection) committed since: the check is one shared lock and a read of
the file's change counter, ~12 us on a local disk (on NFS, a lock round trip). So a change committed anywhere is seen
by the next read in every process.
"""

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from server.adapters.registry_records import AdapterRecord, RegistryError

BUSY_TIMEOUT_S = 30.0  # how long a write (or a read during another process's commit) waits for the lock
SCHEMA_VERSION = 1  # PRAGMA user_version of registry.db
_COLUMNS = "name, uid, rank, alpha, target_modules, size_bytes, sha256, created_at, source"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS adapters (
        name TEXT PRIMARY KEY NOT NULL,
        uid TEXT NOT NULL UNIQUE,
        rank INTEGER NOT NULL,
        alpha REAL NOT NULL,
        target_modules TEXT NOT NULL,  -- JSON: a list of module names, or one string (a regex or "all-linear")
        size_bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('upload', 'startup'))
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
)


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's "database or disk is full" (SQLITE_FULL): the disk or quota ran out under the database."""
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class Transaction:
    """The write connection inside ``BEGIN IMMEDIATE``: reads see this transaction's own changes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def get(self, name: str) -> AdapterRecord | None:
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else _record(row)

    def all(self) -> dict[str, AdapterRecord]:
        return _load(self._conn)

    def insert(self, record: AdapterRecord) -> None:
        self._conn.execute(
            f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.name, record.uid, record.rank, float(record.alpha), json.dumps(record.target_modules),
             record.size_bytes, record.sha256, record.created_at, record.source),
        )  # fmt: skip

    def delete(self, name: str) -> None:
        self._conn.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def ensure_schema(self, path: Path) -> None:
        """Create the tables of a new database; refuse one written by a newer schema."""
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"{path} was written by a newer lora-server (schema version {version}, this one reads "
                f"{SCHEMA_VERSION}); run that version; nothing was changed"
            )
        for statement in _SCHEMA:
            self._conn.execute(statement)
        if version < SCHEMA_VERSION:
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class RegistryDB:
    """``registry.db``: cached reads (``records``) and write transactions (``write``); thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._write_conn = self._connect()
        self._read_conn = self._connect()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._seen_version: int | None = None
        self._records: dict[str, AdapterRecord] = {}

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; writes say BEGIN IMMEDIATE themselves, and a read outside
        # a transaction lets PRAGMA data_version see other connections' commits.
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as e:  # not a database, or locked by a writer for longer than the timeout
            raise RegistryError(f"{self.path} cannot be opened as the registry's database ({e})") from e
        if str(mode).lower() != "delete":
            raise RegistryError(f"{self.path} is in journal mode {mode!r} and could not be set to 'delete'")
        return conn

    def records(self) -> dict[str, AdapterRecord]:
        """Every registered adapter by name, as last committed by any process. The dict is never mutated: a change
        swaps in a new one, so a caller may keep iterating what it got."""
        with self._read_lock:
            version = int(self._read_conn.execute("PRAGMA data_version").fetchone()[0])
            if version != self._seen_version:
                # A commit between the PRAGMA and this SELECT is read now and read again next time: harmless.
                self._records = _load(self._read_conn)
                self._seen_version = version
            return self._records

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """A write transaction, committed when the block ends and rolled back when it (or COMMIT) raises."""
        with self._write_lock:
            conn = self._write_conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(conn)
                self._commit()
            except BaseException:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _commit(self) -> None:
        # A method of its own so that a test can make it fail as a full disk would.
        self._write_conn.execute("COMMIT")

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._write_conn.close()
            self._read_conn.close()


def _load(conn: sqlite3.Connection) -> dict[str, AdapterRecord]:
    return {row[0]: _record(row) for row in conn.execute(f"SELECT {_COLUMNS} FROM adapters").fetchall()}


def _record(row: Any) -> AdapterRecord:
    name, uid, rank, alpha, targets, size_bytes, sha256, created_at, source = row
    targets = json.loads(targets)
    return AdapterRecord(name, rank, alpha, targets, size_bytes, sha256, created_at, source, uid)
