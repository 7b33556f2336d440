"""A bounded reader for layer tar streams.

Python's tarfile reads a pax extended header, a GNU long name or a GNU long link name whole
into memory, however large its header says it is, and keeps every member it has read: a layer
with a pax header declaring 1 GiB costs the daemon 1 GiB. This reader parses the same formats
(ustar, GNU, pax) with every header record bounded before a byte of it is read:

- extended headers (pax `x`/`g`, GNU `L`/`K`) of one entry add up to at most
  `max_header_bytes` (1 MiB by default, Go's archive/tar limit for the same records);
- sparse entries (GNU type `S`, pax `GNU.sparse.*`) are refused: image builders never write
  them, and their maps are another unbounded header;
- at most `max_entries` entries; nothing is kept once the caller moves to the next one.

It yields `tarfile.TarInfo` records, so the extractor reads them as it would tarfile's, and
`extractfile` streams an entry's data. The stream's total size is the caller's to cap.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

BLOCK = 512
MAX_HEADER_BYTES = 1 << 20
# Types whose header is all there is: their size field, whatever it says, carries no data
# (tarfile and Go's archive/tar agree).
HEADER_ONLY = (
    tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)
PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
SPARSE_PAX_PREFIX = "GNU.sparse."
USTAR_MAGIC = b"ustar\x00"
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # what tarfile does: names are bytes on Linux, kept as they are


class TarFormatError(ValueError):
    """The stream is not a tar this reader accepts (corrupt, truncated or sparse)."""


class TarLimitExceeded(ValueError):
    """The stream passes one of the reader's limits."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class TarLimits:
    max_entries: int = 500_000
    max_header_bytes: int = MAX_HEADER_BYTES


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode(ENCODING, ERRORS)


def _number(field: bytes, what: str) -> int:
    """An octal field, or GNU's base-256 (first byte 0x80) for values that do not fit."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise TarFormatError(f"tar header field {what} is negative")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"tar header field {what} is not a number: {text[:32]!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156], "chksum")
    blanked = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def parse_pax(data: bytes) -> dict[str, str]:
    """The records of a pax header: "<length> <key>=<value>\\n", each length counting itself."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\x00") == b"":
            break  # padding some writers leave after the last record
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise TarFormatError("malformed pax header record")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= space - pos + 1 or pos + length > len(data) or not record.endswith(b"\n"):
            raise TarFormatError("malformed pax header record")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise TarFormatError("pax header record without '='")
        records[key.decode(ENCODING, ERRORS)] = value.decode(ENCODING, ERRORS)
        pos += length
    return records


class _EntryData:
    """The data of the current entry, readable up to its size and no further."""

    def __init__(self, reader: TarReader, size: int) -> None:
        self._reader = reader
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        data = self._reader._read(n) if n else b""
        if len(data) < n:
            raise TarFormatError("tar stream ends inside an entry's data")
        self.left -= len(data)
        return data


class TarReader:
    """Iterate for the entries; `extractfile(entry)` reads the data of the current one."""

    def __init__(self, stream: Readable, limits: TarLimits | None = None) -> None:
        self._stream = stream
        self.limits = limits or TarLimits()
        self.entries = 0
        self._data: _EntryData | None = None
        self._padding = 0

    def _read(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n > 0:
            chunk = self._stream.read(n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self._read(min(n, 1 << 20))
            if not chunk:
                raise TarFormatError("tar stream ends inside an entry's data")
            n -= len(chunk)

    def extractfile(self, member: tarfile.TarInfo) -> _EntryData | None:
        """The current entry's data (None for an entry that has none)."""
        if not member.isreg():
            return None
        return self._data

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while True:
            if self._data is not None:  # what the caller left unread of the last entry
                self._skip(self._data.left + self._padding)
                self._data = None
            member = self._next()
            if member is None:
                return
            yield member

    def _next(self) -> tarfile.TarInfo | None:
        pax: dict[str, str] = {}
        long_name = long_link = None
        extended = 0  # bytes of extended headers for this entry so far
        while True:
            block = self._read(BLOCK)
            if not block or block == bytes(BLOCK):
                if extended:
                    raise TarFormatError("tar stream ends after an extended header")
                return None  # end of archive (a missing end marker is tolerated, as tarfile)
            if len(block) < BLOCK:
                raise TarFormatError("tar stream ends inside a header")
            if not _checksum_ok(block):
                raise TarFormatError("tar header checksum mismatch")
            kind = block[156:157]
            size = _number(block[124:136], "size")
            if kind in (*PAX_TYPES, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                        tarfile.GNUTYPE_LONGLINK):
                extended += size
                if extended > self.limits.max_header_bytes:
                    raise TarLimitExceeded(
                        f"tar extended headers of {extended} bytes for one entry, more than "
                        f"{self.limits.max_header_bytes}"
                    )
                raw = self._read(_padded(size))
                if len(raw) < _padded(size):
                    raise TarFormatError("tar stream ends inside an extended header")
                raw = raw[:size]
                if kind == tarfile.GNUTYPE_LONGNAME:
                    long_name = _text(raw)
                elif kind == tarfile.GNUTYPE_LONGLINK:
                    long_link = _text(raw)
                else:
                    records = parse_pax(raw)
                    if any(k.startswith(SPARSE_PAX_PREFIX) for k in records):
                        raise TarFormatError("sparse tar entries (pax GNU.sparse) are refused")
                    if kind in PAX_TYPES:
                        pax.update(records)
                    # Global records (`g`) would apply to every later entry; none that an
                    # image needs can be global, so they are checked and left out.
                continue
            if kind == tarfile.GNUTYPE_SPARSE:
                raise TarFormatError("sparse tar entries (GNU type S) are refused")
            self.entries += 1
            if self.entries > self.limits.max_entries:
                raise TarLimitExceeded(
                    f"layer has more than {self.limits.max_entries} entries"
                )
            return self._member(block, kind, size, pax, long_name, long_link)

    def _member(
        self, block: bytes, kind: bytes, size: int, pax: dict[str, str],
        long_name: str | None, long_link: str | None,
    ) -> tarfile.TarInfo:
        name = _text(block[0:100])
        if block[257:263] == USTAR_MAGIC and block[345] != 0:
            name = _text(block[345:500]) + "/" + name
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # the old V7 way to write a directory
        path = pax.get("path") or long_name or name
        info = tarfile.TarInfo(path.rstrip("/") if kind == tarfile.DIRTYPE else path)
        info.type = kind
        info.mode = _number(block[100:108], "mode")
        info.uid = _pax_int(pax, "uid", _number(block[108:116], "uid"))
        info.gid = _pax_int(pax, "gid", _number(block[116:124], "gid"))
        info.mtime = _pax_mtime(pax, _number(block[136:148], "mtime"))
        info.linkname = pax.get("linkpath") or long_link or _text(block[157:257])
        info.devmajor = _number(block[329:337], "devmajor")
        info.devminor = _number(block[337:345], "devminor")
        info.pax_headers = pax
        size = _pax_int(pax, "size", size)
        info.size = 0 if kind in HEADER_ONLY else size
        self._data = _EntryData(self, info.size)
        self._padding = _padded(info.size) - info.size
        return info


def _pax_int(pax: dict[str, str], key: str, default: int) -> int:
    value = pax.get(key)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise TarFormatError(f"pax header {key}={value[:32]!r} is not a number")
    return int(value)


def _pax_mtime(pax: dict[str, str], default: int) -> float:
    value = pax.get("mtime")
    if value is None:
        return default
    try:
        mtime = float(value)
    except ValueError:
        mtime = math.nan
    if not math.isfinite(mtime) or abs(mtime) > 2**62 / 1e9:
        raise TarFormatError(f"pax header mtime={value[:32]!r} is not a usable time")
    return mtime
