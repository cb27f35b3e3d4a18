"""Fetched byte ranges of compressed blobs, kept on local disk and shared by every mount.

Each blob lives in ``ROOT/<algo>/<hex>/``: ``data`` is a sparse file the size of the blob,
``present`` holds one byte per chunk (1 = the chunk's bytes in ``data`` are fetched and
verified), ``verified`` exists once the whole blob matched its digest. Chunks are aligned
pieces of ``chunk_size`` compressed bytes; when the layer index recorded a digest for each
such span, every fetched chunk is checked against it before it is marked present.

Data is written before its presence byte, so a process killed at any point leaves at worst a
chunk that is fetched again, never a chunk marked present with missing bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from index.errors import DigestMismatch
from snapshotter.errors import TruncatedResponse
from snapshotter.remote.reference import sha256_hex

if TYPE_CHECKING:
    from snapshotter.config import Config

FetchRange = Callable[[int, int], Awaitable[bytes]]

# The defaults of BlobCache's tunables; the [cache] and [background_fetch] sections of
# snapshotter.config set them, and their comments there are the reference.
#
# Misses further apart than this are fetched with separate requests; closer ones are merged
# into one Range request even if a few present chunks in between are fetched again, because a
# round trip costs more than re-reading a few KiB.
MERGE_GAP_CHUNKS = 2
# An on-demand read asks for at least this many bytes from the wanted range on, so small FUSE
# reads of one file do not each pay a round trip (stargz merges to ~50 KB). Measured with
# `import json` on the eStargz python image: 256 KiB fetched 9.2 MB in 24 requests, 128 KiB
# 7.2 MB in 25, 64 KiB 6.4 MB in 27. Widening rarely reaches the next file a program opens, and
# large reads are already large (kernel read-ahead), so one span is the better default.
MIN_FETCH_BYTES = 64 << 10
# Background fill requests at most this much per Range request, so an on-demand read never
# waits behind a huge transfer for long.
BACKGROUND_REQUEST_BYTES = 4 << 20
# Background fill sends a request only once on-demand reads (of any blob of this cache) have
# been quiet this long, counted from the first fill when nothing was read yet. Start-up reads
# come in bursts, and background requests queued ahead of them on the link delay each one:
# `lazysnap bench` at 100 Mbit + 20 ms measured `import json` at 2.4 s with an immediate fill
# against 1.5 s without one.
BACKGROUND_QUIET_SECONDS = 1.0


class ForegroundActivity:
    """When an on-demand read last missed, shared by the blobs of one cache (trio clock)."""

    def __init__(self) -> None:
        self.last: float | None = None

    def touch(self) -> None:
        """Record an on-demand miss now."""
        self.last = trio.current_time()

    async def wait_quiet(self, quiet: float) -> None:
        """Return once no on-demand miss happened for ``quiet`` seconds."""
        if self.last is None:
            self.touch()
        assert self.last is not None
        while (remaining := self.last + quiet - trio.current_time()) > 0:
            await trio.sleep(remaining)


@dataclass
class BlobStats:
    """Counters of one blob's cache activity."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    fetch_requests: int = 0
    background_bytes: int = 0
    integrity_failures: int = 0


@dataclass
class _Inflight:
    """A fetch under way: readers of the same chunks wait on ``done``."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class CachedBlob:
    """One compressed blob: local reads of present chunks, coalesced verified fetches of missing ones."""

    def __init__(
        self,
        directory: Path,
        digest: str,
        size: int,
        chunk_size: int,
        fetch: FetchRange,
        span_digests: Sequence[str] = (),
        activity: ForegroundActivity | None = None,
        min_fetch: int = MIN_FETCH_BYTES,
        *,
        merge_gap_chunks: int = MERGE_GAP_CHUNKS,
        background_request_bytes: int = BACKGROUND_REQUEST_BYTES,
        background_quiet_seconds: float = BACKGROUND_QUIET_SECONDS,
    ) -> None:
        if span_digests and len(span_digests) != _chunk_count(size, chunk_size):
            raise ValueError(
                f"{digest}: {len(span_digests)} span digests for {size} bytes in {chunk_size}-byte chunks"
            )
        self.directory = directory
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.min_fetch = min_fetch
        self.merge_gap_chunks = merge_gap_chunks
        self.background_request_bytes = background_request_bytes
        self.background_quiet_seconds = background_quiet_seconds
        self.stats = BlobStats()
        self._fetch = fetch
        self._span_digests = list(span_digests)
        self._inflight: dict[int, _Inflight] = {}
        self._foreground = 0
        self._foreground_idle = trio.Event()
        self._foreground_idle.set()
        self._activity = activity or ForegroundActivity()
        directory.mkdir(parents=True, exist_ok=True)
        self._data_fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._data_fd).st_size != size:
            os.ftruncate(self._data_fd, size)
        self._present_fd = os.open(directory / "present", os.O_RDWR | os.O_CREAT, 0o600)
        count = _chunk_count(size, chunk_size)
        # The presence map is only meaningful for the chunk size it was written with.
        geometry = directory / "chunk_size"
        if not geometry.exists() or geometry.read_text().strip() != str(chunk_size):
            os.ftruncate(self._present_fd, 0)
            geometry.write_text(f"{chunk_size}\n")
        present = os.pread(self._present_fd, count, 0)
        self._present = bytearray(present.ljust(count, b"\0"))

    def set_span_digests(self, span_digests: Sequence[str]) -> None:
        """Check chunks fetched from now on against these span digests (one per chunk).

        Raises:
            ValueError: the digests do not cover the blob in this cache's chunk size.
        """
        if len(span_digests) != self.chunk_count:
            raise ValueError(f"{self.digest}: {len(span_digests)} span digests for {self.chunk_count} chunks")
        self._span_digests = list(span_digests)

    def close(self) -> None:
        """Close the blob's files."""
        for fd in (self._data_fd, self._present_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def chunk_count(self) -> int:
        """How many chunks the blob has."""
        return len(self._present)

    @property
    def present_bytes(self) -> int:
        """How many bytes of the blob are on local disk."""
        full = sum(self._present) * self.chunk_size
        if self._present and self._present[-1]:
            full -= self.chunk_size * len(self._present) - self.size
        return full

    @property
    def complete(self) -> bool:
        """Whether every chunk is present."""
        return all(self._present)

    @property
    def verified(self) -> bool:
        """Whether the whole blob was checked against its digest."""
        return (self.directory / "verified").exists()

    def is_present(self, offset: int, length: int) -> bool:
        """Tell whether blob bytes [offset, offset+length) (clipped at the end) are on local disk."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return True
        first, last = self._chunks_of(offset, length)
        return all(self._present[first : last + 1])

    async def read(self, offset: int, length: int) -> bytes:
        """Return blob bytes [offset, offset+length) clipped at the end, fetching missing chunks.

        Raises:
            DigestMismatch: a fetched chunk did not match its span digest (nothing was stored).
            FetchError: the registry could not be read after its retries.
        """
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        if self.is_present(offset, length):
            self.stats.hits += 1
        else:
            await self._fetch_missing(offset, length)
        return os.pread(self._data_fd, length, offset)

    async def ensure(self, offset: int, length: int) -> None:
        """Make blob bytes [offset, offset+length) present, fetching what is missing as an on-demand read would.

        For fetching ahead of reads: unlike ``read`` it neither reads the bytes back nor counts a hit.

        Raises:
            DigestMismatch, FetchError: as ``read``.
        """
        if not self.is_present(offset, length):
            await self._fetch_missing(offset, max(0, min(length, self.size - offset)))

    async def _fetch_missing(self, offset: int, length: int) -> None:
        """Fetch the missing chunks of a non-empty range at on-demand priority (background fill waits)."""
        first, last = self._chunks_of(offset, length)
        self.stats.misses += 1
        self._activity.touch()
        self._foreground += 1
        self._foreground_idle = trio.Event() if self._foreground == 1 else self._foreground_idle
        try:
            await self._ensure(first, last, widen=True)
        finally:
            self._activity.touch()
            self._foreground -= 1
            if self._foreground == 0:
                self._foreground_idle.set()

    def store(self, offset: int, data: bytes) -> None:
        """Keep bytes fetched outside the cache (one request's answer); the chunks they cover wholly become present.

        They count as fetched in ``stats``. Chunks are checked against span digests when known.

        Raises:
            DigestMismatch: a covered chunk did not match its span digest (it stays missing).
        """
        self.stats.fetch_requests += 1
        self.stats.bytes_fetched += len(data)
        end = min(offset + len(data), self.size)
        if end <= offset:
            return
        os.pwrite(self._data_fd, data[: end - offset], offset)
        first = -(-offset // self.chunk_size)
        last = self.chunk_count - 1 if end == self.size else end // self.chunk_size - 1
        for index in range(first, last + 1):
            if not self._present[index]:
                self._mark_present(index, verify=True, data=data, base=offset)

    def store_stream(self, offset: int, data: bytes) -> None:
        """Store the next bytes of a sequential download that started at 0, marking complete chunks present.

        The caller verifies the whole stream against the blob digest and then calls
        ``mark_verified``, or ``reset`` if it did not match; chunks are also checked against span
        digests when they are known.

        Raises:
            DigestMismatch: a chunk did not match its span digest.
        """
        os.pwrite(self._data_fd, data, offset)
        end = offset + len(data)
        last_full = end // self.chunk_size if end < self.size else self.chunk_count
        for index in range(offset // self.chunk_size, last_full):
            if not self._present[index]:
                self._mark_present(index, verify=True)

    def reset(self) -> None:
        """Forget every chunk (after a whole-blob digest mismatch): nothing unverified stays usable."""
        self._present[:] = b"\0" * self.chunk_count
        os.pwrite(self._present_fd, bytes(self._present), 0)
        (self.directory / "verified").unlink(missing_ok=True)

    def forget(self, offset: int, length: int) -> None:
        """Mark the chunks holding blob bytes [offset, offset+length) missing, so they are fetched again.

        For bytes found bad by a check made after they were cached (an eStargz chunk digest):
        without this they would stay present and every later read would fail the same way.
        """
        if length <= 0 or offset >= self.size:
            return
        first, last = self._chunks_of(offset, min(length, self.size - offset))
        for index in range(first, last + 1):
            if self._present[index]:
                self._present[index] = 0
                os.pwrite(self._present_fd, b"\0", index)
        (self.directory / "verified").unlink(missing_ok=True)

    def mark_verified(self) -> None:
        """Record that the whole blob matched its digest."""
        (self.directory / "verified").touch()

    async def fill(self, *, yield_to_foreground: bool = True, quiet_seconds: float | None = None) -> None:
        """Fetch every missing chunk in order, pausing while on-demand reads are waiting or recent.

        ``quiet_seconds`` (None: the cache's ``background_quiet_seconds``) is how long on-demand
        reads must have been quiet before each background request.

        Raises:
            DigestMismatch, FetchError: as ``read``.
        """
        if quiet_seconds is None:
            quiet_seconds = self.background_quiet_seconds
        per_request = max(1, self.background_request_bytes // self.chunk_size)
        index = 0
        while index < self.chunk_count:
            if self._present[index]:
                index += 1
                continue
            if yield_to_foreground:
                await self._background_turn(quiet_seconds)
                if self._present[index]:
                    continue  # an on-demand read fetched it meanwhile
            end = index
            while end + 1 < self.chunk_count and end + 1 - index < per_request and not self._present[end + 1]:
                end += 1
            before = self.stats.bytes_fetched
            await self._ensure(index, end, widen=False)
            self.stats.background_bytes += self.stats.bytes_fetched - before
            index = end + 1

    async def _background_turn(self, quiet_seconds: float) -> None:
        """Wait until no on-demand read is waiting and none missed for ``quiet_seconds``."""
        while True:
            await self._foreground_idle.wait()
            await self._activity.wait_quiet(quiet_seconds)
            if self._foreground == 0:
                return

    async def verify_whole(self) -> None:
        """Hash the complete blob and mark it verified.

        Raises:
            DigestMismatch: the blob on disk does not match its digest (the presence map is reset).
        """
        actual = await trio.to_thread.run_sync(self._hash_data)
        if actual != self.digest:
            self.reset()
            raise DigestMismatch(f"blob {self.digest}", self.digest, actual)
        self.mark_verified()

    def _hash_data(self) -> str:
        hasher = hashlib.sha256()
        offset = 0
        while offset < self.size:
            block = os.pread(self._data_fd, min(8 << 20, self.size - offset), offset)
            if not block:
                break
            hasher.update(block)
            offset += len(block)
        return "sha256:" + hasher.hexdigest()

    def _chunks_of(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.chunk_size, (offset + length - 1) // self.chunk_size

    async def _ensure(self, first: int, last: int, *, widen: bool) -> None:
        """Make chunks first..last present: wait for fetches under way, start the rest."""
        if widen:
            first, last = self._widen(first, last)
        while True:
            waiting = {id(f): f for i in range(first, last + 1) if (f := self._inflight.get(i)) is not None}
            # Claim the missing runs before any task starts, so a reader arriving meanwhile waits
            # for these fetches instead of starting its own.
            claimed = [(run, self._claim(*run)) for run in self._missing_runs(first, last)]
            if not claimed and not waiting:
                return
            if claimed:
                async with trio.open_nursery() as nursery:
                    for (run_first, run_last), inflight in claimed:
                        nursery.start_soon(self._fetch_run, run_first, run_last, inflight)
            for inflight in [*(i for _, i in claimed), *waiting.values()]:
                await inflight.done.wait()
                if inflight.error is not None:
                    raise inflight.error

    def _claim(self, first: int, last: int) -> _Inflight:
        inflight = _Inflight()
        for index in range(first, last + 1):
            self._inflight[index] = inflight
        return inflight

    def _widen(self, first: int, last: int) -> tuple[int, int]:
        """Grow a small miss to ``min_fetch`` bytes forward, over chunks that are missing too."""
        want = max(1, self.min_fetch // self.chunk_size)
        while last - first + 1 < want and last + 1 < self.chunk_count and not self._present[last + 1]:
            if (last + 1) in self._inflight:
                break
            last += 1
        return first, last

    def _missing_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        """Missing chunks not already being fetched, grouped into runs merged over small gaps."""
        runs: list[tuple[int, int]] = []
        for index in range(first, last + 1):
            if self._present[index] or index in self._inflight:
                continue
            if (
                runs
                and index - runs[-1][1] <= self.merge_gap_chunks
                and not self._any_inflight(runs[-1][1] + 1, index)
            ):
                runs[-1] = (runs[-1][0], index)
            else:
                runs.append((index, index))
        return runs

    def _any_inflight(self, first: int, last: int) -> bool:
        return any(i in self._inflight for i in range(first, last))

    async def _fetch_run(self, first: int, last: int, inflight: _Inflight) -> None:
        """Fetch a claimed run; errors are handed to every waiter rather than raised here."""
        try:
            offset = first * self.chunk_size
            end = min(self.size, (last + 1) * self.chunk_size)
            data = await self._fetch(offset, end - offset)
            self.stats.fetch_requests += 1
            self.stats.bytes_fetched += len(data)
            if len(data) != end - offset:
                raise TruncatedResponse(
                    f"blob {self.digest}: asked for bytes {offset}-{end}, got {len(data)} bytes; try again later"
                )
            self._store_run(first, last, offset, data)
        except Exception as error:
            inflight.error = error
        finally:
            for index in range(first, last + 1):
                self._inflight.pop(index, None)
            inflight.done.set()

    def _store_run(self, first: int, last: int, offset: int, data: bytes) -> None:
        os.pwrite(self._data_fd, data, offset)
        for index in range(first, last + 1):
            if not self._present[index]:
                self._mark_present(index, verify=True, data=data, base=offset)

    def _mark_present(self, index: int, *, verify: bool, data: bytes | None = None, base: int = 0) -> None:
        if verify and self._span_digests:
            start = index * self.chunk_size
            end = min(self.size, start + self.chunk_size)
            chunk = (
                data[start - base : end - base]
                if data is not None
                else os.pread(self._data_fd, end - start, start)
            )
            actual = "sha256:" + hashlib.sha256(chunk).hexdigest()
            if actual != self._span_digests[index]:
                self.stats.integrity_failures += 1
                raise DigestMismatch(
                    f"layer {self.digest} span {index} (bytes {start}-{end})",
                    self._span_digests[index],
                    actual,
                )
        self._present[index] = 1
        os.pwrite(self._present_fd, b"\1", index)


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size)) if size else 0


class BlobCache:
    """The on-disk cache of all blobs under one root directory."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        min_fetch: int = MIN_FETCH_BYTES,
        merge_gap_chunks: int = MERGE_GAP_CHUNKS,
        background_request_bytes: int = BACKGROUND_REQUEST_BYTES,
        background_quiet_seconds: float = BACKGROUND_QUIET_SECONDS,
    ) -> None:
        """A cache under ``root`` (created if missing), its blobs tuned as the [cache] config says; raises OSError."""
        self.min_fetch = min_fetch
        self.merge_gap_chunks = merge_gap_chunks
        self.background_request_bytes = background_request_bytes
        self.background_quiet_seconds = background_quiet_seconds
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, CachedBlob] = {}
        self._activity = ForegroundActivity()

    def blob_dir(self, digest: str) -> Path:
        """Where a blob's files live (the digest is validated so it can't name another path)."""
        return self.root / "sha256" / sha256_hex(digest)

    def open(
        self,
        digest: str,
        size: int,
        fetch: FetchRange,
        *,
        chunk_size: int = 64 << 10,
        span_digests: Sequence[str] = (),
        min_fetch: int | None = None,
    ) -> CachedBlob:
        """Return the cached blob for ``digest``, opening its files once per process; raises OSError.

        ``min_fetch`` (None: the cache's) is the least an on-demand read fetches; 0 for blobs cached
        in fine chunks, whose reads should fetch exactly their gzip members.
        """
        blob = self._open.get(digest)
        if blob is None:
            blob = CachedBlob(
                self.blob_dir(digest),
                digest,
                size,
                chunk_size,
                fetch,
                span_digests,
                self._activity,
                min_fetch=self.min_fetch if min_fetch is None else min_fetch,
                merge_gap_chunks=self.merge_gap_chunks,
                background_request_bytes=self.background_request_bytes,
                background_quiet_seconds=self.background_quiet_seconds,
            )
            self._open[digest] = blob
        return blob

    def release(self, digest: str) -> None:
        """Close the blob of ``digest`` if it is open (its bytes stay on disk); the next ``open`` reopens it."""
        blob = self._open.pop(digest, None)
        if blob is not None:
            blob.close()

    def close(self) -> None:
        """Close every open blob."""
        for blob in self._open.values():
            blob.close()
        self._open.clear()


def open_blob_cache(config: Config) -> BlobCache:
    """The blob cache a config describes (directory and [cache]/[background_fetch] tunables); raises OSError."""
    return BlobCache(
        config.cache_path(),
        min_fetch=config.cache.min_fetch_bytes,
        merge_gap_chunks=config.cache.merge_gap_chunks,
        background_request_bytes=config.cache.background_request_bytes,
        background_quiet_seconds=config.background_fetch.quiet_seconds,
    )
