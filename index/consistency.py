"""Whether a ``LayerIndex`` can describe the blob it claims to: a structural check before it is trusted.

A stored or published index was written by some earlier process, perhaps another machine's,
perhaps a hostile one; its checksum proves only that it was not damaged since. Before serving
a layer through it, ``check_index`` holds it against what is known independently (the blob's
descriptor size and media type, the span size the cache verifies with) and against itself:

- the format fits the media type (a ``tar`` index for a gzip blob would be sliced as if the
  compressed bytes were the tar);
- ``compressed_size`` is the descriptor's size;
- tar/gzip/zstd: exactly one span digest per ``span_size`` span of the blob, each a sha256;
  eStargz: no span digests, and every chunk carries its own sha256 digest;
- seek points lie inside the blob and the uncompressed stream, strictly increasing in both;
- every file's data lies inside the uncompressed stream and no two files' data overlap (tar,
  gzip, zstd); every chunk lies inside the blob, and a file's chunks follow each other from
  offset 0 to its size (eStargz).

``entry_ranges_problem`` (file data and chunks against the sizes the index itself states) is
also what ``index.serialize.load_index`` checks of every index it loads.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from index.errors import LayerFormatError
from index.model import Entry, EntryType, LayerFormat, LayerIndex

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
# A gzip blob may be eStargz: the media type does not tell them apart, the footer does.
_COMPATIBLE = {LayerFormat.GZIP: (LayerFormat.GZIP, LayerFormat.ESTARGZ)}


def check_index(index: LayerIndex, *, blob_size: int, span_size: int, expected_format: LayerFormat) -> None:
    """Check ``index`` against its blob's descriptor and itself; raises LayerFormatError naming the first inconsistency.

    Args:
        index: the index to check (stored, published, or just built).
        blob_size: the blob's size from its descriptor.
        span_size: the span size the blob cache verifies ``span_digests`` with.
        expected_format: the format the blob's media type implies (``GZIP`` also admits an
            eStargz index).
    """
    problem = (
        _format_problem(index, expected_format)
        or _size_problem(index, blob_size)
        or _digest_problem(index, span_size)
        or _seek_point_problem(index)
        or _layout_problem(index)
        or entry_ranges_problem(index)
        or _overlap_problem(index)
    )
    if problem is not None:
        raise LayerFormatError(
            f"layer {index.digest}: the index does not match its blob: {problem}; rebuild it"
        )


def entry_ranges_problem(index: LayerIndex, entries: Iterable[Entry] | None = None) -> str | None:
    """Return why some file's data or chunks (of ``entries``, default all) lie outside the sizes ``index`` states, or None; never raises."""
    for entry in index.entries if entries is None else entries:
        if entry.chunks:
            problem = _chunks_problem(entry, index.compressed_size)
        elif entry.type is EntryType.FILE and entry.size:
            problem = _data_problem(entry, index.uncompressed_size)
        else:
            continue
        if problem is not None:
            return f"entry {entry.path!r} {problem}"
    return None


def _layout_problem(index: LayerIndex) -> str | None:
    """Whether files keep their bytes the way the format does: chunks in eStargz, tar offsets elsewhere."""
    estargz = index.format is LayerFormat.ESTARGZ
    for entry in index.entries:
        if bool(entry.chunks) is not estargz and entry.type is EntryType.FILE and entry.size:
            where = "chunks" if estargz else "a data offset"
            return f"entry {entry.path!r} of a {index.format.value} index does not keep its data in {where}"
    return None


def _data_problem(entry: Entry, uncompressed_size: int) -> str | None:
    if not 0 <= entry.data_offset <= entry.data_offset + entry.size <= uncompressed_size:
        return (
            f"has data {entry.data_offset}..{entry.data_offset + entry.size} outside the "
            f"{uncompressed_size} bytes of the uncompressed stream"
        )
    return None


def _chunks_problem(entry: Entry, blob_size: int) -> str | None:
    covered = 0
    for chunk in entry.chunks:
        if chunk.file_offset != covered or chunk.size <= 0:
            return f"has a chunk at file offset {chunk.file_offset} of {chunk.size} bytes, expected one at {covered}"
        if not 0 <= chunk.blob_offset < chunk.blob_end <= blob_size:
            return f"has a chunk at blob bytes {chunk.blob_offset}..{chunk.blob_end}, outside the {blob_size}-byte blob"
        if chunk.inner_offset < 0:
            return f"has a chunk at negative inner offset {chunk.inner_offset}"
        covered += chunk.size
    if covered != entry.size:
        return f"has chunks covering {covered} of its {entry.size} bytes"
    return None


def _format_problem(index: LayerIndex, expected: LayerFormat) -> str | None:
    if index.format not in _COMPATIBLE.get(expected, (expected,)):
        return f"it is a {index.format.value} index, but the media type says {expected.value}"
    return None


def _size_problem(index: LayerIndex, blob_size: int) -> str | None:
    if index.compressed_size != blob_size:
        return f"it is for a blob of {index.compressed_size} bytes, the descriptor says {blob_size}"
    if index.format is LayerFormat.TAR and index.uncompressed_size != blob_size:
        return f"a plain tar of {blob_size} bytes cannot hold {index.uncompressed_size} uncompressed bytes"
    return None


def _digest_problem(index: LayerIndex, span_size: int) -> str | None:
    if index.format is LayerFormat.ESTARGZ:
        if index.span_digests:
            return "an eStargz index has span digests (its chunks carry the digests)"
        for entry in index.entries:
            for chunk in entry.chunks:
                if _SHA256.fullmatch(chunk.digest) is None:
                    return f"entry {entry.path!r} has a chunk at {chunk.file_offset} without a sha256 digest"
        return None
    if span_size <= 0 or index.span_size != span_size:
        return f"its span size is {index.span_size}, the cache verifies spans of {span_size}"
    spans = -(-index.compressed_size // span_size)
    if len(index.span_digests) != spans:
        return f"it has {len(index.span_digests)} span digests for the {spans} spans of the blob"
    for i, digest in enumerate(index.span_digests):
        if _SHA256.fullmatch(digest) is None:
            return f"span digest {i} is not a sha256 digest: {digest[:80]!r}"
    return None


def _seek_point_problem(index: LayerIndex) -> str | None:
    points = index.seek_points
    if index.format in (LayerFormat.GZIP, LayerFormat.ZSTD) and (not points or points[0].uncompressed_offset):
        return "its first seek point is not at the start of the uncompressed stream"
    previous = None
    for i, point in enumerate(points):
        inside = 0 <= point.compressed_offset < index.compressed_size and point.uncompressed_offset >= 0
        if not inside or point.uncompressed_offset > index.uncompressed_size or not 0 <= point.bits <= 7:
            return f"seek point {i} ({point.compressed_offset}, {point.uncompressed_offset}) lies outside the blob"
        if previous is not None and not (
            previous.compressed_offset < point.compressed_offset
            and previous.uncompressed_offset < point.uncompressed_offset
        ):
            return f"seek point {i} does not follow seek point {i - 1} in both streams"
        previous = point
    return None


def _overlap_problem(index: LayerIndex) -> str | None:
    """Whether two regular files of a tar/gzip/zstd index claim the same bytes of the tar stream."""
    files = sorted(
        (e for e in index.entries if e.type is EntryType.FILE and e.size and not e.chunks),
        key=lambda e: e.data_offset,
    )
    for before, after in itertools.pairwise(files):
        if after.data_offset < before.data_offset + before.size:
            return f"entries {before.path!r} and {after.path!r} claim overlapping data"
    return None
