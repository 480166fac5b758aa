"""Safe intake of uploaded adapter bytes: size-capped stream copies and extraction of .zip / .tar.gz archives.

Nothing here trusts the upload: sizes are counted on the bytes actually read or written (never taken from headers),
archive member names are checked (and bounded) but never used as paths on disk, and only the files of a PEFT save are
kept. Before zipfile or tarfile parse anything, ``archive_headers`` checks the headers they would choke on.
Registry-free and torch-free; the registry turns ``TooLarge`` into HTTP 413 and ``UnsafeArchive`` into HTTP 400.
"""

import gzip
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

from server.adapters.archive_headers import Readable, TarHeaderGuard, UnsafeArchive, check_zip_directory
from server.adapters.config_json import MAX_CONFIG_BYTES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README_FILE = "README.md"
# The PEFT file names are defined here, torch-free, and the checkpoint reader imports them. Pickles are kept so that
# the validator refuses them (it never opens one).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_DRIVE = re.compile(r"^[A-Za-z]:")
# A file name part has at most 255 bytes (NAME_MAX) on common file systems, so a longer member was not packed from a
# real folder; 1,024 bytes bounds a whole name far above any PEFT save's and below PATH_MAX (4,096).
MAX_MEMBER_NAME_BYTES = 1024
MAX_NAME_PART_BYTES = 255


class TooLarge(ValueError):
    """More bytes arrived than a limit allows."""


@dataclass(frozen=True)
class UploadLimits:
    """Caps on what one upload may bring in; every one is enforced on bytes actually read, not on declared sizes."""

    max_file_bytes: int = 512 * 2**20  # one file (weights or a pickle the validator will refuse)
    max_config_bytes: int = MAX_CONFIG_BYTES  # adapter_config.json (and README.md)
    max_archive_members: int = 64
    max_unpacked_bytes: int = 1 * 2**30

    @property
    def max_archive_bytes(self) -> int:
        """Cap on the raw archive: it never needs to be much bigger than what it unpacks to (headers, stored data)."""
        return self.max_unpacked_bytes + self.max_unpacked_bytes // 64 + 2**20


def kept_limit(filename: str, limits: UploadLimits) -> int | None:
    """Size cap of ``filename`` if it belongs in an adapter folder (PEFT files, README, pickles), else None."""
    if filename in (CONFIG_FILE, README_FILE):
        return limits.max_config_bytes
    if filename == WEIGHTS_FILE or filename.lower().endswith(PICKLE_SUFFIXES):
        return limits.max_file_bytes
    return None


def copy_capped(src: Readable, dst: BinaryIO, limit: int, what: str) -> int:
    """Copy ``src`` to ``dst`` in chunks; returns the byte count. Reads at most ``limit + 1`` bytes: one byte over
    the limit raises TooLarge, so an endless or huge stream is never read further than that (nor held in memory)."""
    n = 0
    while chunk := src.read(min(CHUNK, limit + 1 - n)):
        n += len(chunk)
        if n > limit:
            raise TooLarge(f"{what} is larger than {_size(limit)}")
        dst.write(chunk)
    return n


def receive_file(src: Readable, path: Path, limit: int, what: str, *, sync: bool = True) -> int:
    """Stream ``src`` into a new file ``path`` (capped like ``copy_capped``), fsynced unless ``sync`` is False."""
    with open(path, "xb") as out:
        n = copy_capped(src, out, limit, what)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    return n


def extract_adapter_archive(archive: Readable, scratch: Path, dest: Path, limits: UploadLimits) -> None:
    """Unpack the PEFT folder inside ``archive`` (zip or gzip'd tar, told apart by magic bytes) into ``dest``.

    The folder is the archive root if it holds adapter_config.json, else the one top-level directory that does.
    Only its adapter_config.json, adapter_model.safetensors, README.md and pickle files land in ``dest`` (flat);
    everything else is skipped. ``scratch`` (created here, removed by the caller) receives the raw archive and the
    members being extracted. Raises UnsafeArchive (absolute or '..' paths, links or devices, too many members,
    duplicate members, a bomb, no adapter inside, not an archive) or TooLarge (the archive or one file too big).
    """
    scratch.mkdir()
    raw = scratch / "archive"
    receive_file(archive, raw, limits.max_archive_bytes, "the archive", sync=False)
    with open(raw, "rb") as f:
        magic = f.read(4)
    extractor = _Extractor(scratch, limits)
    with _as_unsafe("a corrupt or unsupported archive"):
        if magic in _ZIP_MAGIC:
            extractor.from_zip(raw)
        elif magic[:2] == _GZIP_MAGIC:
            extractor.from_tar_gz(raw)
        else:
            raise UnsafeArchive("not a .zip or .tar.gz archive")
    extractor.move_adapter_to(dest)


class _Extractor:
    """Member checks and bookkeeping shared by zip and tar: files land in scratch under counter names, by key
    (top-level folder or "" for the root, file name), and the adapter folder is chosen once all members are seen."""

    def __init__(self, scratch: Path, limits: UploadLimits) -> None:
        self.scratch = scratch
        self.limits = limits
        self.members = 0
        self.unpacked = 0
        self.files: dict[tuple[str, str], Path] = {}

    def from_zip(self, path: Path) -> None:
        check_zip_directory(path, self.limits.max_archive_members)  # before zipfile reads the whole directory
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            self._count(len(infos))
            for info in infos:
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: written by a tool that stores no Unix mode
                    raise UnsafeArchive(f"member {_show(info.filename)} is a link or device file; only files allowed")
                key = self._key(info.filename)
                if key is None or info.is_dir():
                    continue
                if info.flag_bits & 0x1:
                    raise UnsafeArchive(f"member {_show(info.filename)} is encrypted")
                try:
                    src = zf.open(info)
                except OSError as e:  # a corrupt header offset makes it seek before the start of the file
                    raise UnsafeArchive(f"member {_show(info.filename)} is corrupt: {e}") from e
                with src:
                    self._extract(src, key)

    def from_tar_gz(self, path: Path) -> None:
        # Streaming mode ("r|"): members are read in order and skipped members are decompressed too, so the whole
        # decompressed stream is capped, not only the files written (plus room for the 512-byte headers).
        cap = self.limits.max_unpacked_bytes + 2048 * (self.limits.max_archive_members + 1) + 20480
        with gzip.open(path, "rb") as gz:
            # tarfile in "r|" mode only calls read(); the guard checks each header block before tarfile gets it
            stream = cast(IO[bytes], TarHeaderGuard(_CappedReader(gz, cap)))
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                self._tar_members(tf)

    def _tar_members(self, tf: tarfile.TarFile) -> None:
        for member in tf:
            self._count(self.members + 1)
            if not (member.isreg() or member.isdir()):
                raise UnsafeArchive(f"member {_show(member.name)} is a link or device file; only files allowed")
            key = self._key(member.name)
            if member.isdir() or key is None:
                continue
            src = tf.extractfile(member)
            assert src is not None  # a regular file always has contents
            with src:
                self._extract(src, key)

    def move_adapter_to(self, dest: Path) -> None:
        folders = sorted({folder for folder, filename in self.files if filename == CONFIG_FILE})
        if "" in folders:
            root = ""
        elif len(folders) == 1:
            root = folders[0]
        elif not folders:
            raise UnsafeArchive(f"no {CONFIG_FILE} at the archive root or in a top-level folder")
        else:
            raise UnsafeArchive(f"the archive holds several adapters ({', '.join(map(_show, folders))}); send one")
        for (folder, filename), path in self.files.items():
            if folder == root:
                os.rename(path, dest / filename)

    def _count(self, members: int) -> None:
        self.members = members
        if members > self.limits.max_archive_members:
            raise UnsafeArchive(f"the archive has more than {self.limits.max_archive_members} members")

    def _key(self, name: str) -> tuple[str, str] | None:
        """(folder, file name) of a member that may belong to the adapter, None for one skipped; refuses unsafe names.
        Backslashes count as separators: some Windows tools write them, and an extractor elsewhere may honour them."""
        if "\x00" in name:
            raise UnsafeArchive(f"member {_show(name)} has a NUL byte in its name")
        unified = name.replace("\\", "/")
        _check_name_length(name, unified)
        if unified.startswith("/") or _DRIVE.match(unified):
            raise UnsafeArchive(f"member {_show(name)} has an absolute path")
        parts = [p for p in unified.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnsafeArchive(f"member {_show(name)} points outside the archive ('..')")
        if not 1 <= len(parts) <= 2 or kept_limit(parts[-1], self.limits) is None:
            return None
        key = ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        if key in self.files:
            raise UnsafeArchive(f"member {_show(name)} appears twice")
        return key

    def _extract(self, src: Readable, key: tuple[str, str]) -> None:
        file_limit = kept_limit(key[1], self.limits)
        assert file_limit is not None  # _key only returns kept names
        left = self.limits.max_unpacked_bytes - self.unpacked
        path = self.scratch / f"m{len(self.files)}"
        self.files[key] = path
        try:
            self.unpacked += receive_file(src, path, min(file_limit, left), key[1])
        except TooLarge:
            if file_limit <= left:
                raise
            raise UnsafeArchive(f"the archive unpacks to more than {_size(self.limits.max_unpacked_bytes)}") from None


def _check_name_length(name: str, unified: str) -> None:
    size = len(name.encode("utf-8", "surrogatepass"))
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in unified.split("/"))
    if size > MAX_MEMBER_NAME_BYTES or longest > MAX_NAME_PART_BYTES:
        raise UnsafeArchive(
            f"member {_show(name)} has a name of {size} bytes or a part of {longest}; at most "
            f"{MAX_MEMBER_NAME_BYTES} and {MAX_NAME_PART_BYTES} bytes are accepted"
        )


class _CappedReader:
    """A read-only stream over ``inner`` that raises UnsafeArchive once more than ``cap`` bytes have been read."""

    def __init__(self, inner: Readable, cap: int) -> None:
        self.inner, self.cap, self.read_bytes = inner, cap, 0

    def read(self, size: int = -1) -> bytes:
        want = self.cap + 1 - self.read_bytes
        data = self.inner.read(want if size < 0 else min(size, want))
        self.read_bytes += len(data)
        if self.read_bytes > self.cap:
            raise UnsafeArchive(f"the archive decompresses to more than {_size(self.cap)}")
        return data


@contextmanager
def _as_unsafe(what: str) -> Iterator[None]:
    """Errors of the zip/tar/gzip readers mean a broken or hostile archive, so they become UnsafeArchive."""
    # NotImplementedError: an unknown zip compression method; UnicodeDecodeError: a zip member name that is not UTF-8.
    # Fuzzing corrupted archives found these (and the OSError handled at zf.open) escaping the readers, nothing else.
    broken = (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, zlib.error, struct.error, EOFError)
    try:
        yield
    except (*broken, NotImplementedError, UnicodeDecodeError) as e:
        raise UnsafeArchive(f"{what}: {e}") from e


def _show(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:120] + "...")


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"
