"""The local index store, and its write-behind form used while a mount is being made ready."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from index.model import Entry, EntryType, LayerFormat, LayerIndex
from snapshotter.cache.index_store import IndexStore, WriteBehindIndexStore

DIGEST = "sha256:" + "ab" * 32


def sample_index(digest: str = DIGEST) -> LayerIndex:
    """A small eStargz-like index: one directory and one file."""
    entries = [
        Entry("d", EntryType.DIR, 0o755, header_offset=0),
        Entry("d/f", EntryType.FILE, size=3, data_offset=1024, header_offset=512),
    ]
    return LayerIndex(
        "application/vnd.oci.image.layer.v1.tar+gzip", LayerFormat.GZIP, digest, 100, "", 2560, entries
    )


def test_put_then_get(tmp_path: Path) -> None:
    """An index put in the store comes back equal, from a new store on the same directory too."""
    IndexStore(tmp_path).put(sample_index())
    assert IndexStore(tmp_path).get(DIGEST) == sample_index()


class TestWriteBehind:
    def test_put_writes_nothing_until_flush(self, tmp_path: Path) -> None:
        """A put index is visible through the same store at once, on disk only after flush."""
        store = WriteBehindIndexStore(tmp_path)
        store.put(sample_index())
        assert store.get(DIGEST) == sample_index()
        assert IndexStore(tmp_path).get(DIGEST) is None
        store.flush()
        assert IndexStore(tmp_path).get(DIGEST) == sample_index()
        store.flush()  # nothing left queued: a no-op

    def test_failed_write_stays_queued(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write that fails raises OSError and keeps its index queued for the next flush."""
        store = WriteBehindIndexStore(tmp_path)
        store.put(sample_index())

        def full(self: IndexStore, index: LayerIndex, scope: str = "") -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(IndexStore, "put", full)
            with pytest.raises(OSError):
                store.flush()
        assert IndexStore(tmp_path).get(DIGEST) is None
        store.flush()
        assert IndexStore(tmp_path).get(DIGEST) == sample_index()


class TestProvenance:
    """Indexes are kept by where they came from: a scoped index is never served as a trusted one."""

    def test_a_scoped_index_is_invisible_to_other_scopes(self, tmp_path: Path) -> None:
        """An index stored for one repository is found only there, not as trusted nor for another repository."""
        store = IndexStore(tmp_path)
        store.put(sample_index(), "repo:attacker/images")
        assert store.get(DIGEST, "repo:attacker/images") is not None
        assert store.get(DIGEST) is None
        assert store.get(DIGEST, "repo:victim/images") is None

    def test_dropping_an_index_removes_only_that_scope(self, tmp_path: Path) -> None:
        """drop() forgets one provenance's index and leaves the trusted one alone."""
        store = WriteBehindIndexStore(tmp_path)
        store.put(sample_index())
        store.put(sample_index(), "toc:sha256:" + "1" * 64)
        store.flush()
        store.drop(DIGEST, "toc:sha256:" + "1" * 64)
        assert store.get(DIGEST, "toc:sha256:" + "1" * 64) is None
        assert store.get(DIGEST) is not None


def put_many(root: str, rounds: int) -> None:
    """Child: put the sample index ``rounds`` times (a process re-indexing the same blob)."""
    store = IndexStore(root)
    for _ in range(rounds):
        store.put(sample_index())


class TestSharedStore:
    """Processes sharing one store never lose or half-read each other's indexes."""

    def test_a_drop_keeps_an_index_another_process_put_since(self, tmp_path: Path) -> None:
        """Dropping an index read earlier leaves the one another store wrote over it since."""
        reader, writer = IndexStore(tmp_path), IndexStore(tmp_path)
        writer.put(sample_index())
        assert reader.get(DIGEST) is not None
        writer.put(sample_index())  # a fresh file: another inode
        reader.drop(DIGEST)
        assert IndexStore(tmp_path).get(DIGEST) == sample_index()
        writer.drop(DIGEST)  # what it wrote itself goes
        assert IndexStore(tmp_path).get(DIGEST) is None

    def test_concurrent_puts_and_gets_see_whole_indexes(self, tmp_path: Path) -> None:
        """Reads while two processes keep rewriting an index always find it whole, and no temporary file is left."""
        context = multiprocessing.get_context("spawn")
        IndexStore(tmp_path).put(sample_index())
        writers = [context.Process(target=put_many, args=(str(tmp_path), 200)) for _ in range(2)]
        for process in writers:
            process.start()
        store = IndexStore(tmp_path)
        while any(process.is_alive() for process in writers):
            assert store.get(DIGEST) == sample_index()
        for process in writers:
            process.join()
            assert process.exitcode == 0
        assert sorted(p.name for p in (tmp_path / "sha256").iterdir()) == [
            f"{'ab' * 32}.idx",
            f"{'ab' * 32}.idx.lock",
        ]
