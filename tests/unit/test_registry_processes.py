"""Several server processes on one data directory (issue 17: Ray Serve replicas sharing one adapter store), with
real separate processes (multiprocessing, "spawn"): concurrent uploads, one winner per name, deletes and re-uploads
seen at the next read, a starting process that leaves another's upload alone, a SIGKILLed upload cleaned at the next
start, and concurrent starts on a layout-1 folder that import it once. Torch-free, a few seconds in all.
"""

import multiprocessing as mp
import os
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from server.adapters import registry as registry_module
from server.adapters import registry_staging
from server.adapters.data_dir import MARKER_FILE
from server.adapters.registry import AdapterExists, AdapterNotFound, AdapterRegistry
from server.adapters.registry_staging import Staging
from tests.helpers.registry_fakes import (
    FakeValidator,
    add,
    db_rows,
    pending_marks,
    staging_empty,
    write_layout_1,
)

CTX = mp.get_context("spawn")  # a fresh interpreter each: nothing shared with this process but the data directory
TIMEOUT_S = 60


# ---- what runs in the other processes (top level, so that "spawn" can import it) ----------------------------------
class PausingValidator(FakeValidator):
    """Says when an upload is being validated (its files are in its staging folder) and waits to be let go."""

    def __init__(self, entered: Any, release: Any) -> None:
        super().__init__()
        self.entered, self.release = entered, release

    def __call__(self, folder: Path) -> Any:
        self.entered.set()
        self.release.wait(TIMEOUT_S)
        return super().__call__(folder)


def upload_many(data_dir: str, names: list[str], start: Any, results: Any) -> None:
    """Start a registry (every process at once, on a folder that may not exist yet), then upload ``names``."""
    start.wait(TIMEOUT_S)
    reg = AdapterRegistry(Path(data_dir), FakeValidator())
    results.put({name: add(reg, name).uid for name in names})


def upload_racing(data_dir: str, name: str, both_validating: Any, results: Any) -> None:
    """Upload ``name`` and validate it only once the other process is validating its own upload of ``name``."""
    validator = FakeValidator()
    reg = AdapterRegistry(Path(data_dir), validator)
    validator.barrier = both_validating  # past the early name check in both processes before either commits
    try:
        results.put(("ok", add(reg, name).uid))
    except AdapterExists as e:
        results.put(("AdapterExists", str(e)))


def serve_commands(data_dir: str, conn: Connection, entered: Any, release: Any, pause: str) -> None:
    """A replica's registry driven over ``conn``: ("add"|"delete"|"uid", name) -> ("ok", value) or ("error", type).
    ``pause``: "validate" stops each add in validation, "commit" inside its write transaction, after the rename."""
    validator = PausingValidator(entered, release) if pause == "validate" else FakeValidator()
    if pause == "commit":
        real_fsync_dir = registry_module.fsync_dir

        def fsync_dir(path: Path) -> None:
            real_fsync_dir(path)
            if path.name == "adapters":  # renamed into adapters/, the row inserted, not committed
                entered.set()
                release.wait(TIMEOUT_S)

        registry_module.fsync_dir = fsync_dir  # type: ignore[assignment]
    reg = AdapterRegistry(Path(data_dir), validator)
    conn.send(("ready", os.getpid()))
    while (message := conn.recv()) != "stop":
        command, name = message
        try:
            if command == "add":
                conn.send(("ok", add(reg, name).uid))
            elif command == "delete":
                conn.send(("ok", reg.delete(name)))
            else:
                conn.send(("ok", reg.get(name).uid))
        except Exception as e:
            conn.send(("error", type(e).__name__))


class Replica:
    """Another process with its own AdapterRegistry on ``data_dir``."""

    def __init__(self, data_dir: Path, pause: str = "") -> None:
        self.entered, self.release = CTX.Event(), CTX.Event()
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=serve_commands, args=(str(data_dir), child, self.entered, self.release, pause))
        self.proc.start()
        assert self.conn.poll(TIMEOUT_S) and self.conn.recv()[0] == "ready"

    def send(self, command: str, name: str) -> None:
        self.conn.send((command, name))

    def answer(self) -> tuple[str, Any]:
        assert self.conn.poll(TIMEOUT_S), "the replica did not answer"
        return self.conn.recv()

    def call(self, command: str, name: str) -> Any:
        self.send(command, name)
        status, value = self.answer()
        assert status == "ok", value
        return value

    def stop(self) -> None:
        if self.proc.is_alive():
            self.release.set()
            self.conn.send("stop")
            self.proc.join(TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(TIMEOUT_S)


def run_all(procs: list[Any], start: Any, results: Any) -> list[Any]:
    """Start ``procs`` (then set ``start``), and return what each put in ``results`` once all exited cleanly."""
    for p in procs:
        p.start()
    if start is not None:
        start.set()
    try:
        out = [results.get(timeout=TIMEOUT_S) for _ in procs]  # before join: a child exits once its queue drains
    finally:
        for p in procs:
            p.join(TIMEOUT_S)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return out


# ---- the tests ----------------------------------------------------------------------------------------------------
def test_concurrent_uploads_of_different_names_all_land(tmp_path: Path) -> None:
    """Four processes start at once on a folder that does not exist yet, then upload three names each at once."""
    data = tmp_path / "data"
    start, results = CTX.Event(), CTX.Queue()
    names = [[f"p{p}-a{i}" for i in range(3)] for p in range(4)]
    procs = [CTX.Process(target=upload_many, args=(str(data), n, start, results)) for n in names]
    uids = {k: v for r in run_all(procs, start, results) for k, v in r.items()}

    everyone = sorted(n for group in names for n in group)
    assert sorted(db_rows(data)) == everyone and {n: r["uid"] for n, r in db_rows(data).items()} == uids
    reg = AdapterRegistry(data, FakeValidator())
    assert [r.name for r in reg.list()] == everyone and len(set(uids.values())) == 12
    assert all((reg.path(n) / "adapter_model.safetensors").is_file() for n in everyone)
    assert staging_empty(reg) and pending_marks(data) == []


def test_two_processes_uploading_one_name_give_one_winner(tmp_path: Path) -> None:
    data = tmp_path / "data"
    AdapterRegistry(data, FakeValidator())  # made once, so both start on the same folder
    both_validating, results = CTX.Barrier(2), CTX.Queue()
    procs = [CTX.Process(target=upload_racing, args=(str(data), "race", both_validating, results)) for _ in range(2)]
    outcomes = sorted(run_all(procs, None, results))
    assert [o[0] for o in outcomes] == ["AdapterExists", "ok"], outcomes
    assert list(db_rows(data)) == ["race"] and db_rows(data)["race"]["uid"] == outcomes[1][1]
    assert [p.name for p in (data / "adapters").iterdir()] == ["race"]
    assert not any((data / "staging").iterdir()) and pending_marks(data) == []


def test_a_delete_and_a_re_upload_are_seen_at_the_next_read(tmp_path: Path) -> None:
    """Process A adds, deletes and re-adds; this process (B) reads right after each answer, without waiting."""
    data = tmp_path / "data"
    here = AdapterRegistry(data, FakeValidator())
    a = Replica(data)
    try:
        first = a.call("add", "x")
        assert here.get("x").uid == first and "x" in here and len(here) == 1
        a.call("delete", "x")
        with pytest.raises(AdapterNotFound):
            here.get("x")
        assert "x" not in here and here.list() == []
        second = a.call("add", "x")
        assert here.get("x").uid == second != first
        add(here, "y")  # and the other way round
        assert a.call("uid", "y") == here.get("y").uid
        here.delete("y")
        a.send("uid", "y")
        assert a.answer() == ("error", "AdapterNotFound")
    finally:
        a.stop()


def test_a_starting_process_leaves_an_upload_in_progress_alone(tmp_path: Path) -> None:
    """A is validating an upload (its files in its staging folder) when B starts and recovers: the upload survives
    and commits."""
    data = tmp_path / "data"
    AdapterRegistry(data, FakeValidator())
    a = Replica(data, pause="validate")
    try:
        a.send("add", "slow")
        assert a.entered.wait(TIMEOUT_S)
        in_progress = sorted(p.name for p in (data / "staging").iterdir())
        assert len(in_progress) == 2  # upload-<uuid>/ and its .lock
        b = AdapterRegistry(data, FakeValidator())  # startup recovery, while A's upload is in flight
        assert sorted(p.name for p in (data / "staging").iterdir()) == in_progress
        a.release.set()
        status, uid = a.answer()
        assert status == "ok" and b.get("slow").uid == uid
        assert (b.path("slow") / "adapter_model.safetensors").is_file() and staging_empty(b)
    finally:
        a.stop()


@pytest.mark.parametrize("where", ["validate", "commit"])
def test_a_killed_upload_is_cleaned_at_the_next_start(tmp_path: Path, where: str) -> None:
    """SIGKILL while validating (files in staging) or inside the write transaction (the folder renamed into
    adapters/, the row inserted, the database locked, no commit): the next start rolls the transaction back, removes
    the leftovers, and the name is free."""
    data = tmp_path / "data"
    add(AdapterRegistry(data, FakeValidator()), "bystander")
    a = Replica(data, pause=where)
    try:
        a.send("add", "killed")
        assert a.entered.wait(TIMEOUT_S)
        if where == "commit":
            assert (data / "adapters" / "killed").is_dir() and (data / "registry.db-journal").exists()
        else:
            assert any((data / "staging").iterdir())
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.join(TIMEOUT_S)
        assert a.proc.exitcode == -signal.SIGKILL
    finally:
        a.stop()

    reg = AdapterRegistry(data, FakeValidator())
    assert [r.name for r in reg.list()] == ["bystander"] and list(db_rows(data)) == ["bystander"]
    assert sorted(p.name for p in (data / "adapters").iterdir()) == ["bystander"]
    assert staging_empty(reg) and pending_marks(data) == []
    add(reg, "killed")
    assert "killed" in reg


def test_processes_starting_at_once_on_layout_1_import_it_once(tmp_path: Path) -> None:
    """Three processes start at once on a layout-1 folder (index.json, marker version 1): one imports it, all see
    the same records and uids, index.json is gone and the marker says layout 2."""
    data = tmp_path / "data"
    records = write_layout_1(data, ["alpha", "beta", "gamma"])
    start, results = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=upload_many, args=(str(data), [f"new-{i}"], start, results)) for i in range(3)]
    run_all(procs, start, results)

    reg = AdapterRegistry(data, FakeValidator())
    assert {r.name: r.to_json() for r in reg.list() if not r.name.startswith("new-")} == records
    assert sorted(db_rows(data)) == ["alpha", "beta", "gamma", "new-0", "new-1", "new-2"]
    assert len({r.uid for r in reg.list()}) == 6
    assert not (data / "index.json").exists() and '"version": 2' in (data / MARKER_FILE).read_text()


def test_a_writer_waits_for_another_processs_transaction(tmp_path: Path) -> None:
    """A is inside its write transaction (the folder renamed in, not committed) when this process adds another
    name: the add waits for A's commit (BEGIN IMMEDIATE, busy timeout), it does not fail, and both land."""
    data = tmp_path / "data"
    here = AdapterRegistry(data, FakeValidator())
    a = Replica(data, pause="commit")
    try:
        a.send("add", "first")
        assert a.entered.wait(TIMEOUT_S)
        outcome: list[object] = []
        writer = threading.Thread(target=lambda: outcome.append(add(here, "second").uid))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and outcome == []  # waiting on A's write lock
        a.release.set()
        writer.join(TIMEOUT_S)
        status, _ = a.answer()
        assert status == "ok" and len(outcome) == 1
        assert [r.name for r in here.list()] == ["first", "second"] == sorted(db_rows(data))
    finally:
        a.stop()


def test_a_lock_file_taken_by_a_recovery_before_its_owner_locks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of registry_staging's docstring, staged in one process (flocks on separate open files exclude each
    other as across processes): a recovery takes and removes a lock file its owner made and has not locked yet; the
    owner notices and starts over, and a later recovery leaves its folder alone."""
    staging = tmp_path / "staging"
    staging.mkdir()
    owner, other = Staging(staging), Staging(staging)
    real_flock = registry_staging.fcntl.flock
    raced: list[list[str]] = []

    def flock(fd: int, operation: int) -> None:
        if not raced:  # the owner's first flock, between its O_EXCL create and the lock
            raced.append([])
            raced[0] = other.recover()  # (whose own flock calls come back here and go straight through)
        real_flock(fd, operation)

    monkeypatch.setattr(registry_staging.fcntl, "flock", flock)
    with owner.operation("upload") as work:
        monkeypatch.undo()
        assert len(raced[0]) == 1 and raced[0][0] != work.name  # the first lock file, removed by the recovery
        (work / "part").write_bytes(b"in progress")
        assert other.recover() == [] and (work / "part").read_bytes() == b"in progress"
        assert sorted(p.name for p in staging.iterdir()) == [work.name, work.name + ".lock"]
    assert list(staging.iterdir()) == []
