"""The local index store, and its write-behind form used while a mount is being made ready."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.model import Entry, EntryType, LayerFormat, LayerIndex
from snapshotter.index_store import IndexStore, WriteBehindIndexStore

DIGEST = "sha256:" + "ab" * 32


def sample_index(digest: str = DIGEST) -> LayerIndex:
    """A small eStargz-like index: one directory and one file."""
    entries = [Entry("d", EntryType.DIR, 0o755), Entry("d/f", EntryType.FILE, size=3, data_offset=512)]
    return LayerIndex(
        "application/vnd.oci.image.layer.v1.tar+gzip", LayerFormat.GZIP, digest, 100, "", 1024, entries
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

        def full(self: IndexStore, index: LayerIndex) -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(IndexStore, "put", full)
            with pytest.raises(OSError):
                store.flush()
        assert IndexStore(tmp_path).get(DIGEST) is None
        store.flush()
        assert IndexStore(tmp_path).get(DIGEST) == sample_index()
