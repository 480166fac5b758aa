"""The data directory is the server's own: startup never deletes a file the server did not create.

The reported case: ``--data-dir .`` in a folder whose ``adapters/`` holds the user's own PEFT saves (and the default
``--startup-adapters adapters`` pointing at them) deleted them all, because a missing index.json read as "nothing is
registered" and every unindexed folder was removed. Also: layout 1 (index.json) is imported into registry.db (layout
2). Torch-free; the CLI's refusal, through a real process, is in e2e/test_data_dir_cli.py.
"""

import json
import sqlite3
from pathlib import Path

import pytest

from server.adapters.data_dir import MARKER_FILE, MARKER_FORMAT, MARKER_VERSION
from server.adapters.registry import AdapterRegistry, RegistryError
from tests.helpers.registry_fakes import (
    WEIGHTS,
    FakeValidator,
    add,
    config_bytes,
    db_rows,
    snapshot,
    user_project,
    write_layout_1,
)


def marker(root: Path) -> dict[str, object]:
    return json.loads((root / MARKER_FILE).read_text())


# ---- the reported case --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["project", "adapters-only"])
def test_user_folders_are_never_deleted(tmp_path: Path, validator: FakeValidator, layout: str) -> None:
    root = user_project(tmp_path / "project")
    if layout == "adapters-only":  # nothing beside adapters/: still the user's, since there is no index or marker
        (root / "train.py").unlink()
    before = snapshot(root)
    with pytest.raises(RegistryError, match="not created by lora-server") as info:
        AdapterRegistry(root, validator)
    assert "--data-dir" in str(info.value) and "nothing was changed" in str(info.value)
    assert snapshot(root) == before  # no file removed, none added (no marker, no staging/, no registry.db)


@pytest.mark.parametrize(
    "layout",
    ["notes-file", "foreign-index", "index-and-more", "adapters-is-a-link", "non-empty-staging-no-index"],
)
def test_foreign_folders_are_refused_untouched(tmp_path: Path, validator: FakeValidator, layout: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if layout == "notes-file":
        (root / "notes.txt").write_text("mine")
    elif layout == "foreign-index":  # some other tool's index.json beside an adapters/ folder
        (root / "index.json").write_text(json.dumps({"pages": ["a", "b"]}))
        (root / "adapters" / "x").mkdir(parents=True)
    elif layout == "index-and-more":  # a valid registry index, but files beside it the server never writes
        (root / "index.json").write_text(json.dumps({"version": 1, "adapters": {}}))
        (root / "adapters").mkdir()
        (root / "README.md").write_text("mine")
    elif layout == "adapters-is-a-link":
        (root / "index.json").write_text(json.dumps({"version": 1, "adapters": {}}))
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
        (root / "adapters").symlink_to(tmp_path / "elsewhere")
    else:
        (root / "staging").mkdir()
        (root / "staging" / "draft.txt").write_text("mine")
    before, elsewhere = snapshot(root), snapshot(tmp_path)
    with pytest.raises(RegistryError):
        AdapterRegistry(root, validator)
    assert snapshot(root) == before and snapshot(tmp_path) == elsewhere


def test_a_file_as_data_dir_is_refused(tmp_path: Path, validator: FakeValidator) -> None:
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(RegistryError, match="not a folder"):
        AdapterRegistry(tmp_path / "data", validator)
    assert (tmp_path / "data").read_text() == "not a folder"


# ---- folders the server creates and owns --------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["missing", "empty", "fresh-volume"])
def test_new_or_empty_folder_is_created_and_marked(tmp_path: Path, validator: FakeValidator, start: str) -> None:
    root = tmp_path / "vol" / "data"
    if start != "missing":
        root.mkdir(parents=True)
    if start == "fresh-volume":  # the root of a new ext4 filesystem: lost+found is not ours, and never touched
        (root / "lost+found").mkdir()
        (root / "lost+found" / "#123").write_bytes(b"fsck found this")
    reg = AdapterRegistry(root, validator)
    assert marker(root) == {"format": MARKER_FORMAT, "version": MARKER_VERSION} and MARKER_VERSION == 2
    assert db_rows(root) == {} and not (root / "index.json").exists()
    assert (root / "adapters").is_dir() and (root / "staging").is_dir() and len(reg) == 0
    if start == "fresh-volume":
        assert (root / "lost+found" / "#123").read_bytes() == b"fsck found this"
    add(reg, "one")
    assert [r.name for r in AdapterRegistry(root, validator).list()] == ["one"]


def test_marked_folder_keeps_what_it_did_not_make(tmp_path: Path, validator: FakeValidator) -> None:
    """In its own folder the server removes only its own leftovers (staging/ of dead processes, interrupted index
    writes); a file the user put beside them, or a folder copied into adapters/, stays."""
    root = tmp_path / "data"
    add(AdapterRegistry(root, validator), "registered")
    (root / "my-notes.txt").write_text("mine")
    (root / "adapters" / "copied-in").mkdir()
    (root / "adapters" / "copied-in" / "adapter_config.json").write_bytes(config_bytes())
    (root / "staging" / "upload-x").mkdir()
    (root / ".index-9.tmp").write_text("{half")
    reg = AdapterRegistry(root, validator)
    assert [r.name for r in reg.list()] == ["registered"]
    assert (root / "my-notes.txt").read_text() == "mine"
    assert (root / "adapters" / "copied-in" / "adapter_config.json").read_bytes() == config_bytes()
    assert not any((root / "staging").iterdir()) and not list(root.glob(".index-*"))


def test_marked_folder_without_database_refuses_rather_than_orphan(tmp_path: Path, validator: FakeValidator) -> None:
    """A missing registry.db never reads as "nothing is registered" while adapter folders are there: the start is
    refused (the operator restores the database, or moves the folders out), and nothing changes."""
    root = tmp_path / "data"
    add(AdapterRegistry(root, validator), "precious")
    (root / "registry.db").unlink()
    before = snapshot(root)
    with pytest.raises(RegistryError, match="registry.db is missing"):
        AdapterRegistry(root, validator)
    assert snapshot(root) == before
    assert (root / "adapters" / "precious" / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_marked_folder_without_database_or_adapters_starts_empty(tmp_path: Path, validator: FakeValidator) -> None:
    root = tmp_path / "data"
    AdapterRegistry(root, validator)
    (root / "registry.db").unlink()
    assert len(AdapterRegistry(root, validator)) == 0
    assert db_rows(root) == {}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not a lora-server marker"),
        (json.dumps({"format": "something else", "version": 1}), "not a lora-server marker"),
        (json.dumps({"format": MARKER_FORMAT, "version": MARKER_VERSION + 1}), "newer lora-server"),
    ],
    ids=["malformed", "other-format", "newer"],
)
def test_bad_or_newer_marker_is_refused(tmp_path: Path, validator: FakeValidator, content: str, match: str) -> None:
    root = tmp_path / "data"
    add(AdapterRegistry(root, validator), "kept")
    (root / MARKER_FILE).write_text(content)
    (root / "staging" / "upload-x").mkdir()
    before = snapshot(root)
    with pytest.raises(RegistryError, match=match):
        AdapterRegistry(root, validator)
    assert snapshot(root) == before  # not even the staging leftover is removed


# ---- layout 1 (index.json), with and without its marker --------------------------------------------------------
def legacy_dir(root: Path) -> Path:
    """What a server before the marker left: index.json, adapters/, staging/ (with crash leftovers), no marker."""
    write_layout_1(root, ["alpha", "beta"], marker=False)
    (root / "staging" / "upload-old" / "adapter").mkdir(parents=True)
    (root / ".index-1.tmp").write_text("{half")
    return root


@pytest.mark.parametrize("layout", ["marker-v1", "no-marker"])
def test_layout_1_is_imported_into_the_database(tmp_path: Path, validator: FakeValidator, layout: str) -> None:
    """index.json's records land in registry.db (each with a uid), index.json goes, and the marker says layout 2, so
    an older server refuses the folder; the import happens once: a restart keeps the same uids."""
    root = tmp_path / "data"
    records = write_layout_1(root, ["alpha", "beta"], marker=layout == "marker-v1")
    (root / "staging" / "upload-old" / "adapter").mkdir(parents=True)
    (root / ".index-1.tmp").write_text("{half")
    reg = AdapterRegistry(root, validator)
    assert marker(root) == {"format": MARKER_FORMAT, "version": 2}
    assert {r.name: r.to_json() for r in reg.list()} == records
    assert not (root / "index.json").exists() and not list(root.glob(".index-*"))
    assert not any((root / "staging").iterdir())
    uids = {r.name: r.uid for r in reg.list()}
    assert len(set(uids.values())) == 2 and all(len(u) == 32 for u in uids.values())
    assert {r.name: r.uid for r in AdapterRegistry(root, validator).list()} == uids
    assert (reg.path("beta") / "adapter_model.safetensors").read_bytes() == WEIGHTS
    add(reg, "gamma")
    assert [r.name for r in AdapterRegistry(root, validator).list()] == ["alpha", "beta", "gamma"]


def test_an_index_left_after_its_import_is_never_read_again(tmp_path: Path, validator: FakeValidator) -> None:
    """A crash between the import's commit and index.json's removal leaves both: the database says the import is
    done, so the next start removes the file instead of bringing back what was deleted since (here over a folder
    the user then copied in under that name, which must stay theirs)."""
    root = tmp_path / "data"
    write_layout_1(root, ["alpha", "beta"])
    index = (root / "index.json").read_text()
    reg = AdapterRegistry(root, validator)
    reg.delete("alpha")
    (root / "adapters" / "alpha").mkdir()
    (root / "adapters" / "alpha" / "adapter_config.json").write_bytes(config_bytes())
    (root / "index.json").write_text(index)
    assert [r.name for r in AdapterRegistry(root, validator).list()] == ["beta"]
    assert not (root / "index.json").exists() and (root / "adapters" / "alpha" / "adapter_config.json").is_file()


def test_an_import_that_fails_leaves_layout_1_as_it_was(tmp_path: Path, validator: FakeValidator) -> None:
    """The import is one transaction: when it cannot commit, the database holds nothing, index.json and the
    version-1 marker stay, and the next start imports again."""
    root = tmp_path / "data"
    records = write_layout_1(root, ["alpha", "beta"])
    before = (root / "index.json").read_bytes(), (root / MARKER_FILE).read_bytes()
    with sqlite3.connect(root / "registry.db") as conn:  # a database that refuses the second row's insert
        conn.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, uid TEXT, rank INTEGER, alpha REAL, "
                     "target_modules TEXT, size_bytes INTEGER, sha256 TEXT, created_at TEXT, source TEXT, "
                     "CHECK (name != 'beta'))")  # fmt: skip
    with pytest.raises(sqlite3.IntegrityError):
        AdapterRegistry(root, validator)
    assert ((root / "index.json").read_bytes(), (root / MARKER_FILE).read_bytes()) == before
    assert db_rows(root) == {}
    with sqlite3.connect(root / "registry.db") as conn:
        conn.execute("DROP TABLE adapters")
    assert {r.name: r.to_json() for r in AdapterRegistry(root, validator).list()} == records


def test_legacy_empty_layout_is_adopted(tmp_path: Path, validator: FakeValidator) -> None:
    """An old server that never stored an adapter left adapters/ and staging/ empty, and no index."""
    root = tmp_path / "data"
    (root / "adapters").mkdir(parents=True)
    (root / "staging").mkdir()
    assert len(AdapterRegistry(root, validator)) == 0
    assert marker(root)["version"] == MARKER_VERSION


@pytest.mark.parametrize("layout", ["marker-v1", "no-marker"])
def test_layout_1_with_malformed_index_is_refused(tmp_path: Path, validator: FakeValidator, layout: str) -> None:
    root = legacy_dir(tmp_path / "data")
    if layout == "marker-v1":
        (root / MARKER_FILE).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1}))
    (root / "index.json").write_text("{not json")
    before = snapshot(root)
    with pytest.raises(RegistryError, match="malformed"):
        AdapterRegistry(root, validator)
    assert snapshot(root) == before and not (root / "registry.db").exists()
