"""The stored index: exact round trip, fast load, and clear rejection of other versions and corruption."""

from __future__ import annotations

import gc
import gzip
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest

from index.builder import build_index
from index.errors import IndexVersionError, LayerFormatError
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint
from index.serialize import dump_index, load_index, load_index_file, save_index
from tests.index.conftest import file_info, make_tar


def sample_index(n: int = 50) -> LayerIndex:
    """An index touching every field: xattrs, chunks, devices, windows, unicode names."""
    entries = [
        Entry(
            f"dir/ü{i}",
            EntryType.FILE,
            0o4755,
            i,
            2,
            "root",
            "wheel",
            i * 10,
            i * 10**9 + 7,
            "",
            {},
            0,
            0,
            i * 512,
            (),
            i * 512 - 512,
        )
        for i in range(n)
    ]
    entries += [
        Entry(
            "cap",
            EntryType.FILE,
            xattrs={"security.capability": b"\x01\x00\xff", "user.x": b""},
            size=5,
            data_offset=9,
        ),
        Entry("dev", EntryType.CHAR, devmajor=1, devminor=3),
        Entry("link", EntryType.HARDLINK, link_target="cap"),
        Entry(
            "chunked",
            EntryType.FILE,
            size=8,
            chunks=(Chunk(0, 4, 100, 200, 0, "sha256:aa"), Chunk(4, 4, 100, 200, 4, "")),
            header_offset=1536,
            header_member=40,
        ),
    ]
    points = [SeekPoint(10, 0), SeekPoint(5000, 1 << 20, 3, bytes(range(256)) * 128)]
    return LayerIndex(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        LayerFormat.GZIP,
        "sha256:" + "1" * 64,
        123456,
        "sha256:" + "2" * 64,
        99_999_999,
        entries,
        points,
        65536,
        ["sha256:" + "3" * 64, "sha256:" + "4" * 64],
        "",
    )


def test_round_trip_is_exact() -> None:
    """load_index(dump_index(x)) == x for every field, including raw windows and xattr bytes."""
    index = sample_index()
    assert load_index(dump_index(index)) == index
    built = build_index("m", LayerFormat.GZIP, [gzip.compress(make_tar([file_info("a", b"abc" * 100_000)]))])
    assert load_index(dump_index(built)) == built


def test_save_is_atomic_and_loads_back(tmp_path: Path) -> None:
    """save_index leaves only the final file (no temp files) and load_index_file reads it back."""
    path = tmp_path / "layer.idx"
    save_index(path, sample_index())
    save_index(path, sample_index(3))
    assert load_index_file(path) == sample_index(3)
    assert [p.name for p in tmp_path.iterdir()] == ["layer.idx"]


@pytest.mark.parametrize("version", [2, 99])
def test_other_version_is_rejected(version: int) -> None:
    """An index with another format version (2: from before header offsets) raises IndexVersionError telling to rebuild."""
    data = bytearray(dump_index(sample_index()))
    struct.pack_into("<H", data, 8, version)
    with pytest.raises(IndexVersionError, match="rebuild"):
        load_index(bytes(data))


@pytest.mark.parametrize("where", [0, 20, 60, -1])
def test_corruption_is_rejected(where: int) -> None:
    """A flipped byte anywhere (magic, header, body) or a truncated file raises LayerFormatError."""
    data = bytearray(dump_index(sample_index()))
    data[where] ^= 0x40
    with pytest.raises(LayerFormatError):
        load_index(bytes(data))
    with pytest.raises(LayerFormatError):
        load_index(dump_index(sample_index())[:-10])
    with pytest.raises(LayerFormatError):
        load_index(b"")


def python_calls(fn: Callable[[], object]) -> int:
    """How many Python-level function calls ``fn()`` makes (C calls are not counted): a measure of work that is the same on every run."""
    calls = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    # Garbage left by earlier tests (finalizers, __del__) must not run, and count, in the middle.
    gc.collect()
    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls - 1  # fn itself


def test_loading_runs_no_python_code_per_entry_beyond_its_constructor() -> None:
    """Loading 10,000 more entries costs exactly 10,000 more Python calls (each Entry's __init__; the limits are checked column by column), and a fixed few besides."""
    small, large = (dump_index(sample_index(n)) for n in (10_000, 20_000))
    small_calls = python_calls(lambda: load_index(small))
    large_calls = python_calls(lambda: load_index(large))
    assert large_calls - small_calls == 10_000
    assert small_calls <= 10_000 + 100


def test_oversized_window_is_rejected() -> None:
    """A (checksummed but hostile) index whose window would inflate past 32 KiB is a LayerFormatError."""
    index = sample_index(1)
    index.seek_points = [SeekPoint(0, 0, 0, b"\x00" * 40_000)]
    with pytest.raises(LayerFormatError, match="malformed"):
        load_index(dump_index(index))
