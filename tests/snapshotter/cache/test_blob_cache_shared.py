"""One blob cache directory shared by several processes: nobody corrupts or wrongly trusts another's chunks."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import trio

from snapshotter.cache.blob_cache import BlobCache, CachedBlob

BLOB_SIZE = 3 * (1 << 20) + 4321
# A spawned child imports this module afresh: no trio loop, no pytest state carried over.
CONTEXT = multiprocessing.get_context("spawn")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _spans(data: bytes, chunk_size: int) -> list[str]:
    return [_digest(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random blob on disk, which the children's fake registries serve ranges of."""
    path = tmp_path_factory.mktemp("blob") / "blob"
    path.write_bytes(random.Random(11).randbytes(BLOB_SIZE))
    return path


def _open(root: Path, blob: bytes, chunk_size: int, *, spans: bool, delay: float = 0.0) -> CachedBlob:
    """Open ``blob`` in the cache at ``root``, fetched from memory after ``delay`` seconds a request."""

    async def fetch(offset: int, length: int) -> bytes:
        await trio.sleep(delay)
        return blob[offset : offset + length]

    return BlobCache(root, min_fetch=0).open(
        _digest(blob),
        len(blob),
        fetch,
        chunk_size=chunk_size,
        span_digests=_spans(blob, chunk_size) if spans else (),
    )


def read_randomly(root: str, blob_path: str, chunk_size: int, seed: int, spans: bool, fill: bool) -> None:
    """Child: read random ranges (checking each), then maybe fill the rest and verify the whole blob; raise on any wrong byte."""
    blob = Path(blob_path).read_bytes()

    async def run() -> None:
        cached = _open(Path(root), blob, chunk_size, spans=spans, delay=0.001)
        rng = random.Random(seed)
        for _ in range(100):
            offset = rng.randrange(len(blob))
            length = rng.randrange(1, 200_000)
            got = await cached.read(offset, length)
            if got != blob[offset : offset + length]:
                raise AssertionError(f"chunk size {chunk_size}: wrong bytes at {offset}+{length}")
        if not fill:
            cached.close()
            return
        await cached.fill(yield_to_foreground=False)
        await cached.verify_whole()
        if await cached.read(0, len(blob)) != blob:
            raise AssertionError(f"chunk size {chunk_size}: wrong blob after fill")
        cached.close()

    trio.run(run)


def fill_slowly(root: str, blob_path: str, chunk_size: int) -> None:
    """Child: fill the blob one slow chunk at a time (to be killed halfway)."""
    blob = Path(blob_path).read_bytes()

    async def run() -> None:
        cached = _open(Path(root), blob, chunk_size, spans=True, delay=0.01)
        cached.background_request_bytes = chunk_size
        await cached.fill(yield_to_foreground=False)

    trio.run(run)


def download_slowly(root: str, blob_path: str, chunk_size: int) -> None:
    """Child: stream the blob into the cache in small pieces (to be killed before it is verified)."""
    blob = Path(blob_path).read_bytes()
    cached = _open(Path(root), blob, chunk_size, spans=False)
    for offset in range(0, len(blob), 10_000):
        cached.store_stream(offset, blob[offset : offset + 10_000])
        time.sleep(0.002)
    time.sleep(60)  # killed before it would call mark_verified


def run_children(*targets: tuple[object, ...]) -> None:
    """Start one spawned process per (function, args...) at once; fail unless every one exits 0."""
    processes = [CONTEXT.Process(target=target[0], args=target[1:]) for target in targets]  # type: ignore[arg-type]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0] * len(processes)


def kill_when(process: multiprocessing.process.BaseProcess, ready: object, timeout: float = 30.0) -> None:
    """SIGKILL ``process`` once ``ready()`` is true; fail if that never happens."""
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert process.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)


def shared_present(root: Path, blob: bytes, chunk_size: int) -> bytes:
    """The shared presence bytes of ``blob`` in ``chunk_size`` chunks, as a fresh process finds them."""
    path = root / "sha256" / _digest(blob)[7:] / f"chunks-{chunk_size}" / "present"
    return path.read_bytes() if path.exists() else b""


async def assert_trusts_only_right_chunks(root: Path, blob: bytes, chunk_size: int) -> int:
    """A fresh open without span digests: every chunk it takes as present holds the blob's bytes; return how many."""
    cached = _open(root, blob, chunk_size, spans=False)
    present = 0
    for index in range(cached.chunk_count):
        start = index * chunk_size
        if cached.is_present(start, chunk_size):
            present += 1
            assert await cached.read(start, chunk_size) == blob[start : start + chunk_size], index
    cached.close()
    return present


class TestTwoProcessesOneBlob:
    """Processes sharing a root see each other's chunks and never damage them."""

    async def test_two_chunk_sizes_at_once_do_not_corrupt_each_other(
        self, tmp_path: Path, blob_file: Path
    ) -> None:
        """Two processes reading one blob at once in 64 KiB and 4 KiB chunks read the right bytes, and a later process of either size trusts only right chunks."""
        run_children(
            (read_randomly, str(tmp_path), str(blob_file), 64 << 10, 1, True, False),
            (read_randomly, str(tmp_path), str(blob_file), 4 << 10, 2, False, False),
        )
        blob = blob_file.read_bytes()
        assert await assert_trusts_only_right_chunks(tmp_path, blob, 64 << 10) > 0
        assert await assert_trusts_only_right_chunks(tmp_path, blob, 4 << 10) > 0

    async def test_processes_with_one_chunk_size_share_their_chunks(
        self, tmp_path: Path, blob_file: Path
    ) -> None:
        """Three processes reading and filling one blob at once in one chunk size all read right and verify it whole."""
        run_children(
            *((read_randomly, str(tmp_path), str(blob_file), 64 << 10, seed, True, True) for seed in range(3))
        )
        blob = blob_file.read_bytes()
        assert await assert_trusts_only_right_chunks(tmp_path, blob, 64 << 10) == -(-len(blob) // (64 << 10))

    async def test_a_chunk_another_process_fetched_is_not_fetched_again(self, tmp_path: Path) -> None:
        """A read missing in this process's view is served from the chunk another open of the blob fetched, without a request."""
        blob = random.Random(3).randbytes(10 * 4096)
        first, second = _open(tmp_path, blob, 4096, spans=True), _open(tmp_path / ".", blob, 4096, spans=True)
        assert first is not second
        await first.read(5 * 4096, 100)
        requests = second.stats.fetch_requests
        assert await second.read(5 * 4096, 100) == blob[5 * 4096 : 5 * 4096 + 100]
        assert second.stats.fetch_requests == requests
        first.close()
        second.close()


class TestKilledWriters:
    """A writer killed with SIGKILL leaves nothing a later process trusts wrongly."""

    async def test_a_fill_killed_halfway_leaves_only_verified_chunks(
        self, tmp_path: Path, blob_file: Path
    ) -> None:
        """After a fill is killed mid-way, a later open trusts some chunks, every one of them right, and not the whole blob."""
        blob = blob_file.read_bytes()
        chunk = 64 << 10
        child = CONTEXT.Process(target=fill_slowly, args=(str(tmp_path), str(blob_file), chunk))
        child.start()
        kill_when(child, lambda: shared_present(tmp_path, blob, chunk).count(1) >= 10)
        present = await assert_trusts_only_right_chunks(tmp_path, blob, chunk)
        assert 10 <= present < -(-len(blob) // chunk)
        assert not (tmp_path / "sha256" / _digest(blob)[7:] / f"chunks-{chunk}" / "verified").exists()
        cached = _open(tmp_path, blob, chunk, spans=True)
        await cached.fill(yield_to_foreground=False)
        await cached.verify_whole()
        assert cached.verified
        cached.close()

    async def test_a_download_killed_before_its_digest_check_leaves_nothing_trusted(
        self, tmp_path: Path, blob_file: Path
    ) -> None:
        """A streamed download killed before its whole-blob check marks no chunk present, and its partial file is removed at the next open."""
        blob = blob_file.read_bytes()
        chunk = 64 << 10
        child = CONTEXT.Process(target=download_slowly, args=(str(tmp_path), str(blob_file), chunk))
        child.start()
        files = tmp_path / "sha256" / _digest(blob)[7:] / f"chunks-{chunk}"
        kill_when(child, lambda: any(p.stat().st_size > len(blob) // 2 for p in files.glob("*.partial")))
        assert b"\1" not in shared_present(tmp_path, blob, chunk)
        assert await assert_trusts_only_right_chunks(tmp_path, blob, chunk) == 0
        assert list(files.glob("*.partial")) == []


async def test_a_cache_of_the_old_layout_is_not_trusted(tmp_path: Path) -> None:
    """A blob directory from before per-chunk-size files (one shared presence map) is removed and its chunks fetched again."""
    blob = random.Random(5).randbytes(4 * 4096)
    directory = tmp_path / "sha256" / _digest(blob)[7:]
    directory.mkdir(parents=True)
    (directory / "data").write_bytes(bytes(len(blob)))  # zeros that the old map claims are there
    (directory / "present").write_bytes(b"\1" * 4)
    (directory / "chunk_size").write_text("4096\n")
    cached = _open(tmp_path, blob, 4096, spans=False)
    assert not cached.is_present(0, len(blob))
    assert await cached.read(0, len(blob)) == blob
    assert not (directory / "chunk_size").exists() and not (directory / "data").exists()
    cached.close()
