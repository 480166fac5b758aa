"""AdapterRegistry: persistence in registry.db, crash recovery, name checks, upload limits (archives:
test_archive.py; several processes on one data directory: test_registry_processes.py).

Torch-free: a fake validator stands in for the model layer's checkpoint reader.
"""

import errno
import io
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from server.adapters import registry as registry_module
from server.adapters.errors import AdapterFormatError
from server.adapters.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    InvalidAdapterName,
    RegistryError,
    StorageFull,
    UploadLimits,
    UploadTooLarge,
)
from server.adapters.registry_staging import PENDING_FILE
from tests.helpers.registry_fakes import (
    WEIGHTS,
    EndlessStream,
    FakeValidator,
    UnreadableStream,
    add,
    assert_nothing_left,
    config_bytes,
    db_rows,
    disk_full,
    fail_commits,
    peft_members,
    pending_marks,
    snapshot,
    staging_empty,
)


# ---- round trip, persistence --------------------------------------------------------------------------------------
def test_round_trip_and_restart(tmp_path: Path, registry: AdapterRegistry, validator: FakeValidator) -> None:
    rec = add(registry, "alpha-1")
    assert (rec.name, rec.rank, rec.alpha, rec.target_modules, rec.source) == (
        "alpha-1",
        8,
        16,
        ["q_proj", "v_proj"],
        "upload",
    )
    assert rec.size_bytes == len(config_bytes()) + len(WEIGHTS)
    assert len(rec.sha256) == 64 and rec.created_at.endswith("Z") and "T" in rec.created_at
    assert json.loads(json.dumps(rec.to_json())) == rec.to_json()
    assert len(rec.uid) == 32 and "uid" not in rec.to_json()  # the API's adapter JSON keeps its shape
    assert db_rows(tmp_path / "data")["alpha-1"] == {
        **rec.to_json(),
        "uid": rec.uid,
        "target_modules": '["q_proj", "v_proj"]',
    }
    add(registry, "Beta_2.v1")
    assert registry.get("alpha-1") == rec
    assert [r.name for r in registry.list()] == ["Beta_2.v1", "alpha-1"]
    assert len(registry) == 2 and "alpha-1" in registry and "nope" not in registry
    folder = registry.path("alpha-1")
    assert (folder / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert staging_empty(registry)

    again = AdapterRegistry(tmp_path / "data", validator)
    assert again.list() == registry.list()  # uids included
    assert again.path("alpha-1") == folder
    assert not (tmp_path / "data" / "index.json").exists() and pending_marks(tmp_path / "data") == []


def test_unknown_name_is_a_key_error(registry: AdapterRegistry) -> None:
    for call in (registry.get, registry.path, registry.delete):
        with pytest.raises(KeyError):
            call("missing")
    with pytest.raises(AdapterNotFound) as info:
        registry.get("missing")
    assert str(info.value) == "adapter 'missing' not found"  # no KeyError-style quotes around the message


def test_add_folder(tmp_path: Path, registry: AdapterRegistry) -> None:
    src = tmp_path / "peft"
    src.mkdir()
    for name, data in {**peft_members(), "README.md": b"# hi", "training_args.json": b"{}"}.items():
        (src / name).write_bytes(data)
    rec = registry.add_folder("boot", src)
    assert rec.source == "startup"
    assert sorted(p.name for p in registry.path("boot").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with pytest.raises(AdapterFormatError):
        registry.add_folder("other", tmp_path / "missing")


# ---- duplicates ---------------------------------------------------------------------------------------------------
def test_duplicate_name_is_refused_before_reading(registry: AdapterRegistry) -> None:
    first = add(registry, "dup")
    with pytest.raises(AdapterExists):
        registry.add_files("dup", UnreadableStream(), UnreadableStream())  # type: ignore[arg-type]
    assert registry.get("dup") == first and staging_empty(registry)


def test_concurrent_duplicate_gives_one_winner(registry: AdapterRegistry, validator: FakeValidator) -> None:
    validator.barrier = threading.Barrier(2)  # both uploads are past the early check and validating at once
    results: list[object] = []

    def upload() -> None:
        try:
            results.append(add(registry, "race"))
        except AdapterExists as e:
            results.append(e)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(type(r).__name__ for r in results) == ["AdapterExists", "AdapterRecord"]
    assert len(validator.seen) == 2 and len(registry) == 1
    assert staging_empty(registry)
    assert [p.name for p in (registry.data_dir / "adapters").iterdir()] == ["race"]


# ---- names --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../x", "/abs", "a/b", "a\\b", "a\x00b", "x" * 65, "..", "a..b", "", ".hidden", "-x", "é", "ａ", "a\n", 7]
)
def test_invalid_names(registry: AdapterRegistry, name: object) -> None:
    with pytest.raises(InvalidAdapterName):
        registry.add_files(name, UnreadableStream(), UnreadableStream())  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapterName):
        registry.add_archive(name, UnreadableStream())  # type: ignore[arg-type]
    assert len(registry) == 0 and staging_empty(registry)


def test_longest_name_is_valid(registry: AdapterRegistry) -> None:
    add(registry, "x" * 64)
    assert "x" * 64 in registry


# ---- validation failures and limits -------------------------------------------------------------------------------
def test_validation_failure_leaves_nothing(registry: AdapterRegistry, validator: FakeValidator) -> None:
    add(registry, "keep")
    rows_before = db_rows(registry.data_dir)
    validator.error = AdapterFormatError("missing tensors for q_proj")
    with pytest.raises(AdapterFormatError, match="missing tensors"):
        add(registry, "bad")
    assert_nothing_left(registry, "bad")
    assert db_rows(registry.data_dir) == rows_before


@pytest.mark.parametrize("which", ["config", "weights"])
def test_oversize_file_stops_reading_early(tmp_path: Path, validator: FakeValidator, which: str) -> None:
    limits = UploadLimits(max_file_bytes=3 * 2**20, max_config_bytes=2**16)
    reg = AdapterRegistry(tmp_path / "data", validator, limits)
    endless = EndlessStream()
    config, weights = (endless, io.BytesIO(WEIGHTS)) if which == "config" else (io.BytesIO(config_bytes()), endless)
    with pytest.raises(UploadTooLarge):
        reg.add_files("big", config, weights)  # type: ignore[arg-type]
    cap = limits.max_config_bytes if which == "config" else limits.max_file_bytes
    assert endless.read_bytes == cap + 1
    assert validator.seen == []
    assert_nothing_left(reg, "big")


# ---- delete, several registries on one folder ---------------------------------------------------------------------
def test_delete_then_restart(tmp_path: Path, registry: AdapterRegistry, validator: FakeValidator) -> None:
    add(registry, "gone")
    add(registry, "stays")
    registry.delete("gone")
    assert "gone" not in registry and not (registry.data_dir / "adapters" / "gone").exists()
    assert staging_empty(registry) and list(db_rows(registry.data_dir)) == ["stays"]
    with pytest.raises(AdapterNotFound):
        registry.delete("gone")
    again = AdapterRegistry(tmp_path / "data", validator)
    assert [r.name for r in again.list()] == ["stays"]
    add(again, "gone")  # the name is free again
    assert "gone" in again


def test_two_registries_on_one_folder_see_each_others_commits(
    registry: AdapterRegistry, validator: FakeValidator
) -> None:
    """Two registries on one folder (as two processes have; tests/unit/test_registry_processes.py does it with real
    processes): each read reflects the other's last commit, and a re-upload under a deleted name has a new uid."""
    other = AdapterRegistry(registry.data_dir, validator)
    first = add(registry, "shared")
    assert other.get("shared") == first and "shared" in other and len(other) == 1
    other.delete("shared")
    with pytest.raises(AdapterNotFound):
        registry.get("shared")
    second = add(other, "shared")
    assert registry.get("shared").uid == second.uid != first.uid
    with pytest.raises(AdapterExists):
        add(registry, "shared")


# ---- crash recovery -----------------------------------------------------------------------------------------------
def test_startup_cleans_crash_leftovers(tmp_path: Path, registry: AdapterRegistry, validator: FakeValidator) -> None:
    for name in ("kept", "lost", "half-deleted", "mark-left"):
        add(registry, name)
    data = registry.data_dir
    adapters, staging = data / "adapters", data / "staging"
    (staging / "upload-abc" / "adapter").mkdir(parents=True)  # an upload of a version before per-operation locks
    (staging / "upload-abc" / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
    (staging / "stray-file").write_bytes(b"x")
    (staging / f"upload-{'d' * 32}").mkdir()  # an upload whose process died: its lock file is there, unlocked
    (staging / f"upload-{'d' * 32}.lock").touch()
    (staging / f"deleted-{'e' * 32}.lock").touch()  # a process that died before making its folder
    (data / ".index-123.tmp").write_text("{half")  # an index write of layout 1 interrupted before os.replace
    shutil.rmtree(adapters / "lost")  # a registered folder that vanished
    rows = db_rows(data)
    with sqlite3.connect(data / "registry.db") as conn:  # a delete that crashed after its commit, before the move
        conn.execute("DELETE FROM adapters WHERE name = 'half-deleted'")
    (adapters / "half-deleted" / PENDING_FILE).write_text(str(rows["half-deleted"]["uid"]))
    (adapters / "half-added").mkdir()  # an add that crashed after its rename, before its commit (rolled back)
    (adapters / "half-added" / PENDING_FILE).write_text("f" * 32)
    (adapters / "mark-left" / PENDING_FILE).write_text(str(rows["mark-left"]["uid"]))  # committed, mark not dropped

    again = AdapterRegistry(data, validator)
    assert [r.name for r in again.list()] == ["kept", "mark-left"] and list(db_rows(data)) == ["kept", "mark-left"]
    assert staging_empty(again) and pending_marks(data) == []
    assert sorted(p.name for p in adapters.iterdir()) == ["kept", "mark-left"]
    assert not list(data.glob(".index-*"))


def test_unindexed_folder_is_kept_and_never_replaced(registry: AdapterRegistry, validator: FakeValidator) -> None:
    """The server leaves no unregistered folder in adapters/ without its mark, so one it finds there is not its own:
    kept, and an upload of that name is refused (409) instead of deleting it; a mark file that the server did not
    write (not a uid) does not make a folder the server's."""
    add(registry, "kept")
    data = registry.data_dir
    mine = data / "adapters" / "hand-copied"
    mine.mkdir()
    (mine / "adapter_config.json").write_bytes(config_bytes())
    (mine / "notes.txt").write_bytes(b"my own notes")
    (mine / PENDING_FILE).write_text("not a uid")

    again = AdapterRegistry(data, validator)
    assert [r.name for r in again.list()] == ["kept"]
    assert (mine / "notes.txt").read_bytes() == b"my own notes"
    with pytest.raises(AdapterExists, match="not a registered adapter"):
        add(again, "hand-copied")
    with pytest.raises(AdapterExists, match="not a registered adapter"):
        again.add_files("hand-copied", UnreadableStream(), UnreadableStream())  # type: ignore[arg-type]
    assert (mine / "notes.txt").read_bytes() == b"my own notes" and staging_empty(again)
    assert sorted(p.name for p in mine.iterdir()) == [PENDING_FILE, "adapter_config.json", "notes.txt"]


def test_unreadable_database_refuses_to_start(registry: AdapterRegistry, validator: FakeValidator) -> None:
    add(registry, "precious")
    (registry.data_dir / "registry.db").write_bytes(b"not a database" * 100)
    before = snapshot(registry.data_dir)
    with pytest.raises(RegistryError, match="registry.db cannot be opened"):
        AdapterRegistry(registry.data_dir, validator)
    assert snapshot(registry.data_dir) == before  # nothing deleted on a bad database


# ---- failed writes ------------------------------------------------------------------------------------------------
def test_failed_commit_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, registry: AdapterRegistry, validator: FakeValidator
) -> None:
    """COMMIT fails (an I/O error): the add's folder goes back out of adapters/, the delete's mark comes off."""
    add(registry, "old")
    rows_before = db_rows(registry.data_dir)
    fail_commits(monkeypatch, sqlite3.SQLITE_IOERR)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        add(registry, "new")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        registry.delete("old")
    monkeypatch.undo()

    assert db_rows(registry.data_dir) == rows_before and pending_marks(registry.data_dir) == []
    assert_nothing_left(registry, "new")
    assert "old" in registry and registry.path("old").is_dir()
    again = AdapterRegistry(registry.data_dir, validator)
    assert [r.name for r in again.list()] == ["old"]


@pytest.mark.parametrize("stage", ["weights", "commit"])
def test_disk_full_leaves_nothing(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    add(registry, "before")
    if stage == "weights":
        real = registry_module.receive_file

        def receive(src, path, limit, what, **kw):  # the weights file hits the full disk halfway
            if path.name == "adapter_model.safetensors":
                path.write_bytes(b"partial")
                raise disk_full()
            return real(src, path, limit, what, **kw)

        monkeypatch.setattr(registry_module, "receive_file", receive)
    else:
        fail_commits(monkeypatch)  # SQLite: "database or disk is full"
    with pytest.raises(StorageFull, match="full.*nothing was stored"):
        add(registry, "after")
    monkeypatch.undo()
    assert_nothing_left(registry, "after")
    reopened = AdapterRegistry(registry.data_dir, validator)
    assert [r.name for r in reopened.list()] == ["before"] and "after" not in reopened


FULL_DISK_ERRNOS = ["ENOSPC", "EDQUOT"]


@pytest.mark.parametrize("code", FULL_DISK_ERRNOS)
@pytest.mark.parametrize("stage", ["commit", "mark", "staging"])
def test_disk_full_during_delete_changes_nothing(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch, stage: str, code: str
) -> None:
    """A delete that cannot commit (or write its mark, or make its staging folder) answers StorageFull (HTTP 507)
    and leaves the adapter registered, its files intact, the database unchanged, and nothing in staging."""
    add(registry, "doomed")
    add(registry, "bystander")
    data = registry.data_dir
    rows_before = db_rows(data)
    files_before = {p.name: p.read_bytes() for p in registry.path("doomed").iterdir()}
    full = disk_full(code)
    if stage == "commit":
        fail_commits(monkeypatch)
    elif stage == "mark":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(full))
    else:
        monkeypatch.setattr(os, "mkdir", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(StorageFull, match="full.*nothing was deleted"):
        registry.delete("doomed")
    monkeypatch.undo()

    assert "doomed" in registry and registry.get("doomed").name == "doomed"
    assert {p.name: p.read_bytes() for p in registry.path("doomed").iterdir()} == files_before
    assert db_rows(data) == rows_before and staging_empty(registry)
    reopened = AdapterRegistry(data, validator)
    assert [r.name for r in reopened.list()] == ["bystander", "doomed"]
    reopened.delete("doomed")  # and with space again, the delete goes through
    assert [r.name for r in reopened.list()] == ["bystander"] and not (data / "adapters" / "doomed").exists()


def test_failed_rename_during_commit_rolls_back(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit inserts the row first; if the folder then cannot be put in place, the transaction rolls back and
    nothing is left in adapters/ or staging/."""
    add(registry, "before")
    rows_before = db_rows(registry.data_dir)
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if Path(str(dst)).parent == registry.data_dir / "adapters":
            raise OSError("rename refused")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        add(registry, "after")
    monkeypatch.undo()
    assert db_rows(registry.data_dir) == rows_before
    assert_nothing_left(registry, "after")
    assert [r.name for r in AdapterRegistry(registry.data_dir, validator).list()] == ["before"]


def test_a_deleted_name_is_not_found_before_its_folder_moves(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers (the engine's loader, in this process or another) must see "not found" once a delete moves the
    folder, never a registered name whose folder is already gone: the first answers 404, the second failed the
    request with 503 in the soak."""
    add(registry, "doomed")
    other = AdapterRegistry(registry.data_dir, validator)
    seen: list[bool] = []
    real_rename = os.rename

    def watching_rename(src: object, dst: object) -> None:
        if Path(str(src)) == registry.data_dir / "adapters" / "doomed":
            seen.extend(["doomed" in registry, "doomed" in other])
            with pytest.raises(KeyError):
                registry.path("doomed")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", watching_rename)
    registry.delete("doomed")
    assert seen == [False, False] and "doomed" not in registry


def test_a_delete_whose_folder_cannot_move_out_still_removes_it(
    registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete is committed and then the folder cannot be moved into staging: it is removed where it is, so no
    unregistered folder stays in adapters/ (it is marked, so a crash here would have a restart remove it)."""
    add(registry, "doomed")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == "doomed":
            raise OSError(errno.EIO, "simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    registry.delete("doomed")
    monkeypatch.undo()
    assert "doomed" not in registry and "doomed" not in db_rows(registry.data_dir)
    assert not (registry.data_dir / "adapters" / "doomed").exists() and staging_empty(registry)
