"""zstd frame walking: every frame start is a seek point, skippable frames are stepped over."""

from __future__ import annotations

import os

import pytest
import zstandard

from index.errors import LayerFormatError, TruncatedLayer
from index.zstd_frames import ZstdScanner
from tests.index.conftest import zstd_frames


def scan(blob: bytes, piece: int = 4096) -> tuple[ZstdScanner, bytes]:
    """Run a scanner over ``blob`` fed in pieces; return it and its output."""
    out: list[bytes] = []
    scanner = ZstdScanner(out.append)
    for i in range(0, len(blob), piece):
        scanner.feed(blob[i : i + piece])
    scanner.finish()
    return scanner, b"".join(out)


def skippable(payload: bytes) -> bytes:
    """A skippable frame (as seekable-format seek tables are stored)."""
    return (0x184D2A5E).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


def test_frame_starts_are_seek_points() -> None:
    """A multi-frame blob yields one seek point per frame, and decoding from any of them continues correctly."""
    data = os.urandom(100_000) + b"z" * 500_000
    blob = zstd_frames(data, 64 << 10)
    for piece in (1, 1000, len(blob)):
        scanner, out = scan(blob, piece)
        assert out == data and scanner.frames == len(scanner.points) == 10
    for point in scanner.points:
        got: list[bytes] = []
        ZstdScanner(got.append, start=point).feed(blob[point.compressed_offset :])
        assert b"".join(got) == data[point.uncompressed_offset :]


def test_skippable_frames_are_stepped_over() -> None:
    """Skippable frames before, between and after data frames produce no output and no seek point."""
    comp = zstandard.ZstdCompressor()
    blob = (
        skippable(b"meta")
        + comp.compress(b"a" * 1000)
        + skippable(b"")
        + comp.compress(b"b")
        + skippable(b"x" * 99)
    )
    scanner, out = scan(blob, 3)
    assert out == b"a" * 1000 + b"b"
    assert [p.uncompressed_offset for p in scanner.points] == [0, 1000]
    assert scanner.points[0].compressed_offset == 12


def test_single_frame_has_one_seek_point() -> None:
    """Plain `zstd` output is one frame, hence one seek point at 0."""
    scanner, _ = scan(zstandard.ZstdCompressor().compress(os.urandom(300_000)))
    assert [(p.compressed_offset, p.uncompressed_offset) for p in scanner.points] == [(0, 0)]


def test_corrupt_and_truncated_streams_are_rejected() -> None:
    """Garbage raises LayerFormatError; a blob cut inside a frame (or empty) raises TruncatedLayer."""
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(100_000))
    with pytest.raises(LayerFormatError, match="no zstd frame"):
        scan(b"\x1f\x8b\x08\x00" + blob)
    with pytest.raises(LayerFormatError, match="corrupt"):
        scan(blob[:-4] + bytes(4))
    for cut in (0, 3, 50, len(blob) - 1):
        with pytest.raises(TruncatedLayer):
            scan(blob[:cut])
