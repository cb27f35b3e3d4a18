"""Directory-aware read-ahead: a cold read of a small file takes the next files of its directory along."""

from __future__ import annotations

import os

import trio

from index.estargz import read_estargz
from index.model import Entry, LayerIndex
from index.readahead import SiblingReadahead
from tests.support.estargz_writer import build_estargz
from tests.support.image_builder import directory, file

MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def small(seed: int) -> bytes:
    return os.urandom(3000) + bytes([seed]) * 1000  # incompressible enough to have a real size


def layer() -> LayerIndex:
    """pkg/ with five small modules, a subdirectory between them, then other/ and a large file."""
    entries = [
        directory("pkg/"),
        file("pkg/a.pyc", small(1)),
        file("pkg/b.pyc", small(2)),
        directory("pkg/sub/"),
        file("pkg/sub/inner.pyc", small(3)),
        file("pkg/c.pyc", small(4)),
        file("pkg/d.pyc", small(5)),
        file("pkg/e.pyc", small(6)),
        directory("other/"),
        file("other/x.pyc", small(7)),
        file("big.bin", os.urandom(200_000)),
    ]
    blob = build_estargz(entries)

    async def read_range(offset: int, length: int) -> bytes:
        return blob.blob[offset : offset + length]

    async def load() -> LayerIndex:
        found = await read_estargz(read_range, len(blob.blob), digest=blob.digest, media_type=MEDIA_TYPE)
        return found.index

    return trio.run(load)


def entry(index: LayerIndex, path: str) -> Entry:
    return next(e for e in index.entries if e.path == path)


def span_of(index: LayerIndex, path: str) -> tuple[int, int]:
    """What a first read of the file needs: the member holding its headers, up to its last chunk's end."""
    found = entry(index, path)
    return found.header_member, found.chunks[-1].blob_end


def data_of(index: LayerIndex, path: str) -> tuple[int, int]:
    """The file's own bytes: its first chunk's member to its last's end."""
    chunks = entry(index, path).chunks
    return chunks[0].blob_offset, chunks[-1].blob_end


def test_range_covers_the_file_and_its_following_siblings() -> None:
    """Reading pkg/a.pyc fetches a..e, from a's headers on, in one range (pkg/sub in between rides along); other/ is not reached for."""
    index = layer()
    found = SiblingReadahead(index, budget=64 << 10).range_for(entry(index, "pkg/a.pyc"))
    assert found is not None
    assert found.offset == span_of(index, "pkg/a.pyc")[0]
    assert found.end == span_of(index, "pkg/e.pyc")[1]
    assert found.end <= data_of(index, "other/x.pyc")[0]


def test_budget_limits_how_many_siblings_come_along() -> None:
    """With room for about two files, the range ends at b.pyc, never inside a file."""
    index = layer()
    a_start = span_of(index, "pkg/a.pyc")[0]
    budget = span_of(index, "pkg/b.pyc")[1] - a_start + 100
    found = SiblingReadahead(index, budget=budget).range_for(entry(index, "pkg/a.pyc"))
    assert found is not None
    assert (found.offset, found.end) == (a_start, span_of(index, "pkg/b.pyc")[1])


def test_last_file_of_a_directory_reads_only_itself() -> None:
    """Nothing of another directory extends the range (the member before it holds its headers)."""
    index = layer()
    found = SiblingReadahead(index).range_for(entry(index, "other/x.pyc"))
    assert found is not None
    assert (found.offset, found.end) == span_of(index, "other/x.pyc")


def test_files_larger_than_the_budget_get_no_read_ahead() -> None:
    """A big file's own read is large already: no range is proposed."""
    index = layer()
    assert SiblingReadahead(index, budget=64 << 10).range_for(entry(index, "big.bin")) is None


def test_entries_not_in_the_index_get_none() -> None:
    """An entry from elsewhere (not this index's object) is not guessed at."""
    index = layer()
    stranger = Entry("pkg/a.pyc", entry(index, "pkg/a.pyc").type, size=10)
    assert SiblingReadahead(index).range_for(stranger) is None
