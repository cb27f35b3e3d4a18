"""Fetched byte ranges of compressed blobs, kept on local disk and shared by every process on one root.

Each blob lives in ``ROOT/<algo>/<hex>/``; its chunks in ``chunks-<chunk_size>/``: ``data`` is a
sparse file the size of the blob, ``present`` holds one byte per chunk (1 = the chunk's bytes in
``data`` are fetched, and verified when the index recorded span digests), ``verified`` exists once
the whole ``data`` matched the blob digest. Each chunk size has its own directory: a presence map
means nothing in another geometry, and an eStargz blob cached in fine chunks (checked only later,
against its TOC) must never write unchecked bytes over another process's span-verified ones.

Several processes (``lazysnap mount``s, ``lazysnap serve``) may open the same blob at once. The
rules that make this safe:

- a writer holds the blob's ``lock`` (``fcntl.flock``) while it writes: it re-reads the shared
  presence bytes, writes only chunks no process has marked present, then marks them. Bytes of a
  chunk marked present are never rewritten until someone marks it missing again;
- readers take no lock: a chunk present in this process's map is read with one ``pread``; a
  chunk missing here is looked up in the shared ``present`` file first (one ``pread`` of a few
  bytes, against a network round trip), so a process uses what another one fetched;
- data is written before its presence byte, and a presence byte only after its chunk passed its
  span digest: a process killed at any point leaves at worst a chunk fetched again. A streamed
  download goes to a private ``*.partial`` file and reaches ``data`` only once the whole stream
  matched the blob digest (``mark_verified``), so a crashed or lied-to download leaves nothing
  anyone trusts;
- ``reset`` forgets only this process's view; only a whole-blob mismatch (``verify_whole``) or a
  chunk found bad (``forget``) clears the shared map, and ``verified`` goes with it.

A crash means a process crash (SIGKILL): nothing is fsynced, so a power loss may leave presence
bytes whose data never reached the disk (the whole-blob check of a complete layer catches it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
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
        self.files = directory / f"chunks-{chunk_size}"
        self.files.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._pending: tuple[int, str] | None = None  # a streamed download's private file
        count = _chunk_count(size, chunk_size)
        with self._locked():
            _remove_old_layout(directory)
            _remove_abandoned_partials(self.files)
            self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
            # Only ever grown: shrinking would cut the file under another process's reads (a
            # descriptor lying about the size fails the blob's digest check anyway).
            if os.fstat(self._data_fd).st_size < size:
                os.ftruncate(self._data_fd, size)
            self._present_fd = os.open(self.files / "present", os.O_RDWR | os.O_CREAT, 0o600)
        self._present = bytearray(count)
        if self.verified:
            self._present[:] = b"\1" * count
        else:
            self._refresh(0, count - 1)

    @property
    def data_path(self) -> Path:
        """The sparse file holding the blob's fetched bytes (complete and trustworthy once ``verified``)."""
        return self.files / "data"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the blob's writer lock (other processes writing this blob wait; readers never do)."""
        # Taken on the caller's thread, the trio loop included: a holder only writes what one
        # request fetched (at most background_request_bytes) or, once per download, copies the
        # verified blob into data. Hashes and fetches happen outside it.
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _shared(self, first: int, last: int) -> bytes:
        """The shared presence bytes of chunks first..last (a short file reads as missing chunks)."""
        return os.pread(self._present_fd, last - first + 1, first).ljust(last - first + 1, b"\0")

    def _refresh(self, first: int, last: int) -> None:
        """Take up the chunks among first..last that another process (or an earlier run) marked present."""
        if last < first:
            return
        for index, byte in enumerate(self._shared(first, last), first):
            if byte:
                self._present[index] = 1

    def set_span_digests(self, span_digests: Sequence[str]) -> None:
        """Check chunks fetched from now on against these span digests (one per chunk).

        Raises:
            ValueError: the digests do not cover the blob in this cache's chunk size.
        """
        if len(span_digests) != self.chunk_count:
            raise ValueError(f"{self.digest}: {len(span_digests)} span digests for {self.chunk_count} chunks")
        self._span_digests = list(span_digests)

    def close(self) -> None:
        """Close the blob's files (and drop an unfinished streamed download)."""
        self._drop_pending()
        for fd in (self._data_fd, self._present_fd, self._lock_fd):
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
        """Whether every chunk is present (here, or marked so by another process)."""
        if all(self._present):
            return True
        self._refresh(0, self.chunk_count - 1)
        return all(self._present)

    @property
    def verified(self) -> bool:
        """Whether the whole blob was checked against its digest."""
        return (self.files / "verified").exists()

    def is_present(self, offset: int, length: int) -> bool:
        """Tell whether blob bytes [offset, offset+length) (clipped at the end) are on local disk."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return True
        first, last = self._chunks_of(offset, length)
        if all(self._present[first : last + 1]):
            return True
        # Missing here: another process may have fetched it. One pread of a few bytes (measured:
        # 1.6 us more than a hit) against a round trip to the registry (ms).
        self._refresh(first, last)
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

        They count as fetched in ``stats``. Chunks are checked against span digests when known;
        bytes of chunks they cover only partly are not kept (a fetch of such a chunk asks for all of it).

        Raises:
            DigestMismatch: a covered chunk did not match its span digest (it stays missing).
        """
        self.stats.fetch_requests += 1
        self.stats.bytes_fetched += len(data)
        end = min(offset + len(data), self.size)
        if end <= offset:
            return
        first = -(-offset // self.chunk_size)
        last = self.chunk_count - 1 if end == self.size else end // self.chunk_size - 1
        self._commit(offset, data[: end - offset], range(first, last + 1))

    def store_stream(self, offset: int, data: bytes) -> None:
        """Keep the next bytes of a sequential download that started at 0, privately until ``mark_verified``.

        The caller verifies the whole stream against the blob digest and then calls
        ``mark_verified`` (the bytes become the blob's, every chunk present), or ``reset`` if it
        did not match (they are dropped). Until then no process, this one included, reads them:
        a download killed or lied to halfway leaves nothing anyone trusts. Chunks are also
        checked against span digests when they are known.

        Raises:
            DigestMismatch: a chunk did not match its span digest.
        """
        if self._pending is None:
            # A name of its own per writer: two processes may download the same blob at once.
            path = self.files / f"data.{os.getpid()}.{uuid.uuid4().hex}.partial"
            self._pending = (os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), str(path))
        fd = self._pending[0]
        os.pwrite(fd, data, offset)
        if not self._span_digests:
            return
        end = offset + len(data)
        last_full = end // self.chunk_size if end < self.size else self.chunk_count
        for index in range(offset // self.chunk_size, last_full):
            start = index * self.chunk_size
            self._check_span(index, os.pread(fd, min(self.chunk_size, self.size - start), start))

    def reset(self) -> None:
        """Forget this process's chunks and any unfinished streamed download (a failed download, a DiffID mismatch).

        What other processes marked present stays: each chunk there was checked on its own or
        with the whole blob, and they may be reading it. A whole-blob mismatch (``verify_whole``)
        clears the shared map too.
        """
        self._drop_pending()
        self._present[:] = bytes(self.chunk_count)

    def forget(self, offset: int, length: int) -> None:
        """Mark the chunks holding blob bytes [offset, offset+length) missing, for every process, so they are fetched again.

        For bytes found bad by a check made after they were cached (an eStargz chunk digest):
        without this they would stay present and every later read would fail the same way.
        """
        if length <= 0 or offset >= self.size:
            return
        first, last = self._chunks_of(offset, min(length, self.size - offset))
        with self._locked():
            (self.files / "verified").unlink(missing_ok=True)
            os.pwrite(self._present_fd, bytes(last - first + 1), first)
        self._present[first : last + 1] = bytes(last - first + 1)

    def mark_verified(self) -> None:
        """Record that the whole blob matched its digest: every chunk present, a streamed download's bytes kept."""
        with self._locked():
            if self._pending is not None:
                self._adopt_pending()
            os.pwrite(self._present_fd, b"\1" * self.chunk_count, 0)
            # Last: a process that sees this marker trusts every byte of ``data``.
            (self.files / "verified").touch()
        self._present[:] = b"\1" * self.chunk_count

    def _adopt_pending(self) -> None:
        """Copy the verified download into ``data`` where no process has a chunk yet (call under the lock)."""
        assert self._pending is not None
        source = self._pending[0]
        shared = self._shared(0, self.chunk_count - 1)
        for first, last in _runs(i for i in range(self.chunk_count) if not shared[i]):
            start = first * self.chunk_size
            end = min(self.size, (last + 1) * self.chunk_size)
            while start < end:
                copied = os.copy_file_range(source, self._data_fd, end - start, start, start)
                if copied == 0:
                    raise OSError(f"blob {self.digest}: download file ends at {start}, before {end}")
                start += copied
        self._drop_pending()

    def _drop_pending(self) -> None:
        if self._pending is None:
            return
        fd, path = self._pending
        self._pending = None
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

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
            if not self._present[index]:
                # Another process (a mount of the same image, serve) may be filling it too.
                self._refresh(index, min(self.chunk_count, index + per_request) - 1)
            if self._present[index]:
                index += 1
                continue
            if yield_to_foreground:
                await self._background_turn(quiet_seconds)
                self._refresh(index, index)
                if self._present[index]:
                    continue  # an on-demand read (here or elsewhere) fetched it meanwhile
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
        # Hashed without the lock (writers would wait seconds): no process writes over a chunk
        # marked present, and this blob is complete, so what is hashed is what ``verified`` covers.
        actual = await trio.to_thread.run_sync(self._hash_data)
        if actual != self.digest:
            self._discard_shared()
            raise DigestMismatch(f"blob {self.digest}", self.digest, actual)
        self.mark_verified()

    def _discard_shared(self) -> None:
        """Forget every chunk, for every process: ``data`` holds bytes that are not the blob's."""
        with self._locked():
            (self.files / "verified").unlink(missing_ok=True)
            os.ftruncate(self._present_fd, 0)
        self.reset()

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
            self._refresh(
                first, min(self.chunk_count - 1, max(last, first + self.min_fetch // self.chunk_size))
            )
            first, last = self._widen(first, last)
        while True:
            self._refresh(first, last)
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
            self._commit(offset, data, range(first, last + 1))
        except Exception as error:
            inflight.error = error
        finally:
            for index in range(first, last + 1):
                self._inflight.pop(index, None)
            inflight.done.set()

    def _commit(self, offset: int, data: bytes, chunks: Iterable[int]) -> None:
        """Keep the bytes of ``chunks`` (wholly inside ``data``, blob bytes at ``offset``) and mark them present.

        Chunks already present here are skipped; the others are checked against their span
        digests first, and a chunk that fails is not written at all. Under the blob's lock, and
        never over a chunk another process marked present: its readers read it without a lock.

        Raises:
            DigestMismatch: a chunk failed its span digest (the chunks that passed are kept).
        """
        good: list[int] = []
        failure: DigestMismatch | None = None
        for index in chunks:
            if self._present[index]:
                continue
            start = index * self.chunk_size
            try:
                self._check_span(index, data[start - offset : start - offset + self.chunk_size])
            except DigestMismatch as error:
                failure = failure or error
                continue
            good.append(index)
        if good:
            view = memoryview(data)
            with self._locked():
                shared = self._shared(good[0], good[-1])
                for first, last in _runs(i for i in good if not shared[i - good[0]]):
                    start = first * self.chunk_size
                    end = min(self.size, (last + 1) * self.chunk_size)
                    os.pwrite(self._data_fd, view[start - offset : end - offset], start)
                    # Data first: a process killed between the two leaves a chunk fetched again.
                    os.pwrite(self._present_fd, b"\1" * (last - first + 1), first)
            for index in good:
                self._present[index] = 1
        if failure is not None:
            raise failure

    def _check_span(self, index: int, chunk: bytes) -> None:
        """Raise DigestMismatch (and count it) unless ``chunk`` matches span ``index``'s digest; no digests, no check."""
        if not self._span_digests:
            return
        actual = "sha256:" + hashlib.sha256(chunk).hexdigest()
        if actual != self._span_digests[index]:
            self.stats.integrity_failures += 1
            start = index * self.chunk_size
            raise DigestMismatch(
                f"layer {self.digest} span {index} (bytes {start}-{start + len(chunk)})",
                self._span_digests[index],
                actual,
            )


def _runs(indexes: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs (first, last) of increasing indexes."""
    run: tuple[int, int] | None = None
    for index in indexes:
        if run is not None and index == run[1] + 1:
            run = (run[0], index)
            continue
        if run is not None:
            yield run
        run = (index, index)
    if run is not None:
        yield run


# A blob directory of the layout before chunks-<size>/: one presence map that processes with
# different chunk sizes truncated and rewrote under each other, so none of it can be trusted.
_OLD_LAYOUT = ("chunk_size", "present", "verified", "data")


def _remove_old_layout(directory: Path) -> None:
    """Remove the files of the old single-geometry layout (their chunks are fetched again); call under the lock."""
    if not (directory / "chunk_size").exists():
        return
    for name in _OLD_LAYOUT:
        (directory / name).unlink(missing_ok=True)


def _remove_abandoned_partials(directory: Path) -> None:
    """Remove streamed downloads whose process is gone (killed before it could drop them); call under the lock."""
    for path in directory.glob("data.*.partial"):
        try:
            os.kill(int(path.name.split(".")[1]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass  # not our name, or a live process of another user


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
