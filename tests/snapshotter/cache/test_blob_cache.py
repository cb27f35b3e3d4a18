"""The blob cache: local hits, one fetch per missing chunk, coalescing, verification, persistence."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio

from index.errors import DigestMismatch
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.errors import FetchError

CHUNK = 4096


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _spans(data: bytes) -> list[str]:
    return [_digest(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]


class FakeRegistry:
    """Serves one blob's ranges from memory, counting requests; can be told to fail or lie."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.requests: list[tuple[int, int]] = []
        self.fail = False
        self.corrupt = False

    async def fetch(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        await trio.sleep(self.delay)
        if self.fail:
            raise FetchError("registry down")
        chunk = self.data[offset : offset + length]
        if self.corrupt:
            chunk = bytes(b ^ 0xFF for b in chunk)
        return chunk


@pytest.fixture
def blob_data() -> bytes:
    return random.Random(7).randbytes(40 * CHUNK + 123)


async def test_a_second_read_of_the_same_range_is_served_locally(tmp_path: Path, blob_data: bytes) -> None:
    """A read that hits the cache does not go to the registry."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    assert await blob.read(5000, 100) == blob_data[5000:5100]
    requests = len(registry.requests)
    assert await blob.read(5000, 100) == blob_data[5000:5100]
    assert len(registry.requests) == requests
    assert blob.stats.hits == 1
    blob.close()


async def test_concurrent_readers_of_a_missing_chunk_cause_one_fetch(
    tmp_path: Path, blob_data: bytes
) -> None:
    """Eight readers of the same missing range wait for a single Range request."""
    registry = FakeRegistry(blob_data, delay=0.05)
    blob = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await blob.read(CHUNK * 3 + 10, 50))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(reader)
    assert results == [blob_data[CHUNK * 3 + 10 : CHUNK * 3 + 60]] * 8
    assert len(registry.requests) == 1
    blob.close()


async def test_adjacent_misses_coalesce_into_one_request(tmp_path: Path, blob_data: bytes) -> None:
    """A read spanning several missing chunks is one Range request covering all of them."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    assert await blob.read(CHUNK + 1, 10 * CHUNK) == blob_data[CHUNK + 1 : 11 * CHUNK + 1]
    assert len(registry.requests) == 1
    offset, length = registry.requests[0]
    assert offset == CHUNK and offset + length >= 12 * CHUNK
    blob.close()


async def test_a_span_that_fails_its_digest_is_not_used(tmp_path: Path, blob_data: bytes) -> None:
    """Corrupt bytes raise DigestMismatch, are not marked present, and a later good fetch succeeds."""
    registry = FakeRegistry(blob_data)
    registry.corrupt = True
    blob = BlobCache(tmp_path).open(
        _digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK, span_digests=_spans(blob_data)
    )
    with pytest.raises(DigestMismatch, match="span"):
        await blob.read(100, 10)
    assert blob.present_bytes == 0
    registry.corrupt = False
    assert await blob.read(100, 10) == blob_data[100:110]
    blob.close()


async def test_a_fetch_failure_reaches_every_waiter_and_later_reads_retry(
    tmp_path: Path, blob_data: bytes
) -> None:
    """When the registry is down, readers get the error; once it is back, the same read succeeds."""
    registry = FakeRegistry(blob_data, delay=0.01)
    registry.fail = True
    blob = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await blob.read(0, 10)
        except FetchError as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(reader)
    assert len(errors) == 3
    registry.fail = False
    assert await blob.read(0, 10) == blob_data[:10]
    blob.close()


async def test_fetched_ranges_survive_a_restart(tmp_path: Path, blob_data: bytes) -> None:
    """A new cache over the same directory serves earlier fetched chunks without fetching."""
    registry = FakeRegistry(blob_data)
    cache = BlobCache(tmp_path)
    blob = cache.open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    await blob.read(20 * CHUNK, 3 * CHUNK)
    cache.close()
    registry.requests.clear()
    again = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    assert await again.read(20 * CHUNK, 3 * CHUNK) == blob_data[20 * CHUNK : 23 * CHUNK]
    assert registry.requests == []
    again.close()


async def test_fill_fetches_the_rest_and_verifies_the_whole_blob(tmp_path: Path, blob_data: bytes) -> None:
    """Background fill makes the blob complete; the whole-blob digest check marks it verified."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    await blob.read(7 * CHUNK, 10)
    await blob.fill()
    assert blob.complete and blob.present_bytes == len(blob_data)
    await blob.verify_whole()
    assert blob.verified
    blob.close()


async def test_a_whole_blob_that_does_not_match_its_digest_is_forgotten(
    tmp_path: Path, blob_data: bytes
) -> None:
    """If the assembled blob hashes wrong, nothing of it stays marked present."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open("sha256:" + "0" * 64, len(blob_data), registry.fetch, chunk_size=CHUNK)
    await blob.fill()
    with pytest.raises(DigestMismatch):
        await blob.verify_whole()
    assert blob.present_bytes == 0 and not blob.verified
    blob.close()


async def test_a_streamed_download_fills_the_cache(tmp_path: Path, blob_data: bytes) -> None:
    """Bytes stored from a sequential download in odd-sized pieces are all served locally once the stream is verified."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(_digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK)
    offset = 0
    for size in [1000, 5000, 70000, 3, 100000]:
        blob.store_stream(offset, blob_data[offset : offset + size])
        offset += size
    assert not blob.is_present(0, 1)  # not before the whole stream matched its digest
    blob.mark_verified()
    assert blob.complete and blob.verified
    assert await blob.read(0, len(blob_data)) == blob_data
    assert registry.requests == []
    blob.close()


def test_a_digest_can_not_name_a_path_outside_the_cache(tmp_path: Path) -> None:
    """Digests are validated before they become directory names."""
    with pytest.raises(ValueError):
        BlobCache(tmp_path).blob_dir("sha256:../../etc")
    assert os.listdir(tmp_path) == []


async def test_fill_waits_until_on_demand_reads_are_quiet(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Background fill sends nothing while on-demand reads keep missing, and starts once they stop."""
    data = random.Random(7).randbytes(4 << 20)
    registry = FakeRegistry(data)
    times: list[float] = []

    async def fetch(offset: int, length: int) -> bytes:
        times.append(trio.current_time())
        return await registry.fetch(offset, length)

    blob = BlobCache(tmp_path).open(_digest(data), len(data), fetch, chunk_size=CHUNK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blob.fill)
        for step in range(5):  # a read every 0.5 s for 2 s, each a miss
            await blob.read(step * (512 << 10), 10)
            await trio.sleep(0.5)
        on_demand = len(times)
    assert on_demand == 5
    assert blob.complete
    # The first background request left one quiet second after the last read (at t=2.0).
    assert times[on_demand] >= 3.0
    blob.close()


async def test_min_fetch_widens_a_small_miss_forward_and_zero_fetches_only_its_chunks(
    tmp_path: Path, blob_data: bytes
) -> None:
    """A blob opened with min_fetch grows a 100-byte miss to that many bytes; with 0 it asks for one chunk."""
    digest = _digest(blob_data)
    wide = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path / "wide").open(
        digest, len(blob_data), wide.fetch, chunk_size=CHUNK, min_fetch=4 * CHUNK
    )
    assert await blob.read(CHUNK + 10, 100) == blob_data[CHUNK + 10 : CHUNK + 110]
    assert wide.requests == [(CHUNK, 4 * CHUNK)]
    blob.close()
    exact = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path / "exact").open(
        digest, len(blob_data), exact.fetch, chunk_size=CHUNK, min_fetch=0
    )
    assert await blob.read(CHUNK + 10, 100) == blob_data[CHUNK + 10 : CHUNK + 110]
    assert exact.requests == [(CHUNK, CHUNK)]
    blob.close()


async def test_is_present_tells_cached_ranges_from_missing_ones(tmp_path: Path, blob_data: bytes) -> None:
    """is_present is true exactly for ranges whose chunks were all fetched (and for empty ranges)."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(
        _digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK, min_fetch=0
    )
    assert not blob.is_present(0, 10)
    await blob.read(2 * CHUNK, CHUNK)
    assert blob.is_present(2 * CHUNK, CHUNK)
    assert blob.is_present(2 * CHUNK + 5, 10)
    assert not blob.is_present(2 * CHUNK, CHUNK + 1)
    assert blob.is_present(len(blob_data), 10)  # nothing to read past the end
    blob.close()


async def test_bytes_fetched_elsewhere_are_kept_for_the_chunks_they_cover(
    tmp_path: Path, blob_data: bytes
) -> None:
    """store() marks wholly covered chunks present (the blob's short last chunk too) and counts the bytes."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(
        _digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK, min_fetch=0
    )
    start = 30 * CHUNK + 100  # chunk 30 only partly covered: stays missing
    blob.store(start, blob_data[start:])
    assert blob.stats.bytes_fetched == len(blob_data) - start
    assert blob.is_present(31 * CHUNK, len(blob_data) - 31 * CHUNK)
    assert not blob.is_present(30 * CHUNK, 1)
    assert await blob.read(35 * CHUNK, 50) == blob_data[35 * CHUNK : 35 * CHUNK + 50]
    assert registry.requests == []
    blob.close()


async def test_stored_bytes_are_checked_against_span_digests(tmp_path: Path, blob_data: bytes) -> None:
    """Bytes handed to store() that fail their span digest are not kept."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(
        _digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK, span_digests=_spans(blob_data)
    )
    bad = bytes(b ^ 1 for b in blob_data[:CHUNK])
    with pytest.raises(DigestMismatch):
        blob.store(0, bad)
    assert not blob.is_present(0, CHUNK)
    blob.close()


async def test_ensure_fetches_what_is_missing_and_nothing_else(tmp_path: Path, blob_data: bytes) -> None:
    """ensure() fetches a missing range once as an on-demand miss; on a present range it does nothing, not even count a hit."""
    registry = FakeRegistry(blob_data)
    blob = BlobCache(tmp_path).open(
        _digest(blob_data), len(blob_data), registry.fetch, chunk_size=CHUNK, min_fetch=0
    )
    await blob.ensure(3 * CHUNK, 2 * CHUNK)
    assert registry.requests == [(3 * CHUNK, 2 * CHUNK)]
    assert blob.is_present(3 * CHUNK, 2 * CHUNK)
    await blob.ensure(3 * CHUNK + 10, 100)
    assert len(registry.requests) == 1
    assert (blob.stats.hits, blob.stats.misses) == (0, 1)
    assert await blob.read(3 * CHUNK, 10) == blob_data[3 * CHUNK : 3 * CHUNK + 10]
    blob.close()
