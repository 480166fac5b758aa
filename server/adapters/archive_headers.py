"""Checks on an archive's own bookkeeping, made before the stdlib readers parse it.

* tar: CPython's tarfile before 3.11.10 parses pax headers with backtracking regexes (CVE-2024-6232): one 1 MiB
  header, 1 KiB gzip'd, takes hours. ``TarHeaderGuard`` sits between the decompressor and tarfile and looks at every
  512-byte block before tarfile can read it. tarfile only ever reads headers at block boundaries, so checking every
  aligned block that tarfile would accept as a header (valid checksum) covers all of them, wherever the pax "size"
  records or GNU extensions move the next header. It refuses pax ('x', 'g', 'X') and GNU long-name ('L', 'K')
  records above a small size, too many of them, chains of them (tarfile recurses once per header in a chain), and
  sparse members (tarfile builds their maps from data without bound, and crashes on a malformed one). Header fields
  are read exactly as tarfile reads them (number fields, both checksums).
* zip: zipfile reads the whole central directory, sized by the end-of-central-directory record, into memory and
  builds one ZipInfo per entry before we can count them. ``check_zip_directory`` reads that record first, as zipfile
  will (zip64 included), and refuses a directory with too many entries or too many bytes for that many.

Both raise UnsafeArchive (HTTP 400); memory stays bounded by a block and a 64 KiB tail.
"""

import struct
from pathlib import Path
from typing import BinaryIO, Protocol


class UnsafeArchive(ValueError):
    """The archive is not one we extract: not a zip/tar.gz, unsafe members, a decompression bomb, no adapter inside."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


TAR_BLOCK = 512
# One pax or GNU long-name record. A real one holds a path (members are refused past 1,024 bytes), times, ids and a
# few extended attributes: well under 4 KiB. On a vulnerable Python the worst 4 KiB record costs ~0.09 s to parse
# (16 KiB: 1 s, 1 MiB: hours); the cost grows with the square of the size, hence the small cap.
MAX_TAR_EXTENDED_BYTES = 4096
# All of them in one archive (Python's tarfile writes ~30 bytes per member for a fractional mtime, bsdtar a few
# hundred with extended attributes): bounds the worst case at four maximal records, ~0.35 s on a vulnerable Python.
MAX_TAR_EXTENDED_TOTAL = 16 * 1024
# Extended headers in a row before one member: a global header, a pax header, a GNU long name and long link at most.
MAX_TAR_EXTENDED_CHAIN = 4
_EXTENDED_TYPES = b"xgXLK"
_PAX_TYPES = b"xgX"
_SPARSE_TYPE = b"S"
_CANDIDATE_TYPES = frozenset(_EXTENDED_TYPES + _SPARSE_TYPE)
_HIGH_BYTES = bytes(range(0x80, 0x100))


class TarHeaderGuard:
    """A read-only stream over the decompressed tar ``inner`` that raises UnsafeArchive for the headers above,
    before the bytes that would let tarfile parse them are returned. Holds at most one block and one pax record."""

    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.offset = 0  # stream offset of ``carry``'s first byte: always a block boundary
        self.carry = b""  # the start of a block whose end has not been read yet
        self.extended_total = 0
        self.chain = 0
        self.chain_next = -1  # block where a header continuing the current chain would start
        self.record = bytearray()  # a pax record's data, collected from ``record_start`` on
        self.record_start = self.record_end = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.inner.read(size)
        self._scan(data)
        return data

    def _scan(self, data: bytes) -> None:
        buf = self.carry + data
        whole = len(buf) - len(buf) % TAR_BLOCK
        self._collect(buf)
        # A block's type flag sits at byte 156: slice them all out and look closer only at the few that qualify.
        for i, flag in enumerate(buf[156:whole:TAR_BLOCK]):
            if flag in _CANDIDATE_TYPES:
                block = buf[i * TAR_BLOCK : (i + 1) * TAR_BLOCK]
                header = _as_header(block)
                if header is not None:
                    self._check_header(self.offset // TAR_BLOCK + i, *header)
                    self._collect(buf)
        self.carry = buf[whole:]
        self.offset += whole

    def _check_header(self, index: int, type_: bytes, size: int) -> None:
        if type_ == _SPARSE_TYPE:
            raise UnsafeArchive("the archive holds a sparse file; archive plain files (tar without --sparse)")
        if self.record_start + len(self.record) < self.record_end:
            raise UnsafeArchive("a tar header lies inside a pax record's data")
        if not 0 <= size <= MAX_TAR_EXTENDED_BYTES:
            raise UnsafeArchive(
                f"a tar extended header (pax or GNU long name) of {size} bytes; at most {MAX_TAR_EXTENDED_BYTES} "
                "are accepted"
            )
        self.extended_total += size
        if self.extended_total > MAX_TAR_EXTENDED_TOTAL:
            raise UnsafeArchive(f"the tar extended headers add up to more than {MAX_TAR_EXTENDED_TOTAL} bytes")
        self.chain = self.chain + 1 if index == self.chain_next else 1
        if self.chain > MAX_TAR_EXTENDED_CHAIN:
            raise UnsafeArchive(f"more than {MAX_TAR_EXTENDED_CHAIN} tar extended headers in a row")
        self.chain_next = index + 1 + -(-size // TAR_BLOCK)
        if type_ in _PAX_TYPES:
            self.record = bytearray()
            self.record_start = (index + 1) * TAR_BLOCK
            self.record_end = self.record_start + size

    def _collect(self, buf: bytes) -> None:
        """Append the bytes of the pending pax record that ``buf`` (starting at ``self.offset``) holds."""
        have = self.record_start + len(self.record)
        if have >= self.record_end:
            return
        self.record += buf[have - self.offset : self.record_end - self.offset]
        if self.record_start + len(self.record) == self.record_end:
            _check_pax_records(bytes(self.record))


def _as_header(block: bytes) -> tuple[bytes, int] | None:
    """(type flag, size) when tarfile would accept ``block`` as a header (its frombuf checks), else None."""
    if block.count(0) == TAR_BLOCK:
        return None
    checksum, size = _tar_number(block[148:156]), _tar_number(block[124:136])
    if checksum is None or size is None:
        return None
    # tarfile accepts the sum of the header bytes (checksum field as spaces) read as unsigned or as signed bytes.
    summed = block[:148] + block[156:]
    unsigned = 256 + sum(summed)
    high = len(summed) - len(summed.translate(None, _HIGH_BYTES))  # bytes that count negative when signed
    if checksum not in (unsigned, unsigned - 256 * high):
        return None
    return block[156:157], size


def _tar_number(field: bytes) -> int | None:
    """A numeric header field as tarfile.nti reads it (GNU base-256, else octal text up to a NUL); None if invalid."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        return None


def _check_pax_records(data: bytes) -> None:
    """Each record must be "<length> <keyword>=<value>\\n" with the length right; GNU sparse keywords are refused."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        length = int(digits) if space > pos and digits.isdigit() else 0
        end = pos + length
        equals = data.find(b"=", space + 1, end)
        if length <= len(digits) + 2 or end > len(data) or data[end - 1] != 0x0A or equals == -1:
            raise UnsafeArchive("the archive has a malformed pax header record")
        if data[space + 1 : equals].startswith(b"GNU.sparse."):
            raise UnsafeArchive("the archive holds a sparse file; archive plain files (tar without --sparse)")
        pos = end


# zipfile's end-of-central-directory records (APPNOTE 4.3.14-16), read the way zipfile._EndRecData reads them.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD_MAGIC, _EOCD64_LOCATOR_MAGIC, _EOCD64_MAGIC = b"PK\005\006", b"PK\006\007", b"PK\006\006"
# A central directory entry: 46 fixed bytes, the name (refused past 1,024 bytes), extra fields and a comment.
MAX_ZIP_ENTRY_BYTES = 46 + 1024 + 1024


def check_zip_directory(path: Path, max_members: int) -> None:
    """Refuse the zip at ``path`` when its end-of-central-directory record (zip64 when present) announces more than
    ``max_members`` entries or more central-directory bytes than that many entries need. Reads at most the file's
    last 64 KiB; a missing or broken record is left to zipfile, which refuses it too."""
    with open(path, "rb") as f:
        end = _end_record(f)
    if end is None:
        return
    entries, directory_bytes = end
    if entries > max_members:
        raise UnsafeArchive(f"the archive has more than {max_members} members")
    if directory_bytes > max_members * MAX_ZIP_ENTRY_BYTES:
        raise UnsafeArchive(
            f"the archive's central directory has {directory_bytes} bytes, more than {max_members} members need"
        )


def _end_record(f: BinaryIO) -> tuple[int, int] | None:
    """(entry count, central directory bytes) of the record zipfile will use, or None where it finds none."""
    size = f.seek(0, 2)
    if size < _EOCD.size:
        return None
    # zipfile first tries a record at the very end with an empty comment, then the last signature in the tail.
    f.seek(size - _EOCD.size)
    record = f.read(_EOCD.size)
    at = size - _EOCD.size
    if not (record[:4] == _EOCD_MAGIC and record[-2:] == b"\0\0"):
        tail_start = max(size - (1 << 16) - _EOCD.size, 0)
        f.seek(tail_start)
        tail = f.read()
        found = tail.rfind(_EOCD_MAGIC)
        record = tail[found : found + _EOCD.size]
        if found < 0 or len(record) != _EOCD.size:
            return None
        at = tail_start + found
    fields = _EOCD.unpack(record)
    entries, directory_bytes = max(fields[3], fields[4]), fields[5]
    # zip64: a locator right before the record, the zip64 record right before the locator ("no extensible data").
    # Where those would start before the file, zipfile ignores the locator or refuses the file.
    if at >= _EOCD64_LOCATOR.size + _EOCD64.size:
        f.seek(at - _EOCD64_LOCATOR.size - _EOCD64.size)
        data = f.read(_EOCD64.size + _EOCD64_LOCATOR.size)
        locator = _EOCD64_LOCATOR.unpack_from(data, _EOCD64.size)
        zip64 = _EOCD64.unpack_from(data)
        if locator[0] == _EOCD64_LOCATOR_MAGIC and zip64[0] == _EOCD64_MAGIC:
            entries, directory_bytes = max(zip64[6], zip64[7]), zip64[8]
    return entries, directory_bytes
