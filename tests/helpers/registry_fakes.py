"""Torch-free stand-ins for the registry tests: a fake checkpoint validator, endless and unreadable upload streams,
PEFT-looking files, zip/tar archive builders, a user's project folder with a snapshot of every file in it, the rows
of a data directory's registry.db, a data directory as a layout-1 server (index.json) left it, and a full disk."""

import errno
import io
import json
import os
import sqlite3
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from server.adapters.data_dir import MARKER_FILE, MARKER_FORMAT
from server.adapters.errors import AdapterError, AdapterFormatError
from server.adapters.registry import AdapterRecord, AdapterRegistry, AdapterSummary
from server.adapters.registry_db import RegistryDB

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
    assert name not in db_rows(reg.data_dir)


def db_rows(data_dir: Path) -> dict[str, dict[str, object]]:
    """Every row of ``data_dir/registry.db`` by name, read through a connection of its own (read-only)."""
    conn = sqlite3.connect(f"file:{data_dir / 'registry.db'}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return {row["name"]: dict(row) for row in conn.execute("SELECT * FROM adapters ORDER BY name")}
    finally:
        conn.close()


def pending_marks(data_dir: Path) -> list[str]:
    """The adapter folders that still carry the registry's in-flight mark."""
    return sorted(p.parent.name for p in (data_dir / "adapters").glob("*/.lora-server-pending"))


def fail_commits(monkeypatch: pytest.MonkeyPatch, code: int = sqlite3.SQLITE_FULL) -> None:
    """Make every registry.db COMMIT fail as SQLite reports a full disk (SQLITE_FULL), or with another code."""

    def commit(self: RegistryDB) -> None:
        e = sqlite3.OperationalError("database or disk is full" if code == sqlite3.SQLITE_FULL else "disk I/O error")
        e.sqlite_errorcode = code  # type: ignore[attr-defined]
        raise e

    monkeypatch.setattr(RegistryDB, "_commit", commit)


def disk_full(code: str = "ENOSPC") -> OSError:
    number = getattr(errno, code)
    return OSError(number, os.strerror(number))


def write_layout_1(root: Path, names: list[str], marker: bool = True) -> dict[str, dict[str, object]]:
    """A data directory as a layout-1 server left it: index.json (the records, returned), adapters/<name>/ and an
    empty staging/, with the version-1 marker, or without any (``marker=False``: a server before the marker)."""
    records: dict[str, dict[str, object]] = {}
    for i, name in enumerate(names):
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_bytes(config_bytes(r=4 + i))
        (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
        records[name] = {"name": name, "rank": 4 + i, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
                         "size_bytes": len(config_bytes(r=4 + i)) + len(WEIGHTS), "sha256": f"{i:064x}",
                         "created_at": "2026-01-02T03:04:05Z", "source": "upload"}  # fmt: skip
    (root / "staging").mkdir(parents=True, exist_ok=True)
    (root / "index.json").write_text(json.dumps({"version": 1, "adapters": records}))
    if marker:
        (root / MARKER_FILE).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1}))
    return records


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


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root``: file bytes, "-> target" for a link, None for a folder."""
    out: dict[str, bytes | str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            else:
                out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def user_project(root: Path) -> Path:
    """A user's project folder: their own PEFT saves in adapters/, as the bug report had it."""
    for name in ("pirate", "upper"):
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_bytes(config_bytes())
        (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (root / "adapters" / "README.md").write_text("my adapters")
    (root / "train.py").write_text("print('training')")
    return root
