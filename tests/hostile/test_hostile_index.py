"""Lying and incomplete stored indexes: load_index refuses every field no index can hold, and check_index
refuses every index that cannot describe its blob, each with a LayerFormatError saying what and where."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import zstandard

from index.builder import build_index
from index.consistency import check_index
from index.errors import LayerFormatError
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint
from index.serialize import dump_index, load_index
from tests.hostile.conftest import GZIP_MEDIA_TYPE, estargz_index, stored_index
from tests.index.conftest import file_info, make_tar, other_info
from tests.support.estargz_writer import build_estargz
from tests.support.image_builder import directory, file

SPAN = 4096
_RNG = random.Random(7)
TAR = make_tar(
    [
        other_info("d", b"5"),
        file_info("d/a", _RNG.randbytes(100_000)),
        file_info("d/b", _RNG.randbytes(50_000)),
        other_info("s", b"2", linkname="d/a"),
        file_info("e", b""),
    ]
)


def _built(fmt: LayerFormat, blob: bytes) -> tuple[LayerIndex, bytes]:
    return build_index("m", fmt, [blob], span_size=SPAN, gzip_spacing=32 << 10), blob


INDEXES = {
    "tar": _built(LayerFormat.TAR, TAR),
    "gzip": _built(LayerFormat.GZIP, gzip.compress(TAR)),
    "zstd": _built(
        LayerFormat.ZSTD,
        b"".join(zstandard.ZstdCompressor().compress(TAR[i : i + 32768]) for i in range(0, len(TAR), 32768)),
    ),
}
ESTARGZ_BLOB = build_estargz(
    [directory("d/"), file("d/a", _RNG.randbytes(30_000)), file("d/b", b"b" * 100)], chunk_size=8192
)
INDEXES["estargz"] = (trio.run(estargz_index, ESTARGZ_BLOB), ESTARGZ_BLOB.blob)


def _meta_and_windows(index: LayerIndex) -> tuple[dict[str, Any], bytes]:
    """The metadata a stored index holds, and its window bytes, taken back out of ``dump_index``."""
    body = dump_index(index)[52:]
    (length,) = struct.unpack_from("<I", body)
    return json.loads(zlib.decompress(body[4 : 4 + length])), body[4 + length :]


def _entry(name: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    """Set columns of the entry at path ``name`` (of the tar index) in stored metadata."""

    def change(meta: dict[str, Any]) -> None:
        position = meta["entries"]["path"].index(name)
        for field, value in changes.items():
            meta["entries"][field][position] = value

    return change


def _meta(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta.update(changes)


def _chunk(position: int, value: Any) -> Callable[[dict[str, Any]], None]:
    """Replace the first chunk of the first chunked entry of the eStargz index."""
    return lambda meta: _first_stored_chunk(meta).__setitem__(position, value)


def _first_stored_chunk(meta: dict[str, Any]) -> list[Any]:
    chunks: dict[str, list[list[Any]]] = meta["entries"]["chunks"]
    return chunks[min(chunks, key=int)][0]


# (case id, which index, change to the stored metadata, pattern the message must contain)
LIES: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    ("uid--1", "tar", _entry("d/a", uid=-1), r"entry 'd/a' has owner -1:0"),
    ("uid-2^40", "tar", _entry("d/a", uid=1 << 40), r"entry 'd/a' has owner 1099511627776:0"),
    ("gid-2^32", "tar", _entry("d/a", gid=1 << 32), r"entry 'd/a' has owner 0:4294967296"),
    ("size-2^64", "tar", _entry("d/a", size=1 << 64), r"entry 'd/a' has size 18446744073709551616"),
    ("size--1", "tar", _entry("d/a", size=-1), r"entry 'd/a' has size -1"),
    (
        "mode-type-bits",
        "tar",
        _entry("d/a", mode=0o100644),
        r"entry 'd/a' has mode 33188, not permission bits",
    ),
    ("mtime-2^63", "tar", _entry("d/a", mtime_ns=1 << 63), r"entry 'd/a' has mtime 9223372036854775808 ns"),
    ("devmajor-2^40", "tar", _entry("d/a", devmajor=1 << 40), r"entry 'd/a' has device major 1099511627776"),
    ("devminor--1", "tar", _entry("d/a", devminor=-1), r"entry 'd/a' has device minor -1"),
    ("data-offset--2", "tar", _entry("d/a", data_offset=-2), r"entry 'd/a' has data offset -2"),
    (
        "data-beyond-stream",
        "tar",
        _entry("d/a", data_offset=10**9),
        r"entry 'd/a' has data 1000000000\.\.\d+ outside",
    ),
    ("uid-string", "tar", _entry("d/a", uid="0"), r"entry 'd/a' has uid '0', not an integer"),
    ("uid-null", "tar", _entry("d/a", uid=None), r"entry 'd/a' has uid None, not an integer"),
    ("uid-float", "tar", _entry("d/a", uid=1.5), r"holds a number that is not an integer: '1\.5'"),
    ("size-nan", "tar", _entry("d/a", size=float("nan")), r"holds a number that is not an integer: 'NaN'"),
    ("path-dotdot", "tar", _entry("d/a", path="../a"), r"entry '\.\./a' has a path that is not normalized"),
    (
        "path-double-slash",
        "tar",
        _entry("d/a", path="d//a"),
        r"entry 'd//a' has a path that is not normalized",
    ),
    ("path-absolute", "tar", _entry("d/a", path="/d/a"), r"entry '/d/a' has a path that is not normalized"),
    ("path-trailing-slash", "tar", _entry("d", path="d/"), r"entry 'd/' has a path that is not normalized"),
    ("path-nul", "tar", _entry("d/a", path="d/a\x00"), r"has a path containing a NUL byte"),
    ("path-component-300", "tar", _entry("d/a", path="d/" + "a" * 300), r"has a path component of 300 bytes"),
    (
        "path-64KiB",
        "tar",
        _entry("d/a", path="a/" * 32767 + "aa"),
        r"has a path of 65536 bytes, beyond PATH_MAX",
    ),
    (
        "symlink-target-5000",
        "tar",
        _entry("s", link_target="t" * 5000),
        r"entry 's' has a symlink target of 5000 bytes",
    ),
    ("symlink-target-empty", "tar", _entry("s", link_target=""), r"entry 's' has an empty symlink target"),
    (
        "hardlink-target-dotdot",
        "tar",
        _entry("s", type="hardlink", link_target="../d/a"),
        r"hardlink target that is not a normalized",
    ),
    ("type-unknown", "tar", _entry("d/a", type="socket"), r"malformed"),
    (
        "columns-of-different-lengths",
        "tar",
        lambda m: m["entries"]["uid"].pop(),
        r"entry columns of different lengths",
    ),
    (
        "xattr-not-base64",
        "tar",
        lambda m: m["entries"]["xattrs"].update({"1": {"user.a": "%%%"}}),
        r"malformed",
    ),
    (
        "xattr-name-256",
        "tar",
        lambda m: m["entries"]["xattrs"].update({"1": {"user." + "x" * 251: ""}}),
        r"has xattr name",
    ),
    (
        "xattr-value-64KiB+1",
        "tar",
        lambda m: m["entries"]["xattrs"].update({"1": {"user.a": "AAAA" * 21846}}),
        r"beyond XATTR_SIZE_MAX",
    ),
    (
        "chunk-beyond-blob",
        "estargz",
        _chunk(3, 1 << 40),
        r"has a chunk at blob bytes \d+\.\.1099511627776, outside",
    ),
    ("chunk-offset-string", "estargz", _chunk(2, "0"), r"is not five integers and a digest"),
    ("chunk-inner-2^64", "estargz", _chunk(4, 1 << 64), r"has a chunk inner offset of 18446744073709551616"),
    ("chunk-short", "estargz", lambda m: _first_stored_chunk(m).pop(), r"is not five integers"),
    ("compressed-size--1", "gzip", _meta(compressed_size=-1), r"field compressed_size is -1, not an integer"),
    (
        "uncompressed-size-2^64",
        "gzip",
        _meta(uncompressed_size=1 << 64),
        r"field uncompressed_size is 18446744073709551616",
    ),
    ("digest-not-string", "gzip", _meta(digest=7), r"field digest is 7, not a string"),
    ("format-unknown", "gzip", _meta(format="bzip2"), r"malformed"),
    (
        "seek-point-negative",
        "gzip",
        lambda m: m["points"][0].__setitem__(0, -1),
        r"seek point 0 \[-1, .*\] is out of range",
    ),
    (
        "seek-point-bits-9",
        "gzip",
        lambda m: m["points"][0].__setitem__(2, 9),
        r"seek point 0 .* is out of range",
    ),
    (
        "seek-point-three-numbers",
        "gzip",
        lambda m: m["points"][0].pop(),
        r"seek point 0 is not four integers",
    ),
    (
        "seek-point-window-negative",
        "gzip",
        lambda m: m["points"][0].__setitem__(3, -5),
        r"seek point 0 .* is out of range",
    ),
    ("span-digests-not-list", "gzip", _meta(span_digests="abc"), r"points or span_digests is not a list"),
    ("span-digest-not-string", "gzip", _meta(span_digests=[7]), r"a span digest is not a string"),
    ("metadata-not-object", "gzip", lambda m: m.clear(), r"field media_type is None"),
]


@pytest.mark.parametrize(("which", "change", "pattern"), [c[1:] for c in LIES], ids=[c[0] for c in LIES])
def test_a_lying_stored_index_is_refused_naming_the_field(
    which: str, change: Callable[[dict[str, Any]], None], pattern: str
) -> None:
    """A checksummed index holding what no index can is a LayerFormatError saying which entry and field, nothing else."""
    meta, windows = _meta_and_windows(INDEXES[which][0])
    change(meta)
    with pytest.raises(LayerFormatError) as caught:
        load_index(stored_index(meta, windows))
    assert type(caught.value) is LayerFormatError
    assert re.search(pattern, str(caught.value)), str(caught.value)[:500]


@pytest.mark.parametrize("which", sorted(INDEXES))
def test_every_honest_index_loads_and_passes_the_consistency_check(which: str) -> None:
    """An index as the builder or the TOC reader made it loads back equal and is consistent with its blob."""
    index, blob = INDEXES[which]
    assert load_index(dump_index(index)) == index
    expected = LayerFormat.GZIP if which == "estargz" else index.format
    check_index(index, blob_size=len(blob), span_size=SPAN, expected_format=expected)


def _replace_entry(index: LayerIndex, path: str, **changes: Any) -> LayerIndex:
    entries = [dataclasses.replace(e, **changes) if e.path == path else e for e in index.entries]
    return dataclasses.replace(index, entries=entries)


def _first_chunked(index: LayerIndex) -> Entry:
    return next(e for e in index.entries if e.chunks)


def _with_chunks(index: LayerIndex, chunks: tuple[Chunk, ...]) -> LayerIndex:
    return _replace_entry(index, _first_chunked(index).path, chunks=chunks)


def _chunk0(**changes: Any) -> Callable[[LayerIndex], LayerIndex]:
    return lambda i: _with_chunks(
        i, (dataclasses.replace(_first_chunked(i).chunks[0], **changes), *_first_chunked(i).chunks[1:])
    )


# (case id, which index, change, media type format the caller expects, blob size change, pattern)
INCONSISTENT: list[tuple[str, str, Callable[[LayerIndex], LayerIndex], LayerFormat | None, int, str]] = [
    (
        "tar-index-for-gzip-blob",
        "tar",
        lambda i: i,
        LayerFormat.GZIP,
        0,
        r"it is a tar index, but the media type says gzip",
    ),
    (
        "gzip-index-for-tar-blob",
        "gzip",
        lambda i: i,
        LayerFormat.TAR,
        0,
        r"it is a gzip index, but the media type says tar",
    ),
    (
        "zstd-index-for-gzip-blob",
        "zstd",
        lambda i: i,
        LayerFormat.GZIP,
        0,
        r"it is a zstd index, but the media type says gzip",
    ),
    (
        "estargz-index-for-zstd-blob",
        "estargz",
        lambda i: i,
        LayerFormat.ZSTD,
        0,
        r"it is a estargz index, but the media type says zstd",
    ),
    (
        "descriptor-size-differs",
        "gzip",
        lambda i: i,
        None,
        1,
        r"it is for a blob of \d+ bytes, the descriptor says \d+",
    ),
    (
        "tar-sizes-differ",
        "tar",
        lambda i: dataclasses.replace(i, uncompressed_size=i.uncompressed_size + 1),
        None,
        0,
        r"a plain tar of \d+ bytes cannot hold",
    ),
    (
        "span-digests-missing",
        "gzip",
        lambda i: dataclasses.replace(i, span_digests=[]),
        None,
        0,
        r"it has 0 span digests for the \d+ spans",
    ),
    (
        "span-digest-extra",
        "zstd",
        lambda i: dataclasses.replace(i, span_digests=[*i.span_digests, i.span_digests[0]]),
        None,
        0,
        r"span digests for the",
    ),
    (
        "span-size-differs",
        "tar",
        lambda i: dataclasses.replace(i, span_size=65536),
        None,
        0,
        r"its span size is 65536, the cache verifies spans of 4096",
    ),
    (
        "span-digest-malformed",
        "gzip",
        lambda i: dataclasses.replace(i, span_digests=["sha256:xyz", *i.span_digests[1:]]),
        None,
        0,
        r"span digest 0 is not a sha256 digest",
    ),
    (
        "estargz-with-span-digests",
        "estargz",
        lambda i: dataclasses.replace(i, span_digests=["sha256:" + "0" * 64]),
        None,
        0,
        r"an eStargz index has span digests",
    ),
    (
        "estargz-chunk-without-digest",
        "estargz",
        _chunk0(digest=""),
        None,
        0,
        r"has a chunk at 0 without a sha256 digest",
    ),
    (
        "seek-point-beyond-blob",
        "gzip",
        lambda i: dataclasses.replace(i, seek_points=[*i.seek_points, SeekPoint(1 << 40, 1 << 40)]),
        None,
        0,
        r"seek point \d+ \(1099511627776, 1099511627776\) lies outside the blob",
    ),
    (
        "seek-points-repeat",
        "gzip",
        lambda i: dataclasses.replace(i, seek_points=[i.seek_points[0], *i.seek_points]),
        None,
        0,
        r"seek point 1 does not follow seek point 0",
    ),
    (
        "seek-points-missing",
        "zstd",
        lambda i: dataclasses.replace(i, seek_points=[]),
        None,
        0,
        r"first seek point is not at the start",
    ),
    (
        "seek-point-bits-8",
        "gzip",
        lambda i: dataclasses.replace(
            i, seek_points=[dataclasses.replace(i.seek_points[0], bits=8), *i.seek_points[1:]]
        ),
        None,
        0,
        r"seek point 0 .* lies outside",
    ),
    (
        "data-beyond-stream",
        "gzip",
        lambda i: _replace_entry(i, "d/b", data_offset=i.uncompressed_size),
        None,
        0,
        r"entry 'd/b' has data \d+\.\.\d+ outside the \d+ bytes",
    ),
    (
        "files-overlap",
        "zstd",
        lambda i: _replace_entry(
            i, "d/b", data_offset=next(e for e in i.entries if e.path == "d/a").data_offset + 10
        ),
        None,
        0,
        r"entries 'd/a' and 'd/b' claim overlapping data",
    ),
    (
        "gzip-file-with-chunks",
        "gzip",
        lambda i: _replace_entry(i, "d/a", chunks=(Chunk(0, 100_000, 0, 10, 0, "sha256:" + "0" * 64),)),
        None,
        0,
        r"entry 'd/a' of a gzip index does not keep its data in a data offset",
    ),
    (
        "estargz-file-without-chunks",
        "estargz",
        lambda i: _with_chunks(i, ()),
        None,
        0,
        r"of a estargz index does not keep its data in chunks",
    ),
    (
        "chunk-gap",
        "estargz",
        _chunk0(file_offset=1),
        None,
        0,
        r"has a chunk at file offset 1 of \d+ bytes, expected one at 0",
    ),
    (
        "chunk-beyond-blob",
        "estargz",
        _chunk0(blob_end=1 << 40),
        None,
        0,
        r"has a chunk at blob bytes \d+\.\.1099511627776, outside",
    ),
    (
        "chunks-short-of-size",
        "estargz",
        lambda i: _with_chunks(i, _first_chunked(i).chunks[:-1]),
        None,
        0,
        r"has chunks covering \d+ of its 30000 bytes",
    ),
]


@pytest.mark.parametrize(
    ("which", "change", "expected", "extra", "pattern"),
    [c[1:] for c in INCONSISTENT],
    ids=[c[0] for c in INCONSISTENT],
)
def test_an_index_that_cannot_describe_its_blob_is_refused(
    which: str,
    change: Callable[[LayerIndex], LayerIndex],
    expected: LayerFormat | None,
    extra: int,
    pattern: str,
) -> None:
    """check_index names the first inconsistency of an index with its blob's descriptor or with itself."""
    index, blob = INDEXES[which]
    fmt = expected or (LayerFormat.GZIP if which == "estargz" else index.format)
    lying = change(index)
    with pytest.raises(LayerFormatError) as caught:
        check_index(lying, blob_size=len(blob) + extra, span_size=SPAN, expected_format=fmt)
    assert str(caught.value).startswith(f"layer {index.digest}: the index does not match its blob: ")
    assert re.search(pattern, str(caught.value)), str(caught.value)


def test_an_estargz_index_is_consistent_with_a_gzip_media_type() -> None:
    """eStargz blobs carry the gzip media type: an eStargz index is what a gzip blob may have."""
    index, blob = INDEXES["estargz"]
    check_index(index, blob_size=len(blob), span_size=SPAN, expected_format=LayerFormat.GZIP)
    assert index.format is LayerFormat.ESTARGZ and not index.span_digests
    assert all(e.type is not EntryType.FILE or e.chunks or not e.size for e in index.entries)
    assert index.media_type == GZIP_MEDIA_TYPE
