"""The read-time mapping check: the tar header before the bytes an index maps a file to must name that file.

An index or TOC may lie while every byte it points at is genuine: file A mapped to file B's
bytes, or an eStargz TOC whose chunks overlap. The blob digest cannot tell; the tar headers in
the blob can, since a file's data follows its own header run (PAX and GNU long-name records,
then the header block) and nothing else. So before any byte of a file is served, the header
run that ends where its data begins is parsed, with the tar parser the index builder uses, and
must name the path, type, size, mode and owner the index gives: ``check_header_run``.

Where the run lies depends on the format. Tar, gzip and zstd: from ``Entry.header_offset`` to
``Entry.data_offset`` in the uncompressed stream (``header_range``), exactly one entry, read
through the same verified spans as the data (``index.reader.LayerReader``). eStargz: a file's
headers follow the previous file's data in the gzip member holding it, so the member from
``Entry.header_member`` on is decompressed up to the first chunk (``check_estargz_header``);
of the headers there, the last must be the file's. (No digest pins those header bytes, only
the members' CRCs: against a registry that alters them the pinned check is the completion
check's, against the verified blob.) Empty files and other entry types have no bytes to
mislabel: ``index.completion_check`` checks them when the layer completes.

Raises ``MappingMismatch`` (an ``IntegrityError``) naming the layer, the path and the field.
"""

from __future__ import annotations

import zlib

from index.errors import LayerFormatError, MappingMismatch
from index.model import Entry, EntryType
from index.tar_entries import MAX_EXTENSION_SIZE, TarEntryParser
from index.tar_header import BLOCK

# The longest header run the parser accepts: a global and a local PAX header, a GNU long name
# and a long link, each with its payload, then the header block. A longer "run" is a lie.
MAX_HEADER_RUN = 4 * (BLOCK + MAX_EXTENSION_SIZE) + BLOCK
# eStargz: a file's headers sit after the previous file's last chunk (4 MiB by default), so up
# to this many bytes are decompressed, or fetched, to reach them; more is a hostile TOC.
MAX_MEMBER_PREFIX = 64 << 20
# What the header before a file's data must agree on with the index (the rest: at completion).
CHECKED_FIELDS = ("path", "type", "size", "mode", "uid", "gid")


def header_range(layer: str, entry: Entry) -> tuple[int, int]:
    """Return the uncompressed ``[start, end)`` of a tar/gzip/zstd file's header run; raises MappingMismatch when the index records none that can be."""
    start, end = entry.header_offset, entry.data_offset
    if start < 0 or end < 0 or not BLOCK <= end - start <= MAX_HEADER_RUN or (end - start) % BLOCK:
        raise MappingMismatch(
            layer,
            entry.path,
            "header_offset",
            start,
            f"expected: a run of 512 to {MAX_HEADER_RUN} bytes ending at {end}",
        )
    return start, end


def estargz_header_range(layer: str, entry: Entry) -> tuple[int, int]:
    """Return the blob ``[start, end)`` an eStargz file's header check reads (its headers' member to its first chunk's end); raises MappingMismatch."""
    first = entry.chunks[0]
    start = entry.header_member
    if start < 0 or entry.header_offset < 0 or not 0 <= first.blob_offset - start <= MAX_MEMBER_PREFIX:
        raise MappingMismatch(
            layer,
            entry.path,
            "header_member",
            start,
            f"expected: a gzip member at most {MAX_MEMBER_PREFIX} bytes before {first.blob_offset}",
        )
    return start, first.blob_end


def check_header_run(
    layer: str, entry: Entry, run: bytes, run_offset: int, data_offset: int, *, exact: bool
) -> None:
    """Check that the tar headers in ``run`` (stream offset ``run_offset``) end with ``entry``'s, its data at ``data_offset``.

    Args:
        layer: the layer digest, for the error.
        entry: the file as the index describes it.
        run: tar bytes from a header boundary up to where the index says the data starts.
        run_offset: where ``run`` starts, in the same offsets as ``data_offset``.
        data_offset: where the index says the file's data starts.
        exact: the run must hold ``entry``'s headers alone (tar, gzip, zstd); otherwise data-less
            entries may come first and the last header must be ``entry``'s (eStargz).

    Raises:
        MappingMismatch: no valid header there, or one that differs in a ``CHECKED_FIELDS`` field,
            or whose data does not start at ``data_offset``.
    """
    parser = TarEntryParser(layer, offset=run_offset, fragment=True)
    try:
        parser.feed(run)
    except LayerFormatError as exc:
        raise MappingMismatch(layer, entry.path, "header", "a tar header", f"none valid ({exc})") from None
    if not parser.entries:
        raise MappingMismatch(layer, entry.path, "header", "a tar header", "none before the data")
    found = parser.entries[0] if exact else parser.entries[-1]
    for name in CHECKED_FIELDS:
        expected, actual = getattr(entry, name), getattr(found, name)
        if expected != actual:
            raise MappingMismatch(layer, entry.path, name, shown(name, expected), shown(name, actual))
    if found.data_offset != data_offset or (exact and len(parser.entries) > 1):
        raise MappingMismatch(layer, entry.path, "data_offset", data_offset, found.data_offset)


def check_estargz_header(layer: str, entry: Entry, blob: bytes) -> bytes:
    """Check an eStargz file's headers in ``blob`` (the bytes of ``estargz_header_range``); return its first chunk's member output.

    Raises:
        MappingMismatch: see ``check_header_run``; also when the first chunk's member does not
            start where a member before it ends.
        zlib.error: the bytes are not gzip members.
    """
    first = entry.chunks[0]
    split = first.blob_offset - entry.header_member
    prefix = _inflate_members(blob[:split], layer, entry)
    member = _inflate_members(blob[split:], layer, entry, first_only=True)
    content = len(prefix) + first.inner_offset
    if not 0 <= entry.header_offset <= content <= len(prefix) + len(member):
        raise MappingMismatch(
            layer,
            entry.path,
            "header_offset",
            entry.header_offset,
            f"expected: at most {content}, where the data starts",
        )
    run = (prefix + member[: first.inner_offset])[entry.header_offset :]
    check_header_run(layer, entry, run, entry.header_offset, content, exact=False)
    return member


def _inflate_members(data: bytes, layer: str, entry: Entry, *, first_only: bool = False) -> bytes:
    """Decompress whole gzip members back to back (or the first only, as a chunk is read), at most ``MAX_MEMBER_PREFIX`` bytes of output."""
    out: list[bytes] = []
    size = 0
    while data:
        decoder = zlib.decompressobj(31)
        out.append(decoder.decompress(data, MAX_MEMBER_PREFIX - size + 1))
        size += len(out[-1])
        if size > MAX_MEMBER_PREFIX:
            raise MappingMismatch(
                layer,
                entry.path,
                "header_member",
                entry.header_member,
                f"more than {MAX_MEMBER_PREFIX} bytes before the data",
            )
        if not decoder.eof:
            raise zlib.error("a gzip member is truncated")
        data = b"" if first_only else decoder.unused_data
    return b"".join(out)


def shown(name: str, value: object) -> object:
    """Return an entry field's value as errors show it: modes in octal, types by name; raises nothing."""
    if name == "mode" and isinstance(value, int):
        return oct(value)
    if isinstance(value, EntryType):
        return value.value
    return value
