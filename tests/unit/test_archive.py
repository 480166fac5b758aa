"""Archive intake (zip and tar.gz uploads) through the registry: layouts, traversal, links and devices, member and
size limits, decompression bombs, corrupted and non-archives. Torch-free: a fake validator stands in for the model
layer's checkpoint reader.
"""

import io
import random
import tarfile
from pathlib import Path

import pytest

from server.adapters.errors import AdapterError, AdapterFormatError
from server.adapters.registry import AdapterRegistry, BadArchive, UploadLimits, UploadTooLarge
from tests.helpers.registry_fakes import (
    WEIGHTS,
    EndlessStream,
    FakeValidator,
    add,
    assert_nothing_left,
    config_bytes,
    make_tgz,
    make_zip,
    peft_members,
    staging_empty,
)


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
