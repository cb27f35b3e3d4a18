"""One-pass builders: digests, DiffID, spans, seek points and errors that name the layer."""

from __future__ import annotations

import gc
import gzip
import hashlib
import threading

import pytest
import zstandard

from index.builder import LayerIndexBuilder, build_index
from index.errors import DigestMismatch, LayerFormatError, TruncatedLayer, UnsafePath
from index.model import EntryType, LayerFormat
from tests.index.conftest import COMPRESSORS, file_info, make_tar, other_info

_TEXT = b"".join(b"%d lazy %x snap\n" % (i, i * 7919) for i in range(60_000))
TAR = make_tar([other_info("d", b"5"), file_info("d/a", _TEXT), file_info("d/b", bytes(range(256)) * 4000)])


def sha(data: bytes) -> str:
    """The sha256:... digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_digests_sizes_and_spans(compression: str) -> None:
    """The index records blob digest and size, DiffID, tar size and a sha256 per aligned compressed span."""
    fmt, compress = COMPRESSORS[compression]
    blob = compress(TAR)
    index = build_index("application/x", fmt, [blob], digest=sha(blob), span_size=4096, gzip_spacing=64 << 10)
    assert (index.digest, index.compressed_size, index.diff_id, index.uncompressed_size) == (
        sha(blob),
        len(blob),
        sha(TAR),
        len(TAR),
    )
    assert index.span_digests == [sha(blob[i : i + 4096]) for i in range(0, len(blob), 4096)]
    assert index.media_type == "application/x" and index.format is fmt
    assert [e.path for e in index.entries] == ["d", "d/a", "d/b"]
    if fmt is LayerFormat.GZIP:
        assert len(index.seek_points) >= 5 and index.seek_points[0].uncompressed_offset == 0
    if fmt is LayerFormat.TAR:
        assert index.seek_points == []


def test_estargz_blobs_are_indexed_as_gzip() -> None:
    """An eStargz blob given to the stream builder is indexed as the multi-member gzip it is."""
    index = build_index("m", LayerFormat.ESTARGZ, [gzip.compress(TAR)])
    assert index.format is LayerFormat.GZIP and index.entries[1].type is EntryType.FILE


def test_digest_mismatch_names_the_layer() -> None:
    """A blob that does not hash to the expected digest raises DigestMismatch naming the expected digest."""
    blob = gzip.compress(TAR)
    wrong = "sha256:" + "0" * 64
    builder = LayerIndexBuilder("m", LayerFormat.GZIP, digest=wrong)
    builder.feed(blob)
    with pytest.raises(DigestMismatch, match=wrong) as info:
        builder.finish()
    assert info.value.actual == sha(blob)


def test_truncated_download_is_reported() -> None:
    """A blob cut short raises TruncatedLayer (undigested) or DigestMismatch (digest known)."""
    blob = gzip.compress(TAR)
    with pytest.raises(TruncatedLayer, match="sha256:"):
        build_index("m", LayerFormat.GZIP, [blob[: len(blob) // 2]])
    with pytest.raises(DigestMismatch):
        build_index("m", LayerFormat.GZIP, [blob[: len(blob) // 2]], digest=sha(blob))
    with pytest.raises(TruncatedLayer, match="'d/a'"):
        build_index("m", LayerFormat.TAR, [TAR[:5000]])


def test_format_errors_name_the_layer_and_stick() -> None:
    """A corrupt stream raises LayerFormatError naming the layer from feed(); later calls raise it again."""
    digest = "sha256:" + "ab" * 32
    builder = LayerIndexBuilder("m", LayerFormat.GZIP, digest=digest)
    with pytest.raises(LayerFormatError, match=digest):
        builder.feed(b"this is not gzip at all")
    with pytest.raises(LayerFormatError, match=digest):
        builder.feed(b"more")
    with pytest.raises(LayerFormatError, match=digest):
        builder.finish()


def test_unsafe_hardlink_fails_the_build() -> None:
    """A hardlink to a path not earlier in the layer fails the whole build with UnsafePath."""
    tar = make_tar([other_info("l", b"1", linkname="nowhere")])
    with pytest.raises(UnsafePath, match="'l'"):
        build_index("m", LayerFormat.TAR, [tar])


def test_abandoned_builder_does_not_leak_its_thread() -> None:
    """A builder dropped without finish() stops its hashing thread."""
    before = threading.active_count()
    builder = LayerIndexBuilder("m", LayerFormat.GZIP)
    builder.feed(gzip.compress(TAR)[:1000])
    del builder
    gc.collect()
    for _ in range(100):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.01)
    assert threading.active_count() <= before


def test_bad_parameters_are_refused() -> None:
    """Zero spacing or span size is a ValueError."""
    with pytest.raises(ValueError, match="positive"):
        LayerIndexBuilder("m", LayerFormat.GZIP, gzip_spacing=0)


def test_digest_mismatch_wins_over_format_errors() -> None:
    """When the digest is known, a corrupt blob is reported as DigestMismatch, the root cause."""
    blob = bytearray(make_tar([file_info("a", b"x" * 5000)]))
    blob[0] ^= 1  # breaks the first header's checksum
    with pytest.raises(DigestMismatch):
        build_index("m", LayerFormat.TAR, [bytes(blob)], digest=sha(b"the real blob"))


def test_last_checkpoints_get_trimmed_windows() -> None:
    """Every windowed checkpoint, including those near the end of the blob, has its window trimmed."""
    blob = gzip.compress(TAR)
    index = build_index("m", LayerFormat.GZIP, [blob], gzip_spacing=32 << 10)
    windowed = [p for p in index.seek_points if p.window]
    assert windowed and all(p.window.count(0) > len(p.window) // 4 for p in windowed[-3:])


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_a_decompression_bomb_is_refused_as_it_streams(compress: str) -> None:
    """A small blob inflating past max_uncompressed fails with a LayerFormatError naming the bound."""
    tar = make_tar([file_info("zeros", bytes(8 << 20))])
    blob = gzip.compress(tar, 9) if compress == "gzip" else zstandard.ZstdCompressor().compress(tar)
    fmt = LayerFormat.GZIP if compress == "gzip" else LayerFormat.ZSTD
    builder = LayerIndexBuilder(
        "application/vnd.oci.image.layer.v1.tar+" + compress, fmt, max_uncompressed=1 << 20
    )
    with pytest.raises(LayerFormatError, match="decompression bomb"):
        for offset in range(0, len(blob), 4096):
            builder.feed(blob[offset : offset + 4096])
        builder.finish()
