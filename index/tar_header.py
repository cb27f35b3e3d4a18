"""One tar header block, or one PAX payload, decoded into values.

What a header says, without the stream around it: ``parse_header`` decodes any ustar, GNU or
V7 header block (octal or base-256 numbers, a ustar name prefix, the signed-sum checksum of
old writers) and raises ``ValueError`` on a bad checksum or number. ``parse_pax``,
``pax_int`` and ``pax_mtime_ns`` read PAX extended header records and raise
``LayerFormatError``; ``index.tar_entries.TarEntryParser`` adds the layer and the entry's
byte offset to every such error.

Headers as tar writers really spell them are decoded faster (see ``STANDARD_HEADER``): one
regex match on the fed piece picks out the fields, and tables of the values of fields that
repeat across a layer (``known_ids`` and the like) save decoding them again.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, TypeVar

from index.errors import LayerFormatError

BLOCK = 512
# Header types whose payload (a PAX record set, or a GNU long name or link) applies to the next
# header instead of being an entry of its own.
EXTENSION_TYPES = frozenset(
    (
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    )
)
_CACHE_LIMIT = 4096  # values per cache: a layer's distinct owners, modes and times fit
_GNU_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)
_DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)
_SIGNED = struct.Struct("512b")
_SIGNED8 = struct.Struct("8b")
_MAX_SUM = 255 * BLOCK  # of a header's bytes
_UNTIL_NUL = re.compile(rb"[^\0]*")
# At most 27 digits: within Decimal's default precision of 28, so its result is exact too.
_PLAIN_SECONDS = re.compile(rb"([0-9]{1,18})(?:\.([0-9]{1,9}))?")
# Go's archive/tar, which containerd applies layers with, refuses a PAX mtime whose seconds do
# not fit in 64 bits; so does pyfuse3 when the mount reports the time.
MTIME_SECONDS_END = 1 << 63
_NOT_A_NUMBER = (InvalidOperation, UnicodeDecodeError, ValueError)
T = TypeVar("T")


def padded(size: int) -> int:
    """Return ``size`` rounded up to a whole number of tar blocks."""
    return -(-size // BLOCK) * BLOCK


def header_text(raw: bytes) -> str:
    """Decode a name, link target or other text of a header or PAX record; undecodable bytes are kept."""
    return raw.decode("utf-8", "surrogateescape")


def until_nul(data: bytes | bytearray | memoryview, start: int, stop: int) -> bytes:
    """Return ``data[start:stop]`` up to its first NUL, as bytes."""
    found = _UNTIL_NUL.match(data, start, stop)
    assert found is not None  # the pattern matches the empty string
    return found[0]


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


def pax_int(records: dict[str, bytes], key: str, default: int) -> int:
    """Return the integer PAX record ``key``, or ``default``; raises LayerFormatError when not a number."""
    raw = records.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LayerFormatError(f"PAX record {key}={raw!r} is not an integer") from None


def pax_mtime_ns(raw: bytes) -> int:
    """Return a PAX ``mtime`` (decimal seconds, possibly fractional) as exact nanoseconds.

    Raises:
        LayerFormatError: ``raw`` is not a finite number, or its seconds do not fit in 64 bits.
    """
    plain = _PLAIN_SECONDS.fullmatch(raw)
    if plain is not None:  # as writers spell it: integer arithmetic, to the same result as Decimal
        seconds, fraction = plain.groups()
        return int(seconds) * 1_000_000_000 + (int(fraction.ljust(9, b"0")) if fraction else 0)
    try:
        value = Decimal(raw.decode("ascii"))
    except _NOT_A_NUMBER:
        raise LayerFormatError(f"PAX record mtime={raw!r} is not a number") from None
    if not value.is_finite():  # Infinity and NaN: no time at all
        raise LayerFormatError(f"PAX record mtime={raw!r} is not a number")
    # Checked before scaling, so that an exponent of millions is refused, not computed.
    if not -MTIME_SECONDS_END <= value < MTIME_SECONDS_END:
        raise LayerFormatError(f"PAX record mtime={raw!r} is out of range (seconds must fit in 64 bits)")
    return int(value.scaleb(9))


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


# Values decoded from the fields of standard headers, keyed by the fields' bytes: modes, owners
# and times repeat across a layer, and a lookup beats decoding tens of thousands of them.
_IDS: dict[bytes, tuple[int, int, int]] = {}
_OWNERS: dict[bytes, tuple[str, str]] = {}
_MTIMES: dict[bytes, int] = {}
_ADLERS: dict[bytes, int] = {}
_NUMBERS: dict[bytes, int] = {}
_NAMES: dict[bytes, str] = {}
# What a field of a STANDARD_HEADER match decoded to before, or None. Callers look first and
# decode on a miss, ``known_ids(field) or standard_ids(field)``: a hit costs no Python call.
# Bound methods, not the dicts: ``_IDS.get(...)`` on a name imported from here would compile
# to an attribute load and a call of the bound method it makes, slower than this (CPython 3.11's compiler).
known_ids = _IDS.get  # mode, uid, gid: group 2
known_owners = _OWNERS.get  # user and group names: group 9
known_mtime_ns = _MTIMES.get  # group 4
known_adler = _ADLERS.get  # checksum digits: group 5


def _remember(cache: dict[bytes, T], field: bytes, value: T) -> T:
    """Return ``value``, decoded from ``field``, kept in ``cache`` while it has room."""
    # A bound, so that a hostile layer of distinct fields cannot grow the cache without end.
    if len(cache) < _CACHE_LIMIT:
        cache[field] = value
    return value


def _number(field: bytes) -> int:
    """Decode a numeric header field: octal text, or GNU base-256 (first byte 0x80 / 0xff for negative)."""
    cached = _NUMBERS.get(field)
    return cached if cached is not None else _remember(_NUMBERS, field, _parse_number(field))


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _cut(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _string(field: bytes) -> str:
    return header_text(_cut(field))


def _name(field: bytes) -> str:
    """Decode a user or group name field."""
    cached = _NAMES.get(field)
    return cached if cached is not None else _remember(_NAMES, field, _string(field))


def standard_ids(field: bytes) -> tuple[int, int, int]:
    """Decode the mode, uid and gid fields of a standard header (24 bytes from offset 100), remembered for ``known_ids``."""
    return _remember(_IDS, field, (int(field[0:7], 8), int(field[8:15], 8), int(field[16:23], 8)))


def standard_owners(field: bytes) -> tuple[str, str]:
    """Decode the user and group name fields (64 bytes from offset 265), remembered for ``known_owners``."""
    return _remember(_OWNERS, field, (_name(field[:32]), _name(field[32:])))


def standard_mtime_ns(field: bytes) -> int:
    """Decode the 11 octal digits of a standard mtime field into nanoseconds, remembered for ``known_mtime_ns``."""
    return _remember(_MTIMES, field, int(field, 8) * 1_000_000_000)


def standard_adler(digits: bytes) -> int:
    """``_adler_of_sum`` for a header whose checksum field holds ``digits``, NUL and space, remembered for ``known_adler``."""
    # As in _checksum_ok, the header sum counts the checksum field as 8 spaces (256) instead.
    return _remember(_ADLERS, digits, _adler_of_sum(int(digits, 8) + sum(digits) + 32 - 256))


def _adler_of_sum(total: int) -> int:
    """The low half of ``zlib.adler32`` of a header block whose bytes add up to ``total`` (-1: none can)."""
    # That half is 1 + the byte sum mod 65521: a C-speed stand-in for sum(block), exact for a
    # 512-byte block up to that modulus (parsing tens of thousands of headers, the Python-level
    # sum was the cost).
    return (1 + total) % 65521 if 0 <= total <= _MAX_SUM else -1


def _sums_to(block: bytes | memoryview, total: int) -> bool:
    """Whether the bytes of ``block`` add up to ``total``."""
    return zlib.adler32(block) & 0xFFFF == _adler_of_sum(total)


def _checksum_ok(block: bytes, expected: int, chksum: bytes) -> bool:
    """Check ``expected`` (the decoded ``chksum`` field) against the sum of the header bytes."""
    # The header sum counts the checksum field as 8 spaces.
    if _sums_to(block, expected + sum(chksum) - 256):
        return True
    # Some old writers summed signed chars; accept that too, as GNU tar and Python's tarfile do.
    return bool(expected == sum(_SIGNED.unpack(block)) - sum(_SIGNED8.unpack(chksum)) + 256)


# A header as GNU tar, Go's archive/tar and Python's tarfile write it: ustar or GNU magic, and
# mode, uid, gid, size, mtime and checksum in zero-padded octal ending in a NUL (the checksum
# in NUL and space). One match, straight on the fed piece, picks out what an entry needs; any
# other spelling (V7, base-256 numbers, numbers padded with spaces) takes parse_header, which
# decodes a standard header to the same values (tests/index/test_tar_fast_path.py checks it).
# The match does not check the checksum: the block's adler32 must also have the low half that
# standard_adler gives for group 5.
STANDARD_HEADER = re.compile(
    rb"(?s)(?=([^\0]{0,100})).{100}"  # 1: name, up to its NUL
    rb"([0-7]{7}\0[0-7]{7}\0[0-7]{7}\0)"  # 2: mode, uid, gid
    rb"([0-7]{11})\0([0-7]{11})\0"  # 3, 4: size, mtime
    rb"([0-7]{6})\0 "  # 5: checksum
    rb"(.)(?:\0.{99}|(?=([^\0]{1,100})).{100})"  # 6: type; 7: link name, None when empty
    rb"ustar(?:  \0|(\0)..)"  # GNU magic, or POSIX (8 matches): then a name prefix may be at 345
    rb"(.{64})"  # 9: user and group names; device numbers (at 329) are read only for devices
)
_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s")


def parse_header(block: bytes) -> Header:
    """Parse one 512-byte ustar/GNU/v7 header block; raises ValueError on a bad checksum or number."""
    chksum = block[148:156]
    if not _checksum_ok(block, _number(chksum), chksum):
        raise ValueError("bad checksum")
    kind = block[156:157]
    if kind in EXTENSION_TYPES:  # only the size matters: skip decoding the rest
        return tuple.__new__(Header, ("", 0, 0, 0, _number(block[124:136]), 0, kind, "", "", "", 0, 0))
    (name, mode, uid, gid, size, mtime, _, _, link, magic, uname, gname, _, _, _) = _FIELDS.unpack_from(block)
    ids = (_number(mode), _number(uid), _number(gid))
    owner = (_name(uname), _name(gname))
    posix = magic[:6] == b"ustar\x00"
    return _header(block, 0, kind, _cut(name), _cut(link), ids, _number(size), _number(mtime), owner, posix)


def standard_header(data: bytes | memoryview, pos: int, fields: tuple[Any, ...]) -> Header:
    """The Header of the block at ``data[pos:]``, given the groups of its ``STANDARD_HEADER`` match."""
    name, ids, size, mtime, _, kind, link, posix, owner = fields
    ids = _IDS.get(ids) or standard_ids(ids)
    owner = _OWNERS.get(owner) or standard_owners(owner)
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
    path = header_text(name)
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
        Header,
        (path, mode, uid, gid, size, mtime, kind, header_text(link) if link else "", *owner, major, minor),
    )
