"""Tar headers to ``Entry`` objects, parsed incrementally from the uncompressed layer stream.

``TarEntryParser`` is push-based: the builder hands it each piece of the tar stream as it
is decompressed, so the layer is never held in memory. It understands ustar, GNU (``L``/``K``
long names and links, base-256 numbers) and PAX (local and global headers, long paths,
``SCHILY.xattr.*``, fractional mtimes, large sizes). Paths are normalized the way containerd
applies a layer: absolute paths become relative and ``..`` stops at the layer root.
"""

from __future__ import annotations

import posixpath
import re
import struct
import tarfile
import zlib
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from index.errors import LayerFormatError, TruncatedLayer, UnsafePath
from index.model import Entry, EntryType

BLOCK = 512
# Go's archive/tar refuses PAX and GNU long-name payloads above 1 MiB; so do we, because the
# payload is held in memory and a hostile layer could otherwise claim gigabytes.
MAX_EXTENSION_SIZE = 1 << 20
# No real layer holds a single file of 1 TiB; a larger size is a corrupt or hostile header.
MAX_ENTRY_SIZE = 1 << 40

_TYPES: dict[bytes, EntryType] = {
    tarfile.REGTYPE: EntryType.FILE,
    tarfile.AREGTYPE: EntryType.FILE,
    tarfile.CONTTYPE: EntryType.FILE,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.FIFOTYPE: EntryType.FIFO,
}
_EXTENSION_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_XATTR_PREFIX = "SCHILY.xattr."
_ZERO_BLOCK = bytes(BLOCK)
# Keys whose presence marks a PAX sparse file (formats 0.0, 0.1 and 1.0).
_SPARSE_KEYS = (
    "GNU.sparse.size",
    "GNU.sparse.numblocks",
    "GNU.sparse.map",
    "GNU.sparse.major",
    "GNU.sparse.realsize",
)
_LONG_NAME_KEYS = frozenset(("path", "linkpath"))
_CACHE_LIMIT = 4096
_NUMBERS: dict[bytes, int] = {}
_NAMES: dict[bytes, str] = {}
_GNU_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)
_DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)
_SIGNED = struct.Struct("512b")
_SIGNED8 = struct.Struct("8b")


def normalize_path(name: str) -> str:
    """Return ``name`` relative to the layer root with ``.``/``..`` resolved inside it; raises UnsafePath on NUL."""
    if "\x00" in name:
        raise UnsafePath(f"entry name {name!r} contains a NUL byte")
    wrapped = f"/{name}/"
    if "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped:
        return name  # no empty, "." or ".." component: already normal, as almost every name is
    # Anchoring at "/" first makes ".." stop at the root, as containerd's RootPath does.
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


def padded(size: int) -> int:
    """Return ``size`` rounded up to a whole number of tar blocks."""
    return -(-size // BLOCK) * BLOCK


def parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse PAX extended header records into raw values; raises LayerFormatError on a malformed record."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the payload with NULs
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n" or b"=" not in data[space:end]:
            raise LayerFormatError(f"malformed PAX record at byte {pos} of an extended header")
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _pax_int(records: dict[str, bytes], key: str, default: int) -> int:
    """Return the integer PAX record ``key``, or ``default``; raises LayerFormatError when not a number."""
    raw = records.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LayerFormatError(f"PAX record {key}={raw!r} is not an integer") from None


def _pax_mtime_ns(raw: bytes) -> int:
    """Return a PAX ``mtime`` (decimal seconds, possibly fractional) as exact nanoseconds."""
    try:
        return int(Decimal(raw.decode("ascii")).scaleb(9))
    except (InvalidOperation, UnicodeDecodeError, ValueError):
        raise LayerFormatError(f"PAX mtime {raw!r} is not a number") from None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Header(NamedTuple):
    """The fields of one tar header block that an entry needs."""

    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    type: bytes
    linkname: str
    uname: str
    gname: str
    devmajor: int
    devminor: int


_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s")
# mode, uid, gid, size, mtime and checksum as GNU tar, Go's archive/tar and Python's tarfile
# write them: zero-padded octal ending in a NUL (the checksum in NUL and space). One regex
# match decodes all six of such a header; any other spelling takes the general path.
_STANDARD_NUMBERS = re.compile(
    rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 "
)
_OCTAL = (8,) * 5


def _number(field: bytes) -> int:
    """Decode a numeric header field: octal text, or GNU base-256 (first byte 0x80 / 0xff for negative)."""
    # Modes, owners and times repeat across a layer: a lookup beats parsing tens of thousands of them.
    cached = _NUMBERS.get(field)
    if cached is not None:
        return cached
    value = _parse_number(field)
    if len(_NUMBERS) < _CACHE_LIMIT:
        _NUMBERS[field] = value
    return value


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _string(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _name(field: bytes) -> str:
    """Decode a user or group name field, which repeats across a layer (hence the cache)."""
    cached = _NAMES.get(field)
    if cached is None:
        cached = _string(field)
        if len(_NAMES) < _CACHE_LIMIT:
            _NAMES[field] = cached
    return cached


def _checksum_ok(block: bytes, expected: int, chksum: bytes) -> bool:
    """Check ``expected`` (the decoded ``chksum`` field) against the sum of the header bytes."""
    # The header sum counts the checksum field as 8 spaces. adler32's low half is 1 + the byte
    # sum mod 65521: a C-speed stand-in for sum(block), exact for a 512-byte block up to that
    # modulus (parsing tens of thousands of headers, the Python-level sum was the cost).
    claimed = expected + sum(chksum) - 256
    if 0 <= claimed <= 255 * BLOCK and ((zlib.adler32(block) & 0xFFFF) - 1 - claimed) % 65521 == 0:
        return True
    # Some old writers summed signed chars; accept that too, as GNU tar and Python's tarfile do.
    return bool(expected == sum(_SIGNED.unpack(block)) - sum(_SIGNED8.unpack(chksum)) + 256)


def parse_header(block: bytes) -> Header:
    """Parse one 512-byte ustar/GNU/v7 header block; raises ValueError on a bad checksum or number."""
    chksum = block[148:156]
    standard = _STANDARD_NUMBERS.fullmatch(block, 100, 156)
    octal = standard.groups() if standard is not None else None
    expected = int(octal[5], 8) if octal else _number(chksum)
    if not _checksum_ok(block, expected, chksum):
        raise ValueError("bad checksum")
    kind = block[156:157]
    if kind in _EXTENSION_TYPES:  # only the size matters: skip decoding the rest
        size = int(octal[3], 8) if octal else _number(block[124:136])
        return tuple.__new__(Header, ("", 0, 0, 0, size, 0, kind, "", "", "", 0, 0))
    (name, mode, uid, gid, size, mtime, _, _, link, magic, uname, gname, major, minor, prefix) = (
        _FIELDS.unpack_from(block)
    )
    numbers = map(int, octal[:5], _OCTAL) if octal else map(_number, (mode, uid, gid, size, mtime))
    path = _string(name)
    if magic[:6] == b"ustar\x00" and prefix[0] and kind not in _GNU_TYPES:
        path = _string(prefix) + "/" + path  # a POSIX ustar long name split in two fields
    if kind == tarfile.AREGTYPE and path.endswith("/"):
        kind = tarfile.DIRTYPE  # old V7 tars mark directories only by the trailing slash
    device = kind in _DEVICE_TYPES
    # tuple.__new__ rather than Header(...): the generated __new__ is Python code, run per header.
    return tuple.__new__(
        Header,
        (
            path,
            *numbers,
            kind,
            _string(link) if link[0] else "",
            _name(uname),
            _name(gname),
            _number(major) if device else 0,
            _number(minor) if device else 0,
        ),
    )


class TarEntryParser:
    """Turns a tar stream, pushed in pieces of any size, into entries with their data offsets.

    Raises ``LayerFormatError`` (or ``UnsafePath``/``TruncatedLayer``) from ``feed``/``finish``;
    every message names ``layer`` and, when known, the entry.
    """

    def __init__(self, layer: str, *, max_entry_size: int = MAX_ENTRY_SIZE) -> None:
        self.layer = layer
        self.entries: list[Entry] = []
        self.ended = False  # an end-of-archive zero block was seen
        self._max_entry_size = max_entry_size
        self._offset = 0  # uncompressed offset of the next byte fed
        self._header = bytearray()  # a partial header block
        self._skip = 0  # data (and padding) bytes still to pass over
        self._collect = 0  # extension payload bytes still to gather
        self._payload = bytearray()
        self._payload_size = 0
        self._payload_type = b""
        self._pending: dict[str, bytes] = {}  # PAX records and GNU long names for the next header
        self._global: dict[str, bytes] = {}
        self._seen: dict[str, EntryType] = {}

    def feed(self, data: bytes | memoryview) -> None:
        """Consume the next piece of the tar stream; raises LayerFormatError on a bad header."""
        n = len(data)
        if self.ended or self._skip >= n:  # past the end, or inside one file's data
            self._skip -= 0 if self.ended else n
            self._offset += n
            return
        pos = 0
        while pos < n and not self.ended:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
            elif self._collect:
                step = min(self._collect, n - pos)
                self._payload += data[pos : pos + step]
                self._collect -= step
                pos += step
                if not self._collect:
                    self._end_extension()
            elif not self._header and n - pos >= BLOCK:
                self._on_header(bytes(data[pos : pos + BLOCK]), self._offset + pos)
                pos += BLOCK
            else:
                step = min(BLOCK - len(self._header), n - pos)
                self._header += data[pos : pos + step]
                pos += step
                if len(self._header) == BLOCK:
                    block, self._header = bytes(self._header), bytearray()
                    self._on_header(block, self._offset + pos - BLOCK)
        self._offset += n

    def finish(self) -> list[Entry]:
        """Return the entries; raises TruncatedLayer if the stream stopped inside a header or an entry."""
        # A stream may end right after a complete entry without the two zero blocks (umoci 0.4
        # writes such layers and containerd accepts them), but not inside one.
        if self._header or self._skip or self._collect or (self._pending and not self.ended):
            where = self.entries[-1].path if self.entries else "(first entry)"
            raise TruncatedLayer(
                f"layer {self.layer}: tar stream ends inside an entry at byte {self._offset} (after {where!r}); "
                "the download is incomplete or the blob is corrupt"
            )
        return self.entries

    def _fail(self, msg: str, offset: int) -> LayerFormatError:
        return LayerFormatError(f"layer {self.layer}: tar entry at byte {offset}: {msg}")

    def _on_header(self, block: bytes, offset: int) -> None:
        if block == _ZERO_BLOCK:  # end of archive; what follows (a second zero block, padding) is ignored
            self.ended = True
            return
        try:
            info = parse_header(block)
        except ValueError as exc:
            raise self._fail(f"invalid header ({exc})", offset) from None
        if info.type in _EXTENSION_TYPES:
            self._start_extension(info, offset)
            return
        self._add_entry(info, offset)

    def _start_extension(self, info: Header, offset: int) -> None:
        if not 0 <= info.size <= MAX_EXTENSION_SIZE:
            raise self._fail(f"extension header of {info.size} bytes (limit {MAX_EXTENSION_SIZE})", offset)
        self._payload_type = info.type
        self._payload_size = info.size
        self._payload = bytearray()
        self._collect = padded(info.size)
        if not self._collect:
            self._end_extension()

    def _end_extension(self) -> None:
        data = bytes(self._payload[: self._payload_size])
        kind = self._payload_type
        if kind == tarfile.GNUTYPE_LONGNAME:
            self._pending["path"] = data.split(b"\x00", 1)[0]
        elif kind == tarfile.GNUTYPE_LONGLINK:
            self._pending["linkpath"] = data.split(b"\x00", 1)[0]
        elif kind == tarfile.XGLTYPE:
            self._global.update(parse_pax(data))
        else:
            self._pending.update(parse_pax(data))

    def _add_entry(self, info: Header, offset: int) -> None:
        mtime_ns = info.mtime * 1_000_000_000
        xattrs: dict[str, bytes] = {}
        if self._global or self._pending:
            records = {**self._global, **self._pending}
            self._pending = {}
            info, mtime_ns, xattrs = self._apply_records(info, records, mtime_ns, offset)
        name = info.name
        etype = _TYPES.get(info.type)
        if etype is None:
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise self._fail(f"{name!r} is a sparse file, which layers must not contain", offset)
            raise self._fail(f"{name!r} has unsupported type {info.type!r}", offset)
        size = info.size
        if not 0 <= size <= self._max_entry_size:
            raise self._fail(f"{name!r} claims an absurd size of {size} bytes", offset)
        data_offset = -1
        if etype is EntryType.FILE:
            self._skip = padded(size)
            data_offset = offset + BLOCK
        else:
            size = 0  # like Go's archive/tar, header-only types carry no data whatever the size says
        path = normalize_path(name)
        if path == "" and etype is not EntryType.DIR:
            raise UnsafePath(
                f"layer {self.layer}: entry {name!r} at byte {offset} would replace the layer root"
            )
        link = info.linkname
        if etype is EntryType.HARDLINK:
            link = self._hardlink_target(name, link, offset)
        # Positional: this runs once per entry and keyword calls cost measurably more.
        entry = Entry(
            path, etype, info.mode & 0o7777, info.uid, info.gid, info.uname, info.gname, size, mtime_ns,
            link, xattrs, info.devmajor, info.devminor, data_offset,
        )  # fmt: skip
        self.entries.append(entry)
        self._seen[path] = etype

    def _apply_records(
        self, info: Header, records: dict[str, bytes], mtime_ns: int, offset: int
    ) -> tuple[Header, int, dict[str, bytes]]:
        """Override header fields with PAX records / GNU long names; return (header, mtime_ns, xattrs)."""
        if records.keys() <= _LONG_NAME_KEYS:  # GNU long names, the common case: nothing else to apply
            path, link = records.get("path"), records.get("linkpath")
            name = info.name if path is None else _text(path)
            linkname = info.linkname if link is None else _text(link)
            return Header._make((name, *info[1:7], linkname, *info[8:])), mtime_ns, {}
        if any(k in records for k in _SPARSE_KEYS):
            raise self._fail(f"{info.name!r} is a sparse file, which layers must not contain", offset)
        info = info._replace(
            name=_text(records["path"]) if "path" in records else info.name,
            linkname=_text(records["linkpath"]) if "linkpath" in records else info.linkname,
            size=_pax_int(records, "size", info.size),
            uid=_pax_int(records, "uid", info.uid),
            gid=_pax_int(records, "gid", info.gid),
            uname=_text(records["uname"]) if "uname" in records else info.uname,
            gname=_text(records["gname"]) if "gname" in records else info.gname,
        )
        if "mtime" in records:
            mtime_ns = _pax_mtime_ns(records["mtime"])
        xattrs = {k[len(_XATTR_PREFIX) :]: v for k, v in records.items() if k.startswith(_XATTR_PREFIX)}
        return info, mtime_ns, xattrs

    def _hardlink_target(self, name: str, link: str, offset: int) -> str:
        target = normalize_path(link)
        kind = self._seen.get(target)
        if kind is None or kind is EntryType.DIR:
            raise UnsafePath(
                f"layer {self.layer}: hardlink {name!r} at byte {offset} points to {link!r}, "
                "which is not an earlier non-directory entry of this layer"
            )
        return target
