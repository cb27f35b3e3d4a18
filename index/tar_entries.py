"""Tar headers to ``Entry`` objects, parsed incrementally from the uncompressed layer stream.

``TarEntryParser`` is push-based: the builder hands it each piece of the tar stream as it
is decompressed, so the layer is never held in memory. It understands ustar, GNU (``L``/``K``
long names and links, base-256 numbers) and PAX (local and global headers, long paths,
``SCHILY.xattr.*``, fractional mtimes, large sizes). Paths are normalized the way containerd
applies a layer: absolute paths become relative and ``..`` stops at the layer root.

The parser runs in the index builder's second thread and holds the GIL while it works, so
its speed bounds the whole build. Headers as tar writers really spell them, lying wholly in
the fed piece, take a fast path (``TarEntryParser._scan``); anything else, and every error,
goes through ``parse_header`` and ``TarEntryParser._add_entry``, with the same outcome.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import struct
import tarfile
import zlib
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, TypeVar

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
# Types whose header needs nothing beyond its own standard fields (see TarEntryParser._scan).
_PLAIN_TYPES = {
    tarfile.REGTYPE: EntryType.FILE,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
}
_EXTENSION_TYPES = frozenset(
    (
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    )
)
_LONG_NAMES = {tarfile.GNUTYPE_LONGNAME: "path", tarfile.GNUTYPE_LONGLINK: "linkpath"}
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
# PAX records that change no more than names and the mtime (atime and ctime are not kept).
_NAME_AND_TIME_KEYS = frozenset(("path", "linkpath", "mtime", "atime", "ctime"))
_CACHE_LIMIT = 4096
_NUMBERS: dict[bytes, int] = {}
_NAMES: dict[bytes, str] = {}
_IDS: dict[bytes, tuple[int, int, int]] = {}
_OWNERS: dict[bytes, tuple[str, str]] = {}
_MTIMES: dict[bytes, int] = {}
_ADLERS: dict[bytes, int] = {}
_GNU_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)
_DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)
_SIGNED = struct.Struct("512b")
_SIGNED8 = struct.Struct("8b")
_FILE, _DIR, _HARDLINK = EntryType.FILE, EntryType.DIR, EntryType.HARDLINK
_MAX_SUM = 255 * BLOCK  # of a header's bytes
_UNTIL_NUL = re.compile(rb"[^\0]*")
# At most 27 digits: within Decimal's default precision of 28, so its result is exact too.
_PLAIN_SECONDS = re.compile(rb"([0-9]{1,18})(?:\.([0-9]{1,9}))?")


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
    pos, size = 0, len(data)
    while pos < size:
        if data[pos] == 0:  # some writers pad the payload with NULs
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        # The key runs from the space to the first "=", the value from there to the final newline.
        equals = data.find(b"=", space, end) if length > 0 and end <= size and data[end - 1] == 0x0A else -1
        if equals < 0:
            raise LayerFormatError(f"malformed PAX record at byte {pos} of an extended header")
        records[data[space + 1 : equals].decode("utf-8", "surrogateescape")] = data[equals + 1 : end - 1]
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
    plain = _PLAIN_SECONDS.fullmatch(raw)
    if plain is not None:  # as writers spell it: integer arithmetic, to the same result as Decimal
        seconds, fraction = plain.groups()
        return int(seconds) * 1_000_000_000 + (int(fraction.ljust(9, b"0")) if fraction else 0)
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
# A header as GNU tar, Go's archive/tar and Python's tarfile write it: ustar or GNU magic, and
# mode, uid, gid, size, mtime and checksum in zero-padded octal ending in a NUL (the checksum
# in NUL and space). One match, straight on the fed piece, picks out what an entry needs; any
# other spelling (V7, base-256 numbers, numbers padded with spaces) takes parse_header, which
# decodes a standard header to the same values (tests/index/test_tar_fast_path.py checks it).
_STANDARD_HEADER = re.compile(
    rb"(?s)(?=([^\0]{0,100})).{100}"  # 1: name, up to its NUL
    rb"([0-7]{7}\0[0-7]{7}\0[0-7]{7}\0)"  # 2: mode, uid, gid
    rb"([0-7]{11})\0([0-7]{11})\0"  # 3, 4: size, mtime
    rb"([0-7]{6})\0 "  # 5: checksum
    rb"(.)(?:\0.{99}|(?=([^\0]{1,100})).{100})"  # 6: type; 7: link name, None when empty
    rb"ustar(?:  \0|(\0)..)"  # GNU magic, or POSIX (8 matches): then a name prefix may be at 345
    rb"(.{64})"  # 9: user and group names; device numbers (at 329) are read only for devices
)
T = TypeVar("T")


def _remember(cache: dict[bytes, T], field: bytes, decode: Callable[[bytes], T]) -> T:
    """Return ``decode(field)``, kept in ``cache`` while it has room."""
    # Modes, owners, names and times repeat across a layer: a lookup beats decoding tens of
    # thousands of them.
    value = decode(field)
    if len(cache) < _CACHE_LIMIT:
        cache[field] = value
    return value


def _number(field: bytes) -> int:
    """Decode a numeric header field: octal text, or GNU base-256 (first byte 0x80 / 0xff for negative)."""
    cached = _NUMBERS.get(field)
    return cached if cached is not None else _remember(_NUMBERS, field, _parse_number)


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _cut(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _string(field: bytes) -> str:
    return _text(_cut(field))


def _name(field: bytes) -> str:
    """Decode a user or group name field."""
    cached = _NAMES.get(field)
    return cached if cached is not None else _remember(_NAMES, field, _string)


def _standard_ids(field: bytes) -> tuple[int, int, int]:
    """Decode the mode, uid and gid fields of a standard header (24 bytes from offset 100)."""
    return int(field[0:7], 8), int(field[8:15], 8), int(field[16:23], 8)


def _owner_names(field: bytes) -> tuple[str, str]:
    """Decode the user and group name fields (64 bytes from offset 265)."""
    return _name(field[:32]), _name(field[32:])


def _mtime_ns(field: bytes) -> int:
    """Decode the 11 octal digits of a standard mtime field into nanoseconds."""
    return int(field, 8) * 1_000_000_000


def _until_nul(data: bytes | bytearray | memoryview, start: int, stop: int) -> bytes:
    """Return ``data[start:stop]`` up to its first NUL, as bytes."""
    found = _UNTIL_NUL.match(data, start, stop)
    assert found is not None  # the pattern matches the empty string
    return found[0]


def _adler_of_sum(total: int) -> int:
    """The low half of ``zlib.adler32`` of a header block whose bytes add up to ``total`` (-1: none can)."""
    # That half is 1 + the byte sum mod 65521: a C-speed stand-in for sum(block), exact for a
    # 512-byte block up to that modulus (parsing tens of thousands of headers, the Python-level
    # sum was the cost).
    return (1 + total) % 65521 if 0 <= total <= _MAX_SUM else -1


def _sums_to(block: bytes | memoryview, total: int) -> bool:
    """Whether the bytes of ``block`` add up to ``total``."""
    return zlib.adler32(block) & 0xFFFF == _adler_of_sum(total)


def _standard_adler(digits: bytes) -> int:
    """``_adler_of_sum`` for a standard header whose checksum field holds ``digits``, NUL and space."""
    # As in _checksum_ok, the header sum counts the checksum field as 8 spaces (256) instead.
    return _adler_of_sum(int(digits, 8) + sum(digits) + 32 - 256)


def _checksum_ok(block: bytes, expected: int, chksum: bytes) -> bool:
    """Check ``expected`` (the decoded ``chksum`` field) against the sum of the header bytes."""
    # The header sum counts the checksum field as 8 spaces.
    if _sums_to(block, expected + sum(chksum) - 256):
        return True
    # Some old writers summed signed chars; accept that too, as GNU tar and Python's tarfile do.
    return bool(expected == sum(_SIGNED.unpack(block)) - sum(_SIGNED8.unpack(chksum)) + 256)


def parse_header(block: bytes) -> Header:
    """Parse one 512-byte ustar/GNU/v7 header block; raises ValueError on a bad checksum or number."""
    chksum = block[148:156]
    if not _checksum_ok(block, _number(chksum), chksum):
        raise ValueError("bad checksum")
    kind = block[156:157]
    if kind in _EXTENSION_TYPES:  # only the size matters: skip decoding the rest
        return tuple.__new__(Header, ("", 0, 0, 0, _number(block[124:136]), 0, kind, "", "", "", 0, 0))
    (name, mode, uid, gid, size, mtime, _, _, link, magic, uname, gname, _, _, _) = _FIELDS.unpack_from(block)
    ids = (_number(mode), _number(uid), _number(gid))
    owner = (_name(uname), _name(gname))
    posix = magic[:6] == b"ustar\x00"
    return _header(block, 0, kind, _cut(name), _cut(link), ids, _number(size), _number(mtime), owner, posix)


def _standard_header(data: bytes | memoryview, pos: int, fields: tuple[Any, ...]) -> Header:
    """The Header of the entry block at ``data[pos:]``, given the groups of its ``_STANDARD_HEADER`` match."""
    name, ids, size, mtime, _, kind, link, posix, owner = fields
    ids = _IDS.get(ids) or _remember(_IDS, ids, _standard_ids)
    owner = _OWNERS.get(owner) or _remember(_OWNERS, owner, _owner_names)
    return _header(data, pos, kind, name, link, ids, int(size, 8), int(mtime, 8), owner, posix is not None)


def _header(
    block: bytes | memoryview,
    base: int,
    kind: bytes,
    name: bytes,
    link: bytes | None,
    ids: tuple[int, int, int],
    size: int,
    mtime: int,
    owner: tuple[str, str],
    posix: bool,
) -> Header:
    """Assemble the Header of the block at ``block[base:]`` from its decoded fields (strings cut at NUL)."""
    path = _text(name)
    if posix and block[base + 345] and kind not in _GNU_TYPES:
        path = _string(bytes(block[base + 345 : base + 500])) + "/" + path  # a ustar name split in two
    if kind == tarfile.AREGTYPE and path.endswith("/"):
        kind = tarfile.DIRTYPE  # old V7 tars mark directories only by the trailing slash
    mode, uid, gid = ids
    major = minor = 0
    if kind in _DEVICE_TYPES:
        major, minor = (
            _number(bytes(block[base + 329 : base + 337])),
            _number(bytes(block[base + 337 : base + 345])),
        )
    # tuple.__new__ rather than Header(...): the generated __new__ is Python code, run per header.
    return tuple.__new__(
        Header, (path, mode, uid, gid, size, mtime, kind, _text(link) if link else "", *owner, major, minor)
    )


class _EntrySlots:
    """``Entry``'s slots without its frozen ``__setattr__``: filled by plain stores, then made an ``Entry``.

    A frozen dataclass' ``__init__`` calls ``object.__setattr__`` for each field: five times the
    cost of plain stores, a fifth of the parser's time on a layer of tens of thousands of
    entries. Assigning ``__class__`` then turns the filled twin into a genuine ``Entry``, which
    the identical slot layout allows.
    """

    __slots__ = tuple(f.name for f in dataclasses.fields(Entry))


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
        pos, self._skip = self._skip, 0  # the data running on from the last piece ends in this one
        while pos < n and not self.ended:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
            elif self._collect:
                pos = self._gather(data, pos, n)
            elif not self._header and n - pos >= BLOCK:
                pos = self._scan(data, pos, n)
            else:  # a header cut by the end of the piece
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

    def _scan(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Parse the headers lying wholly in ``data[pos:end]``, with the payloads and data that do too.

        Returns where ``feed`` takes over: ``end``, or the header, payload or data cut by ``end``.
        """
        # Nearly every header is standard and lies inside the fed piece. Such a header is
        # decoded where it lies, and an extension payload or a plain entry handled here in
        # line: each header costs a few microseconds, of which a call or a detour through the
        # general path would be a good part. Anything else takes the general path.
        match = _STANDARD_HEADER.match
        adler32 = zlib.adler32
        while end - pos >= BLOCK:
            found = match(data, pos, pos + BLOCK)
            fields = found.groups() if found is not None else None
            if fields is None or adler32(data[pos : pos + BLOCK]) & 0xFFFF != (  # as _sums_to
                _ADLERS.get(fields[4]) or _remember(_ADLERS, fields[4], _standard_adler)
            ):
                # Not standard; or summed as signed bytes by an old writer, or corrupt.
                self._on_header(bytes(data[pos : pos + BLOCK]), self._offset + pos)
                if self.ended or self._collect:
                    return pos + BLOCK
            elif fields[5] in _EXTENSION_TYPES:
                kind, size = fields[5], int(fields[2], 8)
                stop = pos + BLOCK + ((size + 511) & -512)  # padded(size)
                if stop > end or size > MAX_EXTENSION_SIZE:  # gathered piecewise, or refused
                    self._start_extension(kind, size, self._offset + pos)
                    return pos + BLOCK
                self._end_extension(kind, data, pos + BLOCK, size)
                pos = stop
                continue
            else:
                self._add_standard_entry(data, pos, fields)
            pos += BLOCK
            skip = self._skip
            if skip:
                if skip > end - pos:  # data running on into the next pieces
                    self._skip = skip - (end - pos)
                    return end
                pos += skip
                self._skip = 0
        return pos

    def _add_standard_entry(self, data: bytes | memoryview, pos: int, fields: tuple[Any, ...]) -> None:
        """Add the entry of the standard header at ``data[pos:]`` (``fields``: its match's groups)."""
        name, ids, size, mtime, _, kind, link, posix, owner = fields
        etype = _PLAIN_TYPES.get(kind)
        records = self._pending
        if (
            etype is None  # hardlink, device, fifo, old-style file or directory
            or self._global
            or not _NAME_AND_TIME_KEYS.issuperset(records)
            or (posix and data[pos + 345])  # a name prefix
        ):
            self._add_entry(_standard_header(data, pos, fields), self._offset + pos)
            return
        # What _add_entry(_standard_header(...)) does for the common entry, in fewer steps.
        mtime_ns = _MTIMES.get(mtime) or _remember(_MTIMES, mtime, _mtime_ns)
        if records:
            self._pending = {}
            name = records.get("path", name)
            link = records.get("linkpath", link)
            if "mtime" in records:
                mtime_ns = _pax_mtime_ns(records["mtime"])
        mode, uid, gid = _IDS.get(ids) or _remember(_IDS, ids, _standard_ids)
        uname, gname = _OWNERS.get(owner) or _remember(_OWNERS, owner, _owner_names)
        self._append(
            self._offset + pos, _text(name), etype, mode, uid, gid, uname, gname, int(size, 8), mtime_ns,
            _text(link) if link else "", {}, 0, 0,
        )  # fmt: skip

    def _fail(self, msg: str, offset: int) -> LayerFormatError:
        return LayerFormatError(f"layer {self.layer}: tar entry at byte {offset}: {msg}")

    def _gather(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Take extension payload from ``data[pos:end]``; return the position after what was taken."""
        step = min(self._collect, end - pos)
        self._payload += data[pos : pos + step]
        self._collect -= step
        if not self._collect:
            self._end_extension(self._payload_type, self._payload, 0, self._payload_size)
        return pos + step

    def _on_header(self, block: bytes, offset: int) -> None:
        if block == _ZERO_BLOCK:  # end of archive; what follows (a second zero block, padding) is ignored
            self.ended = True
            return
        try:
            info = parse_header(block)
        except ValueError as exc:
            raise self._fail(f"invalid header ({exc})", offset) from None
        if info.type in _EXTENSION_TYPES:
            self._start_extension(info.type, info.size, offset)
        else:
            self._add_entry(info, offset)

    def _start_extension(self, kind: bytes, size: int, offset: int) -> None:
        if not 0 <= size <= MAX_EXTENSION_SIZE:
            raise self._fail(f"extension header of {size} bytes (limit {MAX_EXTENSION_SIZE})", offset)
        self._payload_type = kind
        self._payload_size = size
        self._payload = bytearray()
        self._collect = padded(size)
        if not self._collect:
            self._end_extension(kind, b"", 0, 0)

    def _end_extension(
        self, kind: bytes, data: bytes | bytearray | memoryview, start: int, size: int
    ) -> None:
        """Apply the payload ``data[start:start + size]`` of an extension header of type ``kind``."""
        key = _LONG_NAMES.get(kind)
        if key is not None:
            self._pending[key] = _until_nul(data, start, start + size)
        elif kind == tarfile.XGLTYPE:
            self._global.update(parse_pax(bytes(data[start : start + size])))
        else:
            self._pending.update(parse_pax(bytes(data[start : start + size])))

    def _add_entry(self, info: Header, offset: int) -> None:
        """Add the entry of header ``info``, at ``offset``, with the pending PAX records and long names."""
        name, mode, uid, gid, size, mtime, kind, link, uname, gname, devmajor, devminor = info
        mtime_ns = mtime * 1_000_000_000
        xattrs: dict[str, bytes] = {}
        if self._global or self._pending:
            records = {**self._global, **self._pending}
            self._pending = {}
            if not _LONG_NAME_KEYS.issuperset(records):  # PAX records; GNU long names alone only rename
                if not records.keys().isdisjoint(_SPARSE_KEYS):
                    raise self._fail(f"{name!r} is a sparse file, which layers must not contain", offset)
                size = _pax_int(records, "size", size)
                uid = _pax_int(records, "uid", uid)
                gid = _pax_int(records, "gid", gid)
                uname = _text(records["uname"]) if "uname" in records else uname
                gname = _text(records["gname"]) if "gname" in records else gname
                if "mtime" in records:
                    mtime_ns = _pax_mtime_ns(records["mtime"])
                xattrs = {
                    k[len(_XATTR_PREFIX) :]: v for k, v in records.items() if k.startswith(_XATTR_PREFIX)
                }
            name = _text(records["path"]) if "path" in records else name
            link = _text(records["linkpath"]) if "linkpath" in records else link
        etype = _TYPES.get(kind)
        if etype is None:
            if kind == tarfile.GNUTYPE_SPARSE:
                raise self._fail(f"{name!r} is a sparse file, which layers must not contain", offset)
            raise self._fail(f"{name!r} has unsupported type {kind!r}", offset)
        self._append(
            offset, name, etype, mode, uid, gid, uname, gname, size, mtime_ns, link, xattrs,
            devmajor, devminor,
        )  # fmt: skip

    def _append(
        self, offset: int, name: str, etype: EntryType, mode: int, uid: int, gid: int, uname: str, gname: str,
        size: int, mtime_ns: int, link: str, xattrs: dict[str, bytes], devmajor: int, devminor: int,
    ) -> None:  # fmt: skip
        """Check and add the entry of the header at ``offset``, its fields final."""
        if not 0 <= size <= self._max_entry_size:
            raise self._fail(f"{name!r} claims an absurd size of {size} bytes", offset)
        data_offset = -1
        if etype is _FILE:
            self._skip = padded(size)
            data_offset = offset + BLOCK
        else:
            size = 0  # like Go's archive/tar, header-only types carry no data whatever the size says
        path = normalize_path(name)
        if path == "" and etype is not _DIR:
            raise UnsafePath(
                f"layer {self.layer}: entry {name!r} at byte {offset} would replace the layer root"
            )
        if etype is _HARDLINK:
            link = self._hardlink_target(name, link, offset)
        entry: Any = object.__new__(_EntrySlots)  # see _EntrySlots: Entry(...) costs five times as much
        entry.path = path
        entry.type = etype
        entry.mode = mode & 0o7777
        entry.uid = uid
        entry.gid = gid
        entry.uname = uname
        entry.gname = gname
        entry.size = size
        entry.mtime_ns = mtime_ns
        entry.link_target = link
        entry.xattrs = xattrs
        entry.devmajor = devmajor
        entry.devminor = devminor
        entry.data_offset = data_offset
        entry.chunks = ()
        entry.__class__ = Entry
        self.entries.append(entry)
        self._seen[path] = etype

    def _hardlink_target(self, name: str, link: str, offset: int) -> str:
        target = normalize_path(link)
        kind = self._seen.get(target)
        if kind is None or kind is EntryType.DIR:
            raise UnsafePath(
                f"layer {self.layer}: hardlink {name!r} at byte {offset} points to {link!r}, "
                "which is not an earlier non-directory entry of this layer"
            )
        return target
