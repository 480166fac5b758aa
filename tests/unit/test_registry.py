"""AdapterRegistry: persistence, crash recovery, name checks, upload limits (archives: test_archive.py).

Torch-free: a fake validator stands in for the model layer's checkpoint reader.
"""

import io
import json
import os
import threading
from pathlib import Path

import pytest

from server.adapters.errors import AdapterFormatError
from server.adapters.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    InvalidAdapterName,
    UploadLimits,
    UploadTooLarge,
)
from tests.helpers.registry_fakes import (
    WEIGHTS,
    EndlessStream,
    FakeValidator,
    UnreadableStream,
    add,
    assert_nothing_left,
    config_bytes,
    peft_members,
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
    add(registry, "Beta_2.v1")
    assert registry.get("alpha-1") == rec
    assert [r.name for r in registry.list()] == ["Beta_2.v1", "alpha-1"]
    assert len(registry) == 2 and "alpha-1" in registry and "nope" not in registry
    folder = registry.path("alpha-1")
    assert (folder / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert staging_empty(registry)

    again = AdapterRegistry(tmp_path / "data", validator)
    assert again.list() == registry.list()
    assert again.path("alpha-1") == folder


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
    index_before = (registry.data_dir / "index.json").read_bytes()
    validator.error = AdapterFormatError("missing tensors for q_proj")
    with pytest.raises(AdapterFormatError, match="missing tensors"):
        add(registry, "bad")
    assert_nothing_left(registry, "bad")
    assert (registry.data_dir / "index.json").read_bytes() == index_before


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


# ---- delete, crash recovery, atomic index -------------------------------------------------------------------------
def test_delete_then_restart(tmp_path: Path, registry: AdapterRegistry, validator: FakeValidator) -> None:
    add(registry, "gone")
    add(registry, "stays")
    registry.delete("gone")
    assert "gone" not in registry and not (registry.data_dir / "adapters" / "gone").exists()
    assert staging_empty(registry)
    with pytest.raises(AdapterNotFound):
        registry.delete("gone")
    again = AdapterRegistry(tmp_path / "data", validator)
    assert [r.name for r in again.list()] == ["stays"]
    add(again, "gone")  # the name is free again
    assert "gone" in again


def test_startup_cleans_crash_leftovers(tmp_path: Path, registry: AdapterRegistry, validator: FakeValidator) -> None:
    add(registry, "kept")
    add(registry, "lost")
    add(registry, "half-deleted")
    data = registry.data_dir
    (data / "staging" / "upload-abc" / "adapter").mkdir(parents=True)  # an upload interrupted mid-stream
    (data / "staging" / "upload-abc" / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
    (data / "staging" / "stray-file").write_bytes(b"x")
    (data / ".index-123.tmp").write_text("{half")  # an index write interrupted before os.replace
    for f in (data / "adapters" / "lost").iterdir():  # an indexed folder that vanished (or a commit that crashed
        f.unlink()  # after its index write, before its rename)
    (data / "adapters" / "lost").rmdir()
    (data / "staging" / "deleted-x").mkdir()  # a delete that crashed after its rename, before its index write
    os.rename(data / "adapters" / "half-deleted", data / "staging" / "deleted-x" / "adapter")

    again = AdapterRegistry(data, validator)
    assert [r.name for r in again.list()] == ["kept"]
    assert staging_empty(again)
    assert sorted(p.name for p in (data / "adapters").iterdir()) == ["kept"]
    assert list(json.loads((data / "index.json").read_text())["adapters"]) == ["kept"]
    assert not list(data.glob(".index-*"))


def test_unindexed_folder_is_kept_and_never_replaced(registry: AdapterRegistry, validator: FakeValidator) -> None:
    """The server never leaves an unindexed folder in adapters/, so one it finds there is not its own: kept, and an
    upload of that name is refused (409) instead of deleting it."""
    add(registry, "kept")
    data = registry.data_dir
    mine = data / "adapters" / "hand-copied"
    mine.mkdir()
    (mine / "adapter_config.json").write_bytes(config_bytes())
    (mine / "notes.txt").write_bytes(b"my own notes")

    again = AdapterRegistry(data, validator)
    assert [r.name for r in again.list()] == ["kept"]
    assert (mine / "notes.txt").read_bytes() == b"my own notes"
    with pytest.raises(AdapterExists, match="not a registered adapter"):
        add(again, "hand-copied")
    with pytest.raises(AdapterExists, match="not a registered adapter"):
        again.add_files("hand-copied", UnreadableStream(), UnreadableStream())  # type: ignore[arg-type]
    assert (mine / "notes.txt").read_bytes() == b"my own notes" and staging_empty(again)
    assert sorted(p.name for p in mine.iterdir()) == ["adapter_config.json", "notes.txt"]


def test_malformed_index_refuses_to_start(tmp_path: Path, registry: AdapterRegistry, validator: FakeValidator) -> None:
    add(registry, "precious")
    (registry.data_dir / "index.json").write_text("{not json")
    with pytest.raises(Exception, match="malformed"):
        AdapterRegistry(registry.data_dir, validator)
    assert (registry.data_dir / "adapters" / "precious").is_dir()  # nothing deleted on a bad index


def test_index_write_is_atomic(
    monkeypatch: pytest.MonkeyPatch, registry: AdapterRegistry, validator: FakeValidator
) -> None:
    add(registry, "old")
    index = registry.data_dir / "index.json"
    before = index.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        add(registry, "new")
    with pytest.raises(OSError, match="disk on fire"):
        registry.delete("old")
    monkeypatch.undo()

    assert index.read_bytes() == before
    assert_nothing_left(registry, "new")
    assert "old" in registry and registry.path("old").is_dir()
    assert not list(registry.data_dir.glob(".index-*"))
    again = AdapterRegistry(registry.data_dir, validator)
    assert [r.name for r in again.list()] == ["old"]


@pytest.mark.parametrize("stage", ["weights", "index"])
def test_disk_full_leaves_nothing(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    import errno

    from server.adapters import registry as registry_module

    add(registry, "before")
    full = OSError(errno.ENOSPC, "No space left on device")
    if stage == "weights":
        real = registry_module.receive_file

        def receive(src, path, limit, what, **kw):  # the weights file hits the full disk halfway
            if path.name == "adapter_model.safetensors":
                path.write_bytes(b"partial")
                raise full
            return real(src, path, limit, what, **kw)

        monkeypatch.setattr(registry_module, "receive_file", receive)
    else:
        monkeypatch.setattr(registry_module.json, "dump", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(registry_module.StorageFull, match="full"):
        add(registry, "after")
    monkeypatch.undo()
    assert_nothing_left(registry, "after")
    assert not list(registry.data_dir.glob(".index-*"))
    reopened = AdapterRegistry(registry.data_dir, validator)
    assert [r.name for r in reopened.list()] == ["before"] and "after" not in reopened


FULL_DISK_ERRNOS = ["ENOSPC", "EDQUOT"]


@pytest.mark.parametrize("code", FULL_DISK_ERRNOS)
@pytest.mark.parametrize("stage", ["index", "staging"])
def test_disk_full_during_delete_changes_nothing(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch, stage: str, code: str
) -> None:
    """A delete that cannot write its index (or make its staging folder) answers StorageFull (HTTP 507) and leaves
    the adapter registered, its files intact, the index unchanged, and nothing in staging."""
    import errno
    import tempfile

    from server.adapters import registry as registry_module

    add(registry, "doomed")
    add(registry, "bystander")
    data = registry.data_dir
    index_before = (data / "index.json").read_bytes()
    files_before = {p.name: p.read_bytes() for p in registry.path("doomed").iterdir()}
    full = OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    if stage == "index":
        monkeypatch.setattr(registry_module.json, "dump", lambda *a, **k: (_ for _ in ()).throw(full))
    else:
        monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(registry_module.StorageFull, match="full.*nothing was deleted"):
        registry.delete("doomed")
    monkeypatch.undo()

    assert "doomed" in registry and registry.get("doomed").name == "doomed"
    assert {p.name: p.read_bytes() for p in registry.path("doomed").iterdir()} == files_before
    assert (data / "index.json").read_bytes() == index_before
    assert staging_empty(registry) and not list(data.glob(".index-*"))
    reopened = AdapterRegistry(data, validator)
    assert [r.name for r in reopened.list()] == ["bystander", "doomed"]
    reopened.delete("doomed")  # and with space again, the delete goes through
    assert [r.name for r in reopened.list()] == ["bystander"] and not (data / "adapters" / "doomed").exists()


def test_failed_rename_during_commit_restores_the_index(
    registry: AdapterRegistry, validator: FakeValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit writes the index first; if the folder then cannot be put in place, the old index comes back and
    nothing is left in adapters/ or staging/."""
    add(registry, "before")
    index_before = (registry.data_dir / "index.json").read_bytes()
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if Path(str(dst)).parent == registry.data_dir / "adapters":
            raise OSError("rename refused")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        add(registry, "after")
    monkeypatch.undo()
    assert (registry.data_dir / "index.json").read_bytes() == index_before
    assert_nothing_left(registry, "after")
    assert [r.name for r in AdapterRegistry(registry.data_dir, validator).list()] == ["before"]


def test_a_deleted_name_is_not_found_before_its_folder_moves(
    registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lock-free readers (the engine's loader) must see "not found" once a delete begins, never a registered name
    whose folder is already gone: the first answers 404, the second failed the request with 503 in the soak."""
    add(registry, "doomed")
    seen: list[bool] = []
    move = registry._move_to_staging

    def watching_move(path: Path) -> Path:
        seen.append("doomed" in registry)
        with pytest.raises(KeyError):
            registry.path("doomed")
        return move(path)

    monkeypatch.setattr(registry, "_move_to_staging", watching_move)
    registry.delete("doomed")
    assert seen == [False] and "doomed" not in registry


def test_a_failed_delete_whose_folder_cannot_come_back_leaves_the_name_unregistered(
    registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index write fails and so does moving the folder back: the name must not stay registered over a folder
    that is gone (every request would fail with 503); the index still names it, and a restart drops it."""
    import errno

    from server.adapters import registry as registry_module

    add(registry, "doomed")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(registry_module.json, "dump", lambda *a, **k: (_ for _ in ()).throw(full))
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst).name == "doomed":  # moving the folder back into adapters/
            raise OSError(errno.EIO, "simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(registry_module.os, "rename", rename)
    with pytest.raises(registry_module.StorageFull):
        registry.delete("doomed")
    monkeypatch.undo()
    assert "doomed" not in registry
    assert not (registry.data_dir / "adapters" / "doomed").exists()
