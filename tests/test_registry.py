"""AdapterRegistry and archive intake: persistence, crash recovery, name checks, upload limits, hostile archives.

Torch-free: a fake validator stands in for the model layer's checkpoint reader.
"""

import io
import json
import os
import random
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from server.lora.errors import AdapterError, AdapterFormatError
from server.lora.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    AdapterRegistry,
    AdapterSummary,
    BadArchive,
    InvalidAdapterName,
    UploadLimits,
    UploadTooLarge,
)

CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 4  # safetensors-looking, never parsed


class FakeValidator:
    """Checks the PEFT files exist, refuses pickles, parses the config; ``error`` makes it refuse everything."""

    def __init__(self) -> None:
        self.error: AdapterError | None = None
        self.barrier: threading.Barrier | None = None
        self.seen: list[Path] = []

    def __call__(self, folder: Path) -> AdapterSummary:
        self.seen.append(folder)
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        if self.error is not None:
            raise self.error
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise AdapterFormatError(f"pickle files are never loaded: {pickles}")
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / f).is_file():
                raise AdapterFormatError(f"{f} is missing")
        try:
            cfg = json.loads((folder / "adapter_config.json").read_bytes())
            return AdapterSummary(rank=cfg["r"], alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterFormatError(f"adapter_config.json is not a LoRA config: {e}") from e


class EndlessStream:
    """A stream that never ends; ``read_bytes`` says how far a reader went."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert size > 0, "an endless stream must be read in bounded chunks"
        self.read_bytes += size
        return b"\0" * size


class UnreadableStream:
    def read(self, size: int = -1) -> bytes:
        raise AssertionError("this stream must not be read")


@pytest.fixture
def validator() -> FakeValidator:
    return FakeValidator()


@pytest.fixture
def registry(tmp_path: Path, validator: FakeValidator) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "data", validator)


def config_bytes(**overrides: object) -> bytes:
    return json.dumps({**CONFIG, **overrides}).encode()


def add(reg: AdapterRegistry, name: str, weights: bytes = WEIGHTS) -> AdapterRecord:
    return reg.add_files(name, io.BytesIO(config_bytes()), io.BytesIO(weights))


def staging_empty(reg: AdapterRegistry) -> bool:
    return not any((reg.data_dir / "staging").iterdir())


def assert_nothing_left(reg: AdapterRegistry, name: str) -> None:
    assert name not in reg
    assert not (reg.data_dir / "adapters" / name).exists()
    assert staging_empty(reg)
    index = reg.data_dir / "index.json"
    assert not index.exists() or name not in json.loads(index.read_text())["adapters"]


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    buf.seek(0)
    return buf


def make_tgz(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    buf.seek(0)
    return buf


def peft_members(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}adapter_config.json": config_bytes(), f"{prefix}adapter_model.safetensors": WEIGHTS}


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


# ---- archives -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zip", "tgz"])
@pytest.mark.parametrize("prefix", ["", "./", "my-adapter/"])
def test_archive_layouts(registry: AdapterRegistry, fmt: str, prefix: str) -> None:
    members = {**peft_members(prefix), f"{prefix}README.md": b"# card", f"{prefix}training_args.json": b"{}"}
    members["__MACOSX/my-adapter/._adapter_config.json"] = b"junk"  # what Finder adds beside the folder
    archive = make_zip(members) if fmt == "zip" else make_tgz(members)
    rec = registry.add_archive("arch", archive)
    kept = sorted(p.name for p in registry.path("arch").iterdir())
    assert kept == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert rec.size_bytes == len(config_bytes()) + len(WEIGHTS) + len(b"# card")
    assert rec.sha256 == add(registry, "same-weights").sha256
    assert staging_empty(registry)


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_archive_pickle_reaches_the_validator(registry: AdapterRegistry, fmt: str) -> None:
    members = {**peft_members("a/"), "a/adapter_model.bin": b"\x80\x04pickle"}
    with pytest.raises(AdapterFormatError, match="pickle"):
        registry.add_archive("pkl", make_zip(members) if fmt == "zip" else make_tgz(members))
    assert_nothing_left(registry, "pkl")


@pytest.mark.parametrize(
    "members",
    [
        {**peft_members(), "../evil": b"x"},
        {**peft_members(), "a/../../evil": b"x"},
        {**peft_members(), "/etc/evil": b"x"},
        {**peft_members(), "C:/evil": b"x"},
        {**peft_members(), "..\\evil": b"x"},
        {"README.md": b"no adapter here"},
        {**peft_members("a/"), **peft_members("b/")},
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "backslash", "no-config", "two-adapters"],
)
@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_bad_archives(tmp_path: Path, registry: AdapterRegistry, members: dict[str, bytes], fmt: str) -> None:
    with pytest.raises(BadArchive):
        registry.add_archive("evil", make_zip(members) if fmt == "zip" else make_tgz(members))
    assert_nothing_left(registry, "evil")
    assert not (tmp_path / "evil").exists() and not (registry.data_dir / "evil").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_devices_are_refused(registry: AdapterRegistry, kind: bytes) -> None:
    archive = make_tgz(peft_members(), links={"README.md": (kind, "/etc/passwd")})
    with pytest.raises(BadArchive, match="link or device"):
        registry.add_archive("links", archive)
    assert_nothing_left(registry, "links")


def test_zip_symlink_is_refused(registry: AdapterRegistry) -> None:
    with pytest.raises(BadArchive, match="link or device"):
        registry.add_archive("links", make_zip(peft_members(), symlinks={"README.md": "/etc/passwd"}))
    assert_nothing_left(registry, "links")


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_too_many_members(tmp_path: Path, validator: FakeValidator, fmt: str) -> None:
    reg = AdapterRegistry(tmp_path / "data", validator, UploadLimits(max_archive_members=4))
    members = {**peft_members(), **{f"extra{i}.txt": b"x" for i in range(3)}}
    with pytest.raises(BadArchive, match="more than 4 members"):
        reg.add_archive("many", make_zip(members) if fmt == "zip" else make_tgz(members))
    assert_nothing_left(reg, "many")


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
@pytest.mark.parametrize("member", ["adapter_model.safetensors", "deep/er/padding.txt"])
def test_decompression_bomb(tmp_path: Path, validator: FakeValidator, fmt: str, member: str) -> None:
    limits = UploadLimits(max_file_bytes=2**20, max_unpacked_bytes=2**16)
    reg = AdapterRegistry(tmp_path / "data", validator, limits)
    members = {**peft_members(), member: bytes(2**20 - 1)}  # compresses to ~1 KiB, unpacks to 16x the cap
    archive = make_zip(members) if fmt == "zip" else make_tgz(members)
    assert len(archive.getvalue()) < 2**16
    if fmt == "zip" and member.startswith("deep/"):  # zip members that are skipped are never decompressed
        reg.add_archive("bomb", archive)
        return
    with pytest.raises(BadArchive, match="more than"):
        reg.add_archive("bomb", archive)
    assert_nothing_left(reg, "bomb")


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_archive_member_above_file_limit(tmp_path: Path, validator: FakeValidator, fmt: str) -> None:
    reg = AdapterRegistry(tmp_path / "data", validator, UploadLimits(max_file_bytes=2**12))
    members = {**peft_members(), "adapter_model.safetensors": bytes(2**13)}
    with pytest.raises(UploadTooLarge, match="adapter_model.safetensors"):
        reg.add_archive("big", make_zip(members) if fmt == "zip" else make_tgz(members))
    assert_nothing_left(reg, "big")


def test_oversize_archive_stops_reading_early(tmp_path: Path, validator: FakeValidator) -> None:
    limits = UploadLimits(max_unpacked_bytes=2**20)
    reg = AdapterRegistry(tmp_path / "data", validator, limits)
    endless = EndlessStream()
    with pytest.raises(UploadTooLarge):
        reg.add_archive("huge", endless)  # type: ignore[arg-type]
    assert endless.read_bytes == limits.max_archive_bytes + 1
    assert_nothing_left(reg, "huge")


@pytest.mark.parametrize(
    "data",
    [b"", b"just some text", b"\x1f\x8b\x08garbage", make_zip(peft_members()).getvalue()[:100]],
    ids=["empty", "text", "bad-gzip", "truncated-zip"],
)
def test_not_an_archive(registry: AdapterRegistry, data: bytes) -> None:
    with pytest.raises(BadArchive):
        registry.add_archive("x", io.BytesIO(data))
    assert_nothing_left(registry, "x")


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_corrupted_archives_give_registry_errors(registry: AdapterRegistry, fmt: str) -> None:
    """Random byte flips and truncations: a refusal the API can map (or, rarely, success), never a stray exception."""
    rng = random.Random(0)
    good = (make_zip if fmt == "zip" else make_tgz)(peft_members("a/")).getvalue()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        try:
            registry.add_archive("fuzz", io.BytesIO(bytes(data)))
            registry.delete("fuzz")
        except (BadArchive, UploadTooLarge, AdapterError):
            pass
        assert_nothing_left(registry, "fuzz")


def test_gzip_that_is_not_a_tar(registry: AdapterRegistry) -> None:
    import gzip

    with pytest.raises(BadArchive):
        registry.add_archive("x", io.BytesIO(gzip.compress(b"not a tar" * 1000)))
    assert_nothing_left(registry, "x")


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

    from server.lora import registry as registry_module

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

    from server.lora import registry as registry_module

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
