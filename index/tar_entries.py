"""Tar headers to ``Entry`` objects, parsed incrementally from the uncompressed layer stream.

``TarEntryParser`` is push-based: the builder hands it each piece of the tar stream as it
is decompressed, so the layer is never held in memory. It understands ustar, GNU (``L``/``K``
long names and links, base-256 numbers) and PAX (local and global headers, long paths,
``SCHILY.xattr.*``, fractional mtimes, large sizes). Paths are normalized the way containerd
applies a layer: absolute paths become relative and ``..`` stops at the layer root. What one
header block or PAX payload says is decoded by ``index.tar_header``; this module keeps the
state between them (payloads, pending records, hardlink targets) and builds the entries.

The parser runs in the index builder's second thread and holds the GIL while it works, so
its speed bounds the whole build. Headers as tar writers really spell them, lying wholly in
the fed piece, take a fast path (``TarEntryParser._scan``); anything else, and every error,
goes through ``parse_header`` and ``TarEntryParser._add_entry``, with the same outcome.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
import zlib
from typing import Any

from index.entry_limits import entry_problem, shown
from index.errors import LayerFormatError, TruncatedLayer, UnsafePath
from index.model import Entry, EntryType
from index.tar_header import (
    BLOCK,
    EXTENSION_TYPES,
    MTIME_SECONDS_END,
    STANDARD_HEADER,
    Header,
    header_text,
    known_adler,
    known_ids,
    known_mtime_ns,
    known_owners,
    padded,
    parse_header,
    parse_pax,
    pax_int,
    pax_mtime_ns,
    standard_adler,
    standard_header,
    standard_ids,
    standard_mtime_ns,
    standard_owners,
    until_nul,
)

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
_FILE, _DIR, _HARDLINK = EntryType.FILE, EntryType.DIR, EntryType.HARDLINK


def normalize_path(name: str) -> str:
    """Return ``name`` relative to the layer root with ``.``/``..`` resolved inside it; raises UnsafePath on NUL."""
    if "\x00" in name:
        raise UnsafePath(f"entry name {shown(name)} contains a NUL byte")
    wrapped = f"/{name}/"
    if "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped:
        return name  # no empty, "." or ".." component: already normal, as almost every name is
    # Anchoring at "/" first makes ".." stop at the root, as containerd's RootPath does.
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


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
    every message names ``layer`` and, when known, the entry. ``offset``: where in the tar
    stream the first byte fed lies; ``fragment``: the stream is fed from there, not from its start.
    """

    def __init__(
        self, layer: str, *, max_entry_size: int = MAX_ENTRY_SIZE, offset: int = 0, fragment: bool = False
    ) -> None:
        self.layer = layer
        # A fragment (the headers before one file, checked at its first read) starts mid-archive:
        # a hardlink in it may name an entry before the fragment, so its target is not looked up.
        self._fragment = fragment
        self.entries: list[Entry] = []
        self.ended = False  # an end-of-archive zero block was seen
        self._max_entry_size = max_entry_size
        self._offset = offset  # uncompressed offset of the next byte fed (a header run may be fed alone)
        self._run_start = -1  # offset of the first extension header before the next entry's header
        self._header = bytearray()  # a partial header block
        self._skip = 0  # data (and padding) bytes still to pass over
        self._collect = 0  # extension payload bytes still to gather
        self._payload = bytearray()
        self._payload_size = 0
        self._payload_type = b""
        self._payload_offset = 0  # of the extension header whose payload is being gathered
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
        match = STANDARD_HEADER.match
        adler32 = zlib.adler32
        while end - pos >= BLOCK:
            found = match(data, pos, pos + BLOCK)
            fields = found.groups() if found is not None else None
            if fields is None or adler32(data[pos : pos + BLOCK]) & 0xFFFF != (  # the checksum test
                known_adler(fields[4]) or standard_adler(fields[4])
            ):
                # Not standard; or summed as signed bytes by an old writer, or corrupt.
                self._on_header(bytes(data[pos : pos + BLOCK]), self._offset + pos)
                if self.ended or self._collect:
                    return pos + BLOCK
            elif fields[5] in EXTENSION_TYPES:
                kind, size = fields[5], int(fields[2], 8)
                stop = pos + BLOCK + ((size + 511) & -512)  # padded(size)
                if stop > end or size > MAX_EXTENSION_SIZE:  # gathered piecewise, or refused
                    self._start_extension(kind, size, self._offset + pos)
                    return pos + BLOCK
                self._end_extension(kind, data, pos + BLOCK, size, self._offset + pos)
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
            try:  # a device's numbers are decoded only now, and may be no number at all
                info = standard_header(data, pos, fields)
            except ValueError as exc:
                raise self._fail(f"invalid header ({exc})", self._offset + pos) from None
            self._add_entry(info, self._offset + pos)
            return
        # What _add_entry(standard_header(...)) does for the common entry, in fewer steps.
        mtime_ns = known_mtime_ns(mtime) or standard_mtime_ns(mtime)
        if records:
            self._pending = {}
            name = records.get("path", name)
            link = records.get("linkpath", link)
            if "mtime" in records:
                try:  # in line, not in a helper: a call here would cost most entries of a PAX layer
                    mtime_ns = pax_mtime_ns(records["mtime"])
                except LayerFormatError as exc:
                    raise self._fail(str(exc), self._offset + pos) from None
        mode, uid, gid = known_ids(ids) or standard_ids(ids)
        uname, gname = known_owners(owner) or standard_owners(owner)
        self._append(
            self._offset + pos, header_text(name), etype, mode, uid, gid, uname, gname, int(size, 8), mtime_ns,
            header_text(link) if link else "", {}, 0, 0,
        )  # fmt: skip

    def _fail(self, msg: str, offset: int) -> LayerFormatError:
        return LayerFormatError(f"layer {self.layer}: tar entry at byte {offset}: {msg}")

    def _gather(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Take extension payload from ``data[pos:end]``; return the position after what was taken."""
        step = min(self._collect, end - pos)
        self._payload += data[pos : pos + step]
        self._collect -= step
        if not self._collect:
            self._end_extension(
                self._payload_type, self._payload, 0, self._payload_size, self._payload_offset
            )
        return pos + step

    def _on_header(self, block: bytes, offset: int) -> None:
        if block == _ZERO_BLOCK:  # end of archive; what follows (a second zero block, padding) is ignored
            self.ended = True
            return
        try:
            info = parse_header(block)
        except ValueError as exc:
            raise self._fail(f"invalid header ({exc})", offset) from None
        if info.type in EXTENSION_TYPES:
            self._start_extension(info.type, info.size, offset)
        else:
            self._add_entry(info, offset)

    def _start_extension(self, kind: bytes, size: int, offset: int) -> None:
        if not 0 <= size <= MAX_EXTENSION_SIZE:
            raise self._fail(f"extension header of {size} bytes (limit {MAX_EXTENSION_SIZE})", offset)
        self._payload_type = kind
        self._payload_size = size
        self._payload_offset = offset
        self._payload = bytearray()
        self._collect = padded(size)
        if not self._collect:
            self._end_extension(kind, b"", 0, 0, offset)

    def _end_extension(
        self, kind: bytes, data: bytes | bytearray | memoryview, start: int, size: int, offset: int
    ) -> None:
        """Apply the payload ``data[start:start + size]`` of the extension header at ``offset``, of type ``kind``."""
        if self._run_start < 0:
            self._run_start = offset
        key = _LONG_NAMES.get(kind)
        if key is not None:
            self._pending[key] = until_nul(data, start, start + size)
            return
        try:
            records = parse_pax(bytes(data[start : start + size]))
        except LayerFormatError as exc:
            raise self._fail(str(exc), offset) from None
        (self._global if kind == tarfile.XGLTYPE else self._pending).update(records)

    def _add_entry(self, info: Header, offset: int) -> None:
        """Add the entry of header ``info``, at ``offset``, with the pending PAX records and long names."""
        name, mode, uid, gid, size, mtime, kind, link, uname, gname, devmajor, devminor = info
        if not -MTIME_SECONDS_END <= mtime < MTIME_SECONDS_END:  # only a base-256 field can say so
            raise self._fail(f"{name!r} has mtime {mtime}, beyond 64-bit seconds", offset)
        mtime_ns = mtime * 1_000_000_000
        xattrs: dict[str, bytes] = {}
        if self._global or self._pending:
            records = {**self._global, **self._pending}
            self._pending = {}
            if not _LONG_NAME_KEYS.issuperset(records):  # PAX records; GNU long names alone only rename
                if not records.keys().isdisjoint(_SPARSE_KEYS):
                    raise self._fail(f"{name!r} is a sparse file, which layers must not contain", offset)
                try:
                    size = pax_int(records, "size", size)
                    uid = pax_int(records, "uid", uid)
                    gid = pax_int(records, "gid", gid)
                    if "mtime" in records:
                        mtime_ns = pax_mtime_ns(records["mtime"])
                except LayerFormatError as exc:
                    raise self._fail(str(exc), offset) from None
                uname = header_text(records["uname"]) if "uname" in records else uname
                gname = header_text(records["gname"]) if "gname" in records else gname
                xattrs = {
                    k[len(_XATTR_PREFIX) :]: v for k, v in records.items() if k.startswith(_XATTR_PREFIX)
                }
            name = header_text(records["path"]) if "path" in records else name
            link = header_text(records["linkpath"]) if "linkpath" in records else link
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
        try:
            path = normalize_path(name)
        except UnsafePath as exc:
            raise UnsafePath(f"layer {self.layer}: tar entry at byte {offset}: {exc}") from None
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
        entry.header_member = -1
        if self._run_start < 0:  # no extension records: the run is the header block alone
            entry.header_offset = offset
        else:
            entry.header_offset = self._run_start
            self._run_start = -1
        entry.__class__ = Entry
        # Every field against what Linux allows (index.entry_limits): ids, sizes, times, device
        # numbers, name lengths, xattrs. A layer the eager unpack cannot apply is refused here.
        problem = entry_problem(entry)
        if problem is not None:
            raise self._fail(f"{shown(name)} {problem}", offset)
        self.entries.append(entry)
        self._seen[path] = etype

    def _hardlink_target(self, name: str, link: str, offset: int) -> str:
        target = normalize_path(link)
        kind = self._seen.get(target)
        if (kind is None or kind is EntryType.DIR) and not self._fragment:
            raise UnsafePath(
                f"layer {self.layer}: hardlink {name!r} at byte {offset} points to {link!r}, "
                "which is not an earlier non-directory entry of this layer"
            )
        return target
