"""gzip checkpoints: finding them in one streaming pass, and resuming decompression at one.

Python's ``zlib`` module hides deflate block boundaries, so this module drives the system
libz through ``ctypes``: ``inflate(Z_BLOCK)`` stops at every block end and reports the bit
position, ``inflateGetDictionary`` yields the 32 KiB window there, and ``inflatePrime`` plus
``inflateSetDictionary`` restart a raw inflater at a checkpoint, even one that does not start
on a byte boundary. ctypes releases the GIL around each call, so inflating runs in parallel
with hashing threads.

Gzip member headers and trailers are parsed here rather than by libz so that every
checkpoint, including the start of each member of a multi-member blob, resumes a *raw*
deflate stream; ``GzipScanner`` then crosses member boundaries the same way when building
and when reading.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
import zlib
from collections.abc import Callable

from index.errors import LayerFormatError, TruncatedLayer
from index.model import SeekPoint

WINDOW_SIZE = 32768
_OUT_SIZE = 256 << 10  # output buffer per inflate call: large enough that call overhead is noise

_Z_OK, _Z_STREAM_END, _Z_NEED_DICT, _Z_BUF_ERROR = 0, 1, 2, -5
_Z_NO_FLUSH, _Z_BLOCK = 0, 5
_HEADER, _DEFLATE, _TRAILER, _PRIME = range(4)  # GzipScanner states


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load_libz() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    ptr = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ptr, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [ptr, ctypes.c_int]
    lib.inflateEnd.argtypes = [ptr]
    lib.inflateReset.argtypes = [ptr]
    lib.inflatePrime.argtypes = [ptr, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [ptr, ctypes.c_char_p, ctypes.c_uint]
    lib.inflateGetDictionary.argtypes = [ptr, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint)]
    return lib


_libz = _load_libz()
_VERSION: bytes = _libz.zlibVersion()


class RawInflater:
    """A raw-deflate libz inflater whose input and bit position are visible to Python."""

    def __init__(self, out_size: int = _OUT_SIZE) -> None:
        self._strm = _ZStream()
        self._ref = ctypes.byref(self._strm)
        self.out_size = out_size  # output bytes per inflate call at most
        self._out = ctypes.create_string_buffer(out_size)
        self._out_addr = ctypes.addressof(self._out)
        self._input = b""
        self._input_addr = 0
        rc = _libz.inflateInit2_(self._ref, -15, _VERSION, ctypes.sizeof(_ZStream))
        if rc != _Z_OK:
            raise MemoryError(f"inflateInit2 failed ({rc})")
        # Held here: an inflater kept per thread is freed at interpreter exit, after module globals.
        self._end = _libz.inflateEnd
        self._open = True

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self._end(self._ref)
            self._open = False

    def reset(self) -> None:
        """Start a new raw deflate stream, keeping any unconsumed input."""
        _libz.inflateReset(self._ref)

    def prime(self, nbits: int, value: int) -> None:
        """Insert ``nbits`` low bits of ``value`` ahead of the input (a checkpoint's partial byte)."""
        _libz.inflatePrime(self._ref, nbits, value)

    def set_window(self, window: bytes) -> None:
        """Give the inflater the history that back-references before the checkpoint point into."""
        if window:
            _libz.inflateSetDictionary(self._ref, window, len(window))

    def window(self) -> bytes:
        """Return the current sliding window (up to 32 KiB of the latest output)."""
        buf = ctypes.create_string_buffer(WINDOW_SIZE)
        size = ctypes.c_uint(0)
        _libz.inflateGetDictionary(self._ref, buf, ctypes.byref(size))
        return buf.raw[: size.value]

    def set_input(self, data: bytes) -> None:
        """Replace the pending input by ``data`` (the caller has consumed the rest)."""
        self._input = data  # keeps the buffer alive while libz points into it
        self._input_addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        self._strm.next_in = self._input_addr
        self._strm.avail_in = len(data)

    @property
    def avail_in(self) -> int:
        """How many input bytes libz has not consumed yet."""
        return int(self._strm.avail_in)

    @property
    def data_type(self) -> int:
        """libz's ``data_type``: unused bits of the last byte (+64 in the last block, +128 at a block end)."""
        return int(self._strm.data_type)

    def pending_input(self) -> bytes:
        """Return the input not consumed yet."""
        return self._input[len(self._input) - self.avail_in :]

    def inflate(self, flush: int = _Z_BLOCK, limit: int = 0) -> tuple[bytes, int]:
        """Inflate up to ``limit`` bytes (default and at most ``out_size``); return (output, libz status); raises LayerFormatError on bad data."""
        strm = self._strm
        strm.next_out = self._out_addr
        size = min(limit, self.out_size) if limit > 0 else self.out_size
        strm.avail_out = size
        rc = _libz.inflate(self._ref, flush)
        produced = size - strm.avail_out
        if rc not in (_Z_OK, _Z_STREAM_END, _Z_BUF_ERROR):
            msg = strm.msg.decode("ascii", "replace") if strm.msg else f"error {rc}"
            raise LayerFormatError(f"invalid deflate data: {msg}")
        return ctypes.string_at(self._out_addr, produced), rc


def gzip_header_length(buf: bytes) -> int | None:
    """Return the length of the gzip member header at the start of ``buf``, or None if ``buf`` is too short; raises LayerFormatError."""
    if len(buf) < 10:
        return None
    if buf[0:2] != b"\x1f\x8b" or buf[2] != 8:
        raise LayerFormatError("not a gzip member header (bad magic or method)")
    flags = buf[3]
    if flags & 0xE0:
        raise LayerFormatError("gzip header has reserved flag bits set")
    pos = 10
    if flags & 4:  # FEXTRA
        if len(buf) < pos + 2:
            return None
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: NUL-terminated
        if flags & flag:
            end = buf.find(b"\x00", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & 2:  # FHCRC
        pos += 2
    return pos if len(buf) >= pos else None


class GzipScanner:
    """Inflates a gzip blob pushed in pieces, handing out the output and recording checkpoints.

    Building (``start=None``): the blob starts with a member header; every member's size (and
    CRC, unless ``check_crc=False`` because a blob digest covers it) is checked, and a checkpoint is recorded at a member start or block boundary once
    ``spacing`` output bytes have passed since the previous one (``spacing=0``: none).
    Reading (``start`` a checkpoint, fed blob bytes from ``start.compressed_offset``): resumes
    there; the first member's trailer can't be checked because its start was never seen.
    """

    def __init__(
        self,
        on_output: Callable[[bytes], None],
        *,
        spacing: int = 0,
        start: SeekPoint | None = None,
        check_crc: bool = True,
        out_size: int = _OUT_SIZE,
    ) -> None:
        self._on_output = on_output
        self._check_crc = check_crc
        self._spacing = spacing
        self.points: list[SeekPoint] = []
        self._inf = RawInflater(out_size)
        self._state = _HEADER
        self._buf = b""  # bytes of a header or trailer still being gathered
        self._check_member = start is None
        self._crc = 0
        self._member_out = 0
        self.members = 0  # members inflated completely
        self._start = start
        self.compressed_pos = start.compressed_offset if start else 0  # blob offset of the next byte fed
        self.uncompressed_pos = start.uncompressed_offset if start else 0
        self._last_point = -(1 << 62)
        if start is not None:
            self._state = _PRIME if start.bits else _DEFLATE
            if not start.bits:
                self._inf.set_window(start.window)

    def feed(self, data: bytes) -> None:
        """Consume the next piece of the blob; raises LayerFormatError on corrupt data."""
        while data:
            if self._state == _DEFLATE:
                data = self._inflate(data)
            elif self._state == _PRIME:
                self._prime(data[0])
                data = data[1:]
            else:
                data = self._gather(data)

    def finish(self) -> None:
        """Check that the blob ended after a complete member; raises TruncatedLayer otherwise."""
        if self._state != _HEADER or self._buf or self.members == 0:
            raise TruncatedLayer(
                f"gzip stream ends inside member {self.members + 1} at compressed byte {self.compressed_pos}"
            )

    def _prime(self, first: int) -> None:
        assert self._start is not None
        # The checkpoint starts ``bits`` bits into this byte: hand libz its remaining high bits.
        bits = self._start.bits
        self._inf.prime(8 - bits, first >> bits)
        self._inf.set_window(self._start.window)
        self.compressed_pos += 1
        self._state = _DEFLATE

    def _gather(self, data: bytes) -> bytes:
        """Collect a member header or trailer that may be split across pieces; return the bytes after it."""
        buf = self._buf + data
        if self._state == _TRAILER:
            size: int | None = 8 if len(buf) >= 8 else None
        else:
            size = gzip_header_length(buf)
        if size is None:
            self._buf = buf
            self.compressed_pos += len(data)
            return b""
        self.compressed_pos += size - len(self._buf)
        self._buf = b""
        if self._state == _TRAILER:
            self._check_trailer(buf[:8])
        else:
            self._begin_member()
        return buf[size:]

    def _check_trailer(self, trailer: bytes) -> None:
        self._state = _HEADER
        self.members += 1
        if not self._check_member:
            self._check_member = True  # later members are seen from their start
            return
        crc, isize = struct.unpack("<II", trailer)
        if (self._check_crc and crc != self._crc) or isize != self._member_out & 0xFFFFFFFF:
            raise LayerFormatError(
                f"gzip member {self.members} fails its CRC/size check: the blob is corrupt"
            )

    def _begin_member(self) -> None:
        self._inf.reset()
        self._state = _DEFLATE
        self._crc = 0
        self._member_out = 0
        # A member start is a free checkpoint: no history is needed to resume there.
        self._maybe_point(0, b"")

    def _maybe_point(self, bits_unused: int, window: bytes | None) -> None:
        if not self._spacing or self.uncompressed_pos - self._last_point < self._spacing:
            return
        if window is None:
            window = self._inf.window()
        coff, bits = self.compressed_pos, 0
        if bits_unused:
            coff, bits = coff - 1, 8 - bits_unused
        self.points.append(SeekPoint(coff, self.uncompressed_pos, bits, window))
        self._last_point = self.uncompressed_pos

    def _inflate(self, data: bytes) -> bytes:
        inf = self._inf
        inf.set_input(data)
        while True:
            before = inf.avail_in
            # Stopping at every block boundary costs a Python round trip per block: inflate
            # freely up to one byte short of where the next checkpoint is due (so no block end
            # that may carry it is passed), then block by block until it is taken.
            room = self._last_point + self._spacing - 1 - self.uncompressed_pos if self._spacing else 0
            near = self._spacing and room <= 0
            limit = 0 if near else room
            out, rc = inf.inflate(_Z_BLOCK if near else _Z_NO_FLUSH, limit)
            consumed = before - inf.avail_in
            self.compressed_pos += consumed
            if out:
                self.uncompressed_pos += len(out)
                self._member_out += len(out)
                if self._check_member and self._check_crc:
                    self._crc = zlib.crc32(out, self._crc)
                self._on_output(out)
            if rc == _Z_STREAM_END:
                self._state = _TRAILER
                return inf.pending_input()
            dt = inf.data_type
            # Reaching a block end may take neither input (its bits were buffered) nor output.
            if not out and not consumed and not (near and dt & 128):
                if inf.avail_in:
                    raise LayerFormatError(f"deflate stream stalls at compressed byte {self.compressed_pos}")
                return b""  # libz needs more input
            if near and dt & 128 and not dt & 64:
                self._maybe_point(dt & 7, None)
            if not inf.avail_in and len(out) < (limit or inf.out_size):
                return b""  # all input consumed and no output pending: calling again would only say so


# Probe windows for minimize_window: byte i of probe A is i mod 256 and of probe B is
# A + 1 + i // 256 (mod 256), never equal to A. An output byte copied from window position i
# therefore differs between the two decodes and names i; a literal is the same in both.
_FULL_PROBES = (
    bytes(i & 0xFF for i in range(WINDOW_SIZE)),
    bytes(((i & 0xFF) + 1 + (i >> 8)) & 0xFF for i in range(WINDOW_SIZE)),
)


_probe_inflaters = threading.local()  # one reusable inflater per thread: trimming runs per checkpoint


def _decode_after(point: SeekPoint, window: bytes, following: bytes) -> bytes | None:
    """Decode up to 32 KiB of ``following`` (blob bytes from the checkpoint on) with ``window`` as history.

    Stops early where the member ends (later members never reach back into this window).
    Returns None if the bytes do not decode (the caller then keeps the window as it is).
    """
    inflater: RawInflater | None = getattr(_probe_inflaters, "inflater", None)
    if inflater is None:
        inflater = _probe_inflaters.inflater = RawInflater(WINDOW_SIZE)
    inflater.reset()
    data = following
    if point.bits:
        if not data:
            return None
        # The checkpoint starts ``bits`` bits into its first byte: hand libz the remaining high bits.
        inflater.prime(8 - point.bits, data[0] >> point.bits)
        data = data[1:]
    inflater.set_window(window)
    inflater.set_input(data)
    try:
        out, _ = inflater.inflate(_Z_NO_FLUSH, WINDOW_SIZE)
    except LayerFormatError:
        return None
    return out


def minimize_window(point: SeekPoint, following: bytes) -> bytes:
    """Return ``point.window`` with every byte the stream after the point never references set to zero.

    ``following`` are the blob bytes from ``point.compressed_offset`` on, enough to decode at
    least 32 KiB past the point (or to the end of the blob); no later output can reach back
    into the window. The zeroed window resumes decompression exactly like the original and
    compresses several times smaller, which is what keeps a stored index small.

    Why this is exact: deflate's bit stream decodes to the same literals, lengths and
    distances whatever the history holds, so two decodes with different probe windows differ
    exactly in the bytes copied (directly or through earlier copies) from the window, and
    those bytes name their source position. Returns the window unchanged if the probes
    disagree in length (never expected); raises nothing.
    """
    import numpy as np  # here, not at module level: importing numpy costs every CLI start 0.1 s

    window = point.window
    n = len(window)
    if not n:
        return window
    probes = _FULL_PROBES if n == WINDOW_SIZE else tuple(p[-n:] for p in _FULL_PROBES)
    first, second = (_decode_after(point, probe, following) for probe in probes)
    if first is None or second is None or len(first) != len(second):
        return window
    size = len(first)
    a = np.frombuffer(first, np.uint8, size)
    b = np.frombuffer(second, np.uint8, size)
    copied = a != b
    a, b = a[copied], b[copied]
    high = (b - a - 1).astype(np.uint8)  # wraps mod 256, undoing the probe's construction
    # Probe positions count from the start of the full 32 KiB probe; shift to this window.
    used = (a.astype(np.int32) | (high.astype(np.int32) << 8)) - (WINDOW_SIZE - n)
    minimized = np.zeros(n, np.uint8)
    source = np.frombuffer(window, np.uint8)
    minimized[used] = source[used]
    return minimized.tobytes()


class WindowTrimmer:
    """Collects, for each new checkpoint, the blob bytes after it until 32 KiB of output have passed.

    The builder calls ``observe`` after each fed piece; each returned job (point index, point,
    following bytes) is ready for ``minimize_window``. ``flush`` returns the jobs of the last
    checkpoints at the end of the blob. Memory: about 32 KiB plus one piece per open checkpoint.
    """

    def __init__(self) -> None:
        self._open: list[tuple[int, SeekPoint, list[bytes]]] = []
        self._seen = 0
        self._last_byte = b""

    def observe(
        self, points: list[SeekPoint], piece: bytes, piece_start: int, output_pos: int
    ) -> list[tuple[int, SeekPoint, bytes]]:
        """Account for ``piece`` (blob bytes from ``piece_start``) after the scanner has consumed it."""
        for parts in (p for _, _, p in self._open):
            parts.append(piece)
        for i in range(self._seen, len(points)):
            point = points[i]
            if not point.window:
                continue  # a member start needs no history
            # A checkpoint inside a byte may start in the last byte of the previous piece.
            prefix = self._last_byte if point.compressed_offset < piece_start else b""
            self._open.append((i, point, [prefix + piece[max(0, point.compressed_offset - piece_start) :]]))
        self._seen = len(points)
        self._last_byte = piece[-1:]
        ready = [
            (i, p, b"".join(parts))
            for i, p, parts in self._open
            if output_pos >= p.uncompressed_offset + WINDOW_SIZE
        ]
        self._open = [job for job in self._open if output_pos < job[1].uncompressed_offset + WINDOW_SIZE]
        return ready

    def flush(self) -> list[tuple[int, SeekPoint, bytes]]:
        """Return the jobs still open at the end of the blob."""
        ready = [(i, p, b"".join(parts)) for i, p, parts in self._open]
        self._open = []
        return ready
