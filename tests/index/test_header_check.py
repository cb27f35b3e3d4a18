"""A file's first read proves that the tar header before its bytes names it: an index that lies fails there."""

from __future__ import annotations

import dataclasses
import tarfile

import pytest

from index.errors import IntegrityError, MappingMismatch
from index.model import Entry, EntryType, LayerIndex
from index.reader import LayerReader, plan_read
from index.tar_entries import TarEntryParser
from tests.index.conftest import (
    LAYER_KINDS,
    TAR_KINDS,
    TRUST_ENTRIES,
    blob_source,
    entry_named,
    file_info,
    make_tar,
    other_info,
    overlapping_chunks_layer,
    trust_layer,
)

CONTENT = {e.path: e.content for e in TRUST_ENTRIES if e.kind == "file"}  # the later copy of a path wins


async def first_read_error(index: LayerIndex, blob: bytes, entry: Entry) -> MappingMismatch:
    """The MappingMismatch that the first read of ``entry`` through ``index`` raises."""
    with pytest.raises(MappingMismatch) as caught:
        await LayerReader(index, blob_source(blob)).read(entry, 0, 4096)
    return caught.value


@pytest.mark.parametrize("kind", LAYER_KINDS)
async def test_a_genuine_index_serves_every_file(kind: str) -> None:
    """Every file of a genuine index, in every format, passes its first-read check and reads back its content."""
    index, blob = await trust_layer(kind)
    reader = LayerReader(index, blob_source(blob))
    files = {e.path: e for e in index.entries if e.type is EntryType.FILE}
    for path, entry in files.items():
        assert await reader.read(entry, 0, entry.size + 1) == CONTENT[path]
        assert await reader.read(entry, 1, 2) == CONTENT[path][1:3]  # checked once: later reads skip it


@pytest.mark.parametrize("kind", TAR_KINDS)
async def test_the_first_read_at_the_start_of_a_file_costs_no_extra_fetch(kind: str) -> None:
    """A first read from a file's start fetches its header run with its data in the one call a read makes anyway; later reads skip it."""
    index, blob = await trust_layer(kind)
    entry = entry_named(index, "bin/tool")
    log: list[tuple[int, int]] = []
    reader = LayerReader(index, blob_source(blob, log))
    assert await reader.read(entry, 0, 100) == CONTENT["bin/tool"][:100]
    assert (
        len(log)
        == len(plan_read(index, entry, 0, 100))
        == len(plan_read(index, entry, 0, 100, with_header=False))
        == 1
    )
    log.clear()
    assert await reader.read(entry, 5000, 100) == CONTENT["bin/tool"][5000:5100]
    later = plan_read(index, entry, 5000, 100, with_header=False)  # its header is not read again
    assert all(any(r.offset <= o and o + n <= r.end for r in later) for o, n in log)


async def test_an_estargz_first_read_fetches_headers_and_first_chunk_in_one_call() -> None:
    """An eStargz file's first read fetches the member holding its headers and its first chunk in one range."""
    index, blob = await trust_layer("estargz")
    entry = entry_named(index, "etc/shadow")
    log: list[tuple[int, int]] = []
    assert await LayerReader(index, blob_source(blob, log)).read(entry, 0, 100) == CONTENT["etc/shadow"]
    assert log == [(entry.header_member, entry.chunks[0].blob_end - entry.header_member)]


@pytest.mark.parametrize("kind", TAR_KINDS)
async def test_a_file_mapped_to_another_files_bytes_fails_naming_the_path(kind: str) -> None:
    """A file whose data and header offsets point at another file's fails its first read: the header names the other path."""
    index, blob = await trust_layer(kind)
    hostname, shadow = entry_named(index, "etc/hostname"), entry_named(index, "etc/shadow")
    lie = dataclasses.replace(hostname, data_offset=shadow.data_offset, header_offset=shadow.header_offset)
    error = await first_read_error(index, blob, lie)
    assert (error.field, error.index_value, error.tar_value) == ("path", "etc/hostname", "etc/shadow")
    assert index.digest in str(error) and isinstance(error, IntegrityError)


@pytest.mark.parametrize("kind", TAR_KINDS)
async def test_a_data_offset_moved_to_another_file_fails_at_the_first_read(kind: str) -> None:
    """A file's data offset moved onto the next file's bytes fails: its own header is followed by other bytes, not by that data."""
    index, blob = await trust_layer(kind)
    hostname, shadow = entry_named(index, "etc/hostname"), entry_named(index, "etc/shadow")
    error = await first_read_error(index, blob, dataclasses.replace(hostname, data_offset=shadow.data_offset))
    assert (error.field, error.index_value, error.tar_value) == (
        "data_offset",
        shadow.data_offset,
        hostname.data_offset,
    )


@pytest.mark.parametrize("kind", TAR_KINDS)
async def test_a_header_offset_pointing_at_another_entrys_header_fails(kind: str) -> None:
    """A header offset pointing at the header of the entry before (or after) the file fails its first read."""
    index, blob = await trust_layer(kind)
    etc, hostname, shadow = (entry_named(index, p) for p in ("etc", "etc/hostname", "etc/shadow"))
    error = await first_read_error(
        index, blob, dataclasses.replace(hostname, header_offset=etc.header_offset)
    )
    assert (error.field, error.tar_value) == ("path", "etc")
    error = await first_read_error(
        index, blob, dataclasses.replace(hostname, header_offset=shadow.header_offset)
    )
    assert error.field == "header_offset"


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize(
    ("change", "field", "index_value", "tar_value"),
    [
        ({"size": 5}, "size", 5, 4),
        ({"mode": 0o4755}, "mode", "0o4755", "0o644"),
        ({"uid": 1000}, "uid", 1000, 0),
        ({"gid": 1000}, "gid", 1000, 0),
        ({"path": "etc/hosts"}, "path", "etc/hosts", "etc/hostname"),
    ],
)
async def test_a_changed_field_fails_at_the_first_read(
    kind: str, change: dict[str, object], field: str, index_value: object, tar_value: object
) -> None:
    """An index that changes a file's size, mode (setuid added), owner or path fails its first read naming that field."""
    index, blob = await trust_layer(kind)
    lie = dataclasses.replace(entry_named(index, "etc/hostname"), **change)  # type: ignore[arg-type]
    error = await first_read_error(index, blob, lie)
    assert (error.field, error.index_value, error.tar_value) == (field, index_value, tar_value)


@pytest.mark.parametrize("kind", LAYER_KINDS)
async def test_an_invented_file_with_data_fails_and_one_without_passes(kind: str) -> None:
    """An invented file with data fails its first read (no header of its own: -1, or another's); an empty one has nothing to check."""
    index, blob = await trust_layer(kind)
    hostname = entry_named(index, "etc/hostname")
    invented = dataclasses.replace(hostname, path="usr/bin/su", mode=0o4755)
    assert (await first_read_error(index, blob, invented)).field == "path"
    headerless = dataclasses.replace(
        invented, path="etc/hostname", mode=0o644, header_offset=-1, header_member=-1
    )
    assert (await first_read_error(index, blob, headerless)).field in ("header_offset", "header_member")
    empty = Entry("usr/bin/su", EntryType.FILE, mode=0o4755)
    assert (
        await LayerReader(index, blob_source(blob)).read(empty, 0, 10) == b""
    )  # the completion check reports it


async def test_an_estargz_file_given_another_files_chunk_fails_at_its_first_read() -> None:
    """An eStargz TOC whose chunks overlap (file b given file a's chunk) fails b's first read."""
    index, blob, _ = await overlapping_chunks_layer()
    reader = LayerReader(index, blob_source(blob))
    assert await reader.read(index.entries[0], 0, 100) == b"A" * 100
    with pytest.raises(MappingMismatch) as caught:
        await reader.read(index.entries[1], 0, 100)
    assert caught.value.field == "header_offset" and caught.value.path == "b"
    # The same lie with b's header position moved along: the header there is a's.
    lie = dataclasses.replace(index.entries[1], header_member=index.entries[0].header_member, header_offset=0)
    error = await first_read_error(index, blob, lie)
    assert (error.field, error.tar_value) == ("path", "a")


@pytest.mark.parametrize("piece", [1, 700, 1 << 20])
def test_header_offset_is_where_the_header_run_begins(piece: int) -> None:
    """header_offset is an entry's first header block, PAX records included, however the tar is cut (fast path or not)."""
    tar = make_tar([file_info("a" * 150, b"x"), file_info("b", b"y"), other_info("d", tarfile.DIRTYPE)])
    parser = TarEntryParser("sha256:test")
    for i in range(0, len(tar), piece):
        parser.feed(tar[i : i + piece])
    entries = parser.finish()
    assert [(e.header_offset, e.data_offset) for e in entries] == [(0, 1536), (2048, 2560), (3072, -1)]
