"""The completion check: once a layer's blob is complete and verified, its index must say what its tar says.

The blob digest and the DiffID prove the blob, not the index served beside it: a published
index or an eStargz TOC can list an invented setuid file, drop a whiteout, or map a file to
another file's bytes with every span digest genuine. So when a layer completes, its tar is
replayed, streamed through the same tar parser the index builder uses, and every entry the
mount shows is compared with the tar's: type, mode, owner, size, mtime, link target, device
numbers, xattrs and where its content lies (``data_offset`` and ``header_offset`` in the tar
stream; for eStargz, every chunk's member and inner offset must land on the file's bytes).

What is compared is the listing an eager unpack shows: within a layer a later entry for a path
replaces an earlier one, so each side is reduced to the last entry of each path (a hardlink
stands for the entry its target was when the link came, as ``fusefs.merged_tree`` resolves it).
Whiteouts are ordinary entries. For eStargz, ``stargz.index.json`` and the prefetch landmarks
at the layer root are the format's bookkeeping, which ``index.estargz`` leaves out of the
index: they are left out of the tar's side too, as nowhere else.

``compare_with_blob`` returns the differences as sentences (empty: the index is the tar's);
``verify_index`` raises ``IndexMismatch`` with them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from index.errors import IndexMismatch, LayerFormatError
from index.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from index.header_check import shown
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex
from index.tar_entries import TarEntryParser
from index.zstd_frames import ZstdScanner

_BOOKKEEPING = frozenset((TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK))
# What the mount shows of an entry, compared one by one (content: see _content_differences).
_SHOWN_FIELDS = ("type", "mode", "uid", "gid", "size", "link_target", "devmajor", "devminor", "xattrs")
_OUTPUT_PIECE = 4 << 20  # bound on one decompression call's output: a small blob may inflate hugely


@dataclass(frozen=True, slots=True)
class _Member:
    """Where one gzip member's output lies in the tar stream."""

    start: int
    end: int


class _GzipMembers:
    """Inflates back-to-back gzip members pushed in pieces, recording where each member's output lies."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.members: dict[int, _Member] = {}  # by the blob offset the member starts at
        self._sink = sink
        self._decoder: zlib._Decompress | None = None
        self._compressed = 0  # blob offset of the next byte fed
        self._uncompressed = 0
        self._member_start = (0, 0)

    def feed(self, data: bytes) -> None:
        """Consume the next piece of the blob; raises zlib.error on corrupt data."""
        while data:
            if self._decoder is None:
                self._decoder = zlib.decompressobj(31)
                self._member_start = (self._compressed, self._uncompressed)
            decoder = self._decoder
            out = decoder.decompress(data, _OUTPUT_PIECE)
            rest = decoder.unused_data if decoder.eof else decoder.unconsumed_tail
            self._compressed += len(data) - len(rest)
            self._uncompressed += len(out)
            if out:
                self._sink(out)
            if decoder.eof:
                self.members[self._member_start[0]] = _Member(self._member_start[1], self._uncompressed)
                self._decoder = None
            data = rest

    def finish(self) -> None:
        """Check that the blob ended after a whole member; raises zlib.error otherwise."""
        if self._decoder is not None:
            raise zlib.error(f"the blob ends inside the gzip member at byte {self._member_start[0]}")


def compare_with_blob(index: LayerIndex, blob: Iterable[bytes]) -> list[str]:
    """Decompress a layer's verified blob (pieces in order) as ``index.format`` says and compare ``index`` with its tar.

    Returns the differences, one sentence each, naming the path and the field (empty: the
    index is what the tar says). A blob that does not decompress, or a tar that does not
    parse, is one difference too; nothing is raised for it.
    """
    parser = TarEntryParser(index.digest)
    members: dict[int, _Member] | None = None
    try:
        if index.format is LayerFormat.TAR:
            for piece in blob:
                parser.feed(piece)
        elif index.format is LayerFormat.ZSTD:
            zstd = ZstdScanner(parser.feed)
            for piece in blob:
                zstd.feed(piece)
            zstd.finish()
        else:  # gzip, and eStargz: its members are gzip members, back to back
            gzip = _GzipMembers(parser.feed)
            for piece in blob:
                gzip.feed(piece)
            gzip.finish()
            members = gzip.members if index.format is LayerFormat.ESTARGZ else None
        entries = parser.finish()
    except (LayerFormatError, zlib.error) as exc:
        return [f"the blob does not replay as a tar: {exc}"]
    return compare_entries(index, entries, members)


def compare_with_tar(index: LayerIndex, tar: Iterable[bytes]) -> list[str]:
    """Compare a tar/gzip/zstd layer's ``index`` with its uncompressed tar (pieces in order); return the differences.

    Raises:
        ValueError: ``index`` is eStargz, whose chunks can only be checked against the blob
            (``compare_with_blob``).
    """
    if index.format is LayerFormat.ESTARGZ:
        raise ValueError("an eStargz index is compared with its blob: use compare_with_blob")
    parser = TarEntryParser(index.digest)
    try:
        for piece in tar:
            parser.feed(piece)
        entries = parser.finish()
    except LayerFormatError as exc:
        return [f"the tar does not parse: {exc}"]
    return compare_entries(index, entries, None)


def verify_index(index: LayerIndex, blob: Iterable[bytes]) -> None:
    """Check ``index`` against its layer's verified blob (pieces in order); raises IndexMismatch listing the differences."""
    differences = compare_with_blob(index, blob)
    if differences:
        raise IndexMismatch(index.digest, differences)


def compare_entries(
    index: LayerIndex, tar_entries: list[Entry], members: dict[int, _Member] | None
) -> list[str]:
    """Compare ``index``'s entries with those parsed from its tar (``members``: eStargz member positions); return the differences."""
    estargz = index.format is LayerFormat.ESTARGZ
    if estargz:
        tar_entries = [e for e in tar_entries if e.path not in _BOOKKEEPING]
    served, linked_served = _listing(index.entries)
    genuine, linked_genuine = _listing(tar_entries)
    differences: list[str] = []
    for path, tar_entry in genuine.items():
        entry = served.get(path)
        if entry is None:
            differences.append(f"{path!r}: missing from the index")
            continue
        differences += _field_differences(entry, tar_entry, estargz)
        differences += _content_differences(entry, tar_entry, members)
        if entry.type is EntryType.HARDLINK and tar_entry.type is EntryType.HARDLINK:
            differences += _link_differences(path, linked_served.get(path), linked_genuine.get(path), members)
    differences += [f"{path!r}: in the index, not in the tar" for path in served if path not in genuine]
    return differences


def _link_differences(
    path: str, ours: Entry | None, theirs: Entry | None, members: dict[int, _Member] | None
) -> list[str]:
    """Whether a hardlink's content, the entry its target was when it came, lies where the tar's does."""
    if ours is None or theirs is None:
        found = f"index {ours is not None}, tar {theirs is not None}"
        return [] if ours is theirs else [f"{path!r}: hardlink target found: {found}"]
    return _content_differences(ours, theirs, members, f"{path!r} (hardlink to {theirs.path!r})")


def _listing(entries: Iterable[Entry]) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """The last entry of each path, and for each hardlink the entry its target was when the link came."""
    last: dict[str, Entry] = {}
    linked: dict[str, Entry] = {}
    for entry in entries:
        if entry.type is EntryType.HARDLINK:
            target = last.get(entry.link_target)
            if target is not None:
                linked[entry.path] = (
                    linked.get(target.path, target) if target.type is EntryType.HARDLINK else target
                )
        last[entry.path] = entry
    return last, linked


def _field_differences(entry: Entry, tar_entry: Entry, estargz: bool) -> Iterator[str]:
    """The shown fields in which ``entry`` differs from ``tar_entry``."""
    for name in _SHOWN_FIELDS:
        ours, theirs = getattr(entry, name), getattr(tar_entry, name)
        if ours != theirs:
            yield f"{entry.path!r}: {name}: index {shown(name, ours)!r}, tar {shown(name, theirs)!r}"
    # A TOC records whole seconds, rounded, and no time at all for the epoch's first second.
    theirs = _toc_time(tar_entry.mtime_ns) if estargz else tar_entry.mtime_ns
    if entry.mtime_ns != theirs:
        yield f"{entry.path!r}: mtime_ns: index {entry.mtime_ns}, tar {theirs}"


def _toc_time(mtime_ns: int) -> int:
    """``mtime_ns`` as an eStargz TOC records it (Go: ``Round(time.Second)``, empty when ``Unix() == 0``)."""
    if mtime_ns // 1_000_000_000 == 0:
        return 0
    return (mtime_ns + 500_000_000) // 1_000_000_000 * 1_000_000_000


def _content_differences(
    entry: Entry, tar_entry: Entry, members: dict[int, _Member] | None, what: str | None = None
) -> list[str]:
    """Whether ``entry``'s content lies where ``tar_entry``'s does: offsets in the tar, or eStargz chunks."""
    what = what or repr(entry.path)
    if members is None:
        return [
            f"{what}: {name}: index {getattr(entry, name)}, tar {getattr(tar_entry, name)}"
            for name in ("data_offset", "header_offset")
            if getattr(entry, name) != getattr(tar_entry, name)
        ]
    if tar_entry.type is not EntryType.FILE or tar_entry.size == 0:
        return [f"{what}: chunks: index {len(entry.chunks)}, tar no data"] if entry.chunks else []
    if entry.size != tar_entry.size:
        return []  # the size difference is reported: the chunks cannot match either
    return _chunk_differences(what, entry.chunks, tar_entry, members)


def _chunk_differences(
    what: str, chunks: tuple[Chunk, ...], tar_entry: Entry, members: dict[int, _Member]
) -> list[str]:
    """Whether eStargz ``chunks`` cover ``tar_entry``'s bytes in order, each at its member's inner offset."""
    differences = []
    covered = 0
    for chunk in chunks:
        where = f"{what}: chunk at {chunk.file_offset}"
        member = members.get(chunk.blob_offset)
        if chunk.file_offset != covered:
            differences.append(f"{where}: starts after byte {covered} of the file")
        if member is None:
            differences.append(f"{where}: no gzip member starts at blob offset {chunk.blob_offset}")
        elif member.start + chunk.inner_offset + chunk.size > member.end:
            differences.append(
                f"{where}: runs past the end of the gzip member at blob offset {chunk.blob_offset}"
            )
        elif member.start + chunk.inner_offset != tar_entry.data_offset + chunk.file_offset:
            differences.append(
                f"{where}: tar offset: index {member.start + chunk.inner_offset}, tar {tar_entry.data_offset + chunk.file_offset}"
            )
        covered = chunk.file_offset + chunk.size
    if covered != tar_entry.size:
        differences.append(f"{what}: chunks: cover {covered} bytes, tar {tar_entry.size}")
    return differences
