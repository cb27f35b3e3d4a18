"""Random access through the index: minimal fetches, shared decodes, every format through one reader."""

from __future__ import annotations

import gzip
import hashlib
import os

import pytest
import trio
import zstandard

from index.builder import build_index
from index.errors import DigestMismatch, LayerFormatError
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex
from index.reader import ByteRange, LayerReader, is_randomly_accessible, max_span_size, plan_read
from tests.index.conftest import (
    COMPRESSORS,
    blob_source,
    file_info,
    files_of,
    make_tar,
    other_info,
    zstd_frames,
)

BIG = b"".join(b"line %d of a big text file %x\n" % (i, i * 31) for i in range(200_000)) + os.urandom(500_000)
TAR = make_tar(
    [file_info("small", b"tiny"), file_info("big", BIG), other_info("dir", b"5"), file_info("empty")]
)


def built(compression: str, spacing: int = 256 << 10) -> tuple[LayerIndex, bytes]:
    """The index and blob of TAR compressed with ``compression``."""
    fmt, compress = COMPRESSORS[compression]
    blob = compress(TAR)
    return build_index("m", fmt, [blob], gzip_spacing=spacing), blob


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
async def test_reads_return_exact_bytes(compression: str) -> None:
    """read() returns exactly min(length, size - offset) bytes, b"" at or past EOF, in every format."""
    index, blob = built(compression)
    files = files_of(index)
    reader = LayerReader(index, blob_source(blob))
    assert await reader.read(files["small"], 0, 100) == b"tiny"
    assert await reader.read(files["small"], 4, 10) == b""
    assert await reader.read(files["small"], 99, 10) == b""
    assert await reader.read(files["empty"], 0, 10) == b""
    for offset in (0, 1, 300_000, len(BIG) - 5000, len(BIG) - 1):
        assert await reader.read(files["big"], offset, 70_000) == BIG[offset : offset + 70_000]
    assert await reader.read(files["big"], 0, len(BIG)) == BIG


@pytest.mark.parametrize("compression", ["gzip", "zstd-frames", "tar"])
async def test_fetches_stay_within_the_plan(compression: str) -> None:
    """Every read_range call lies inside the ranges plan_read names (with the header run a first read checks), and a 4 KiB read fetches about one span."""
    index, blob = built(compression)
    big = files_of(index)["big"]
    log: list[tuple[int, int]] = []
    reader = LayerReader(index, blob_source(blob, log))
    plan = plan_read(index, big, 2_000_000, 4096)
    assert await reader.read(big, 2_000_000, 4096) == BIG[2_000_000:2_004_096]
    assert log and all(any(r.offset <= o and o + n <= r.end for r in plan) for o, n in log)
    assert sum(r.length for r in plan) < len(blob) // 4
    del log[:]
    assert await reader.read(big, 3_000_000, 4096) == BIG[3_000_000:3_004_096]
    later = plan_read(index, big, 3_000_000, 4096, with_header=False)  # checked already: the bytes alone
    assert log and all(any(r.offset <= o and o + n <= r.end for r in later) for o, n in log)
    if compression == "tar":
        assert later == [ByteRange(big.data_offset + 3_000_000, 4096)]


async def test_one_span_is_decoded_once_for_many_readers() -> None:
    """Concurrent and later reads inside one span fetch and decode it once (the LRU and in-flight sharing)."""
    index, blob = built("gzip")
    big = files_of(index)["big"]
    log: list[tuple[int, int]] = []

    async def slow(offset: int, length: int) -> bytes:
        log.append((offset, length))
        await trio.sleep(0.01)
        return blob[offset : offset + length]

    reader = LayerReader(index, slow)
    await reader.read(big, 0, 1)  # its first read, which also checks its header, in another span
    log.clear()
    results: list[bytes] = []
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(lambda i=i: _append(results, reader.read(big, 1_000_000 + i * 100, 100)))
    assert len(log) == 1 and len(results) == 10
    await reader.read(big, 1_000_050, 10)
    assert len(log) == 1


async def _append(results: list[bytes], coro: object) -> None:
    results.append(await coro)  # type: ignore[misc]


async def test_uncacheable_span_is_streamed() -> None:
    """A single-frame zstd layer is readable (from the start) but is reported as not randomly accessible."""
    index, blob = built("zstd")
    big = files_of(index)["big"]
    assert not is_randomly_accessible(index, max_span=1 << 20) and max_span_size(index) == len(TAR)
    reader = LayerReader(index, blob_source(blob), decoded_cache_bytes=1 << 20)
    assert await reader.read(big, 3_000_000, 5000) == BIG[3_000_000:3_005_000]
    assert is_randomly_accessible(built("gzip")[0]) and is_randomly_accessible(built("tar")[0])


async def test_non_files_and_corrupt_blobs_raise() -> None:
    """Reading a directory, or a span whose bytes are corrupt, raises LayerFormatError naming the layer."""
    index, blob = built("gzip")
    reader = LayerReader(index, blob_source(blob))
    with pytest.raises(LayerFormatError, match="not a regular file"):
        await reader.read(index.entries[2], 0, 1)
    broken = bytearray(blob)
    for i in range(1000, len(broken), 50):
        broken[i] ^= 0xFF
    reader = LayerReader(index, blob_source(bytes(broken)))
    with pytest.raises(LayerFormatError, match=index.digest):
        await reader.read(files_of(index)["big"], 2_000_000, 10)
    short = LayerReader(index, blob_source(blob[: len(blob) // 2]))
    with pytest.raises(LayerFormatError, match="asked for"):
        await short.read(files_of(index)["big"], len(BIG) - 10, 10)


def _chunked_layer(corrupt: bool = False) -> tuple[LayerIndex, bytes, bytes]:
    data = os.urandom(10_000) + b"a" * 10_000
    header = make_tar([file_info("f", data)])[:512]  # its header run starts the first member
    members = [gzip.compress(header + data[:12_000]), zstandard.ZstdCompressor().compress(data[12_000:])]
    blob = b"junk" + b"".join(members)
    offsets = [4, 4 + len(members[0]), len(blob)]
    digests = [
        hashlib.sha256(data[:5000]).hexdigest(),
        hashlib.sha256(data[5000:12_000]).hexdigest(),
        hashlib.sha256(data[12_000:]).hexdigest(),
    ]
    if corrupt:
        digests[1] = "0" * 64
    chunks = (
        Chunk(0, 5000, offsets[0], offsets[1], 512, "sha256:" + digests[0]),
        Chunk(5000, 7000, offsets[0], offsets[1], 5512, "sha256:" + digests[1]),
        Chunk(12_000, 8000, offsets[1], offsets[2], 0, "sha256:" + digests[2]),
    )
    entry = Entry("f", EntryType.FILE, size=len(data), chunks=chunks, header_offset=0, header_member=4)
    return LayerIndex("m", LayerFormat.ESTARGZ, "sha256:e", len(blob), "", 0, [entry]), blob, data


async def test_estargz_chunks_are_read_and_verified() -> None:
    """eStargz files are read chunk by chunk (gzip or zstd members); a chunk digest mismatch raises DigestMismatch."""
    index, blob, data = _chunked_layer()
    entry = index.entries[0]
    reader = LayerReader(index, blob_source(blob))
    for offset, length in [(0, 20_000), (4990, 20), (11_999, 2), (19_999, 5)]:
        assert await reader.read(entry, offset, length) == data[offset : offset + length]
    assert plan_read(index, entry, 4990, 20) == [ByteRange(4, index.entries[0].chunks[2].blob_offset - 4)]
    index, blob, _ = _chunked_layer(corrupt=True)
    with pytest.raises(DigestMismatch, match="'f'"):
        await LayerReader(index, blob_source(blob)).read(index.entries[0], 6000, 10)


async def test_read_across_spans_fetches_one_contiguous_range() -> None:
    """A cold read spanning several seek points makes one read_range call per contiguous planned range."""
    index, blob = built("gzip", spacing=64 << 10)
    big = files_of(index)["big"]
    log: list[tuple[int, int]] = []
    reader = LayerReader(index, blob_source(blob, log))
    assert await reader.read(big, 100_000, 500_000) == BIG[100_000:600_000]
    plan = plan_read(index, big, 100_000, 500_000)
    assert len(plan) == 1 and log == [(plan[0].offset, plan[0].length)]


async def test_many_concurrent_overlapping_reads_agree() -> None:
    """Concurrent reads over overlapping multi-span ranges with a tiny cache all return the right bytes."""
    index, blob = built("gzip", spacing=32 << 10)
    big = files_of(index)["big"]

    async def jittery(offset: int, length: int) -> bytes:
        await trio.sleep((offset % 7) / 1000)
        return blob[offset : offset + length]

    reader = LayerReader(index, jittery, decoded_cache_bytes=1 << 20)
    wrong: list[int] = []

    async def one(offset: int) -> None:
        if await reader.read(big, offset, 300_000) != BIG[offset : offset + 300_000]:
            wrong.append(offset)

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, (i * 97_531) % len(BIG))
    assert wrong == []


@pytest.mark.parametrize("compression", ["gzip", "zstd-frames"])
async def test_a_read_early_in_a_span_fetches_only_a_prefix_of_it(compression: str) -> None:
    """A 4 KiB read at the start of a 1 MiB span fetches a fraction of the span; reads further on still decode right."""
    index, blob = built(compression, spacing=1 << 20)
    if compression == "zstd-frames":
        index, blob = (
            build_index("m", LayerFormat.ZSTD, [zstd_frames(TAR, 1 << 20)]),
            zstd_frames(TAR, 1 << 20),
        )
    big = files_of(index)["big"]
    starts = [p.uncompressed_offset for p in index.seek_points]
    point = next(i for i, s in enumerate(starts) if s > big.data_offset + 100_000)
    offset = starts[point] - big.data_offset + 1000  # just after a seek point, inside "big"
    span_end = index.seek_points[point + 1].compressed_offset if point + 1 < len(starts) else len(blob)
    span_bytes = span_end - index.seek_points[point].compressed_offset
    log: list[tuple[int, int]] = []
    reader = LayerReader(index, blob_source(blob, log))
    assert await reader.read(big, offset, 4096) == BIG[offset : offset + 4096]
    assert 0 < sum(n for _, n in log) < span_bytes // 2
    later = offset + 600_000  # beyond what was decoded: the span is decoded further
    assert await reader.read(big, later, 4096) == BIG[later : later + 4096]
    assert await reader.read(big, offset, 4096) == BIG[offset : offset + 4096]
