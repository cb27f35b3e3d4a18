"""gzip checkpoints: found in one streaming pass, and decompression resumes exactly at each of them."""

from __future__ import annotations

import gzip
import itertools
import os
import random
import zlib

import pytest

from index.errors import LayerFormatError, TruncatedLayer
from index.gzip_seek import GzipScanner, gzip_header_length
from tests.index.conftest import gzip_members


def mixed_data(size: int, seed: int = 0) -> bytes:
    """Random (stored blocks) and repetitive (Huffman blocks) bytes interleaved."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < size:
        part = (
            rng.randbytes(rng.randint(100, 40_000))
            if rng.random() < 0.3
            else b"lazy snap " * rng.randint(10, 5000)
        )
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def scan(blob: bytes, spacing: int, piece: int = 65536) -> tuple[GzipScanner, bytes]:
    """Run a building scanner over ``blob`` fed in pieces; return it and its output."""
    out: list[bytes] = []
    scanner = GzipScanner(out.append, spacing=spacing)
    for i in range(0, len(blob), piece):
        scanner.feed(blob[i : i + piece])
    scanner.finish()
    return scanner, b"".join(out)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_resume_at_every_checkpoint(level: int) -> None:
    """Decompression restarted at any checkpoint, byte-aligned or not, yields the original bytes from there."""
    data = mixed_data(3 << 20)
    blob = gzip.compress(data, level)
    scanner, out = scan(blob, 64 << 10)
    assert out == data
    assert len({p.bits for p in scanner.points}) > 4  # most checkpoints are not byte-aligned
    for point in scanner.points:
        got: list[bytes] = []
        resumed = GzipScanner(got.append, start=point)
        resumed.feed(blob[point.compressed_offset : point.compressed_offset + 200_000])
        result = b"".join(got)
        assert result and result == data[point.uncompressed_offset : point.uncompressed_offset + len(result)]


def test_checkpoints_are_spaced_and_windows_bounded() -> None:
    """Checkpoints are at least `spacing` output bytes apart and carry at most 32 KiB of window."""
    data = mixed_data(2 << 20, seed=3)
    scanner, _ = scan(gzip.compress(data), 256 << 10, piece=1000)
    offsets = [p.uncompressed_offset for p in scanner.points]
    assert offsets[0] == 0 and all(b - a >= 256 << 10 for a, b in itertools.pairwise(offsets))
    assert all(len(p.window) <= 32768 and 0 <= p.bits <= 7 for p in scanner.points)


def test_multi_member_blobs_cross_member_boundaries() -> None:
    """Concatenated members (eStargz-style) inflate as one stream; member starts are free checkpoints."""
    data = mixed_data(1 << 20, seed=5)
    blob = gzip_members(data, 100_000)
    scanner, out = scan(blob, 150_000, piece=777)
    assert out == data and scanner.members == 11
    assert any(p.window == b"" and p.uncompressed_offset % 100_000 == 0 for p in scanner.points[1:])
    point = scanner.points[1]
    got: list[bytes] = []
    GzipScanner(got.append, start=point).feed(blob[point.compressed_offset :])
    assert b"".join(got) == data[point.uncompressed_offset :]


def test_header_fields_are_skipped() -> None:
    """A gzip header with FEXTRA, FNAME, FCOMMENT and FHCRC is parsed, also when split across pieces."""
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = raw.compress(b"hello") + raw.flush()
    header = b"\x1f\x8b\x08\x1e" + bytes(6) + b"\x03\x00abc" + b"name\x00" + b"comment\x00" + b"\x00\x00"
    blob = header + body + zlib.crc32(b"hello").to_bytes(4, "little") + (5).to_bytes(4, "little")
    assert gzip_header_length(header[:-1]) is None and gzip_header_length(header) == len(header)
    assert scan(blob, 1, piece=1)[1] == b"hello"


def test_corrupt_streams_are_rejected() -> None:
    """Bad magic, a flipped data byte, or a wrong CRC raise LayerFormatError."""
    blob = gzip.compress(mixed_data(200_000))
    with pytest.raises(LayerFormatError, match="gzip"):
        scan(b"PK" + blob[2:], 1 << 20)
    bad_crc = blob[:-8] + bytes([blob[-8] ^ 1]) + blob[-7:]
    with pytest.raises(LayerFormatError, match="CRC"):
        scan(bad_crc, 1 << 20)
    flipped = bytearray(blob)
    for i in range(100, len(flipped), 997):
        flipped[i] ^= 0x55
    with pytest.raises(LayerFormatError):
        scan(bytes(flipped), 1 << 20)
    with pytest.raises(LayerFormatError):
        scan(blob + b"garbage!!!!!", 1 << 20)


@pytest.mark.parametrize("cut", [0, 5, 20, -100, -4])
def test_truncated_streams_are_rejected(cut: int) -> None:
    """A blob cut anywhere (header, deflate data, trailer) raises TruncatedLayer at finish."""
    blob = gzip.compress(os.urandom(50_000))
    with pytest.raises(TruncatedLayer):
        scan(blob[:cut], 1 << 20)


def test_trimmed_windows_resume_identically() -> None:
    """A window with its unreferenced bytes zeroed resumes exactly like the full one and compresses far better."""
    from index.gzip_seek import minimize_window

    data = mixed_data(3 << 20, seed=11)
    blob = gzip.compress(data)
    scanner, _ = scan(blob, 128 << 10)
    full = trimmed = 0
    for point in scanner.points[1:]:
        window = minimize_window(point, blob[point.compressed_offset : point.compressed_offset + 100_000])
        assert len(window) == len(point.window)
        got: list[bytes] = []
        resumed = GzipScanner(
            got.append,
            start=type(point)(point.compressed_offset, point.uncompressed_offset, point.bits, window),
        )
        resumed.feed(blob[point.compressed_offset : point.compressed_offset + 300_000])
        result = b"".join(got)
        assert result == data[point.uncompressed_offset : point.uncompressed_offset + len(result)]
        full += len(zlib.compress(point.window))
        trimmed += len(zlib.compress(window))
    assert trimmed < full / 2
