"""zstd frame walking: decompress a blob pushed in pieces and record where each frame starts.

A zstd frame is the only place a decoder can start (libzstd cannot export its state inside
a frame), so every frame start is a seek point. Skippable frames (seekable-format seek
tables, zstd:chunked metadata) are stepped over. A single-frame blob therefore has one seek
point at 0: readable, but only from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zstandard

from index.errors import LayerFormatError, TruncatedLayer
from index.model import SeekPoint

_FRAME_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
# Input is handed to libzstd in slices of this size because python-zstandard's decompressobj
# has no output limit: a slice expands to at most ~32768x its size (RLE blocks), so 16 KiB
# bounds one call at ~512 MiB even for a hostile blob, while costing ~10k calls per 150 MB.
_SLICE = 16 << 10


class ZstdScanner:
    """Decompresses zstd frames pushed in pieces, handing out the output and recording frame starts.

    With ``start`` (a frame-start seek point) it decodes a blob piece that begins there.
    """

    def __init__(self, on_output: Callable[[bytes], None], *, start: SeekPoint | None = None) -> None:
        self._on_output = on_output
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj: Any = None  # the decompressobj of the frame being decoded
        self._buf = b""  # the start of a frame header, not yet accounted in compressed_pos
        self._skip = 0  # bytes of a skippable frame still to pass over
        self.points: list[SeekPoint] = []
        self.frames = 0
        self.compressed_pos = start.compressed_offset if start else 0
        self.uncompressed_pos = start.uncompressed_offset if start else 0

    def feed(self, data: bytes) -> None:
        """Consume the next piece of the blob; raises LayerFormatError on corrupt data."""
        for pos in range(0, len(data), _SLICE):
            piece = data[pos : pos + _SLICE]
            while piece:
                piece = self._step(piece)

    def finish(self) -> None:
        """Check that the blob ended after a complete frame; raises TruncatedLayer otherwise."""
        if self._dobj is not None or self._buf or self._skip or not self.frames:
            raise TruncatedLayer(
                f"zstd stream ends inside frame {self.frames + 1} at compressed byte {self.compressed_pos}"
            )

    def _step(self, data: bytes) -> bytes:
        if self._skip:
            step = min(self._skip, len(data))
            self._skip -= step
            self.compressed_pos += step
            return data[step:]
        if self._dobj is None:
            return self._frame_header(data)
        try:
            out = self._dobj.decompress(data)
        except zstandard.ZstdError as exc:
            raise LayerFormatError(f"corrupt zstd frame {self.frames + 1}: {exc}") from None
        if out:
            self.uncompressed_pos += len(out)
            self._on_output(out)
        if not self._dobj.eof:
            self.compressed_pos += len(data)
            return b""
        rest: bytes = self._dobj.unused_data
        self.compressed_pos += len(data) - len(rest)
        self._dobj = None
        self.frames += 1
        return rest

    def _frame_header(self, data: bytes) -> bytes:
        buf = self._buf + data
        if len(buf) < 8:
            self._buf = buf
            return b""
        self._buf = b""
        magic = int.from_bytes(buf[:4], "little")
        if magic == _FRAME_MAGIC:
            self.points.append(SeekPoint(self.compressed_pos, self.uncompressed_pos))
            self._dobj = self._dctx.decompressobj()
            return buf
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            self._skip = int.from_bytes(buf[4:8], "little")
            self.compressed_pos += 8
            return buf[8:]
        raise LayerFormatError(
            f"no zstd frame at compressed byte {self.compressed_pos} (magic {magic:#010x})"
        )
