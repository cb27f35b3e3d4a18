"""Property tests: for any tar layer, reads through the index equal what Python's tarfile extracts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import tarfile
from decimal import Decimal

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.builder import build_index
from index.completion_check import compare_with_blob
from index.errors import IntegrityError, LayerFormatError, MappingMismatch
from index.model import EntryType
from index.reader import LayerReader
from index.tar_entries import normalize_path
from tests.index.conftest import COMPRESSORS, blob_source, make_tar

_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
_COMPONENT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1, max_size=40
).filter(lambda c: c not in (".", ".."))
_NAME = st.lists(_COMPONENT, min_size=1, max_size=5).map("/".join)
_TYPES = {
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.CHAR: tarfile.CHRTYPE,
    EntryType.BLOCK: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}
_KIND_OF = {
    tarfile.REGTYPE: EntryType.FILE,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    **{v: k for k, v in _TYPES.items()},
}


def _content(size: int, seed: int) -> bytes:
    """Half random, half text-like bytes: both stored and Huffman-coded deflate blocks appear."""
    rng = random.Random(seed)
    half = size // 2
    words = [rng.randbytes(rng.randint(1, 12)) for _ in range(50)]
    text = b"".join(rng.choice(words) for _ in range(half // 4 + 1))[:half]
    return rng.randbytes(size - half) + text


@st.composite
def layers(draw: st.DrawFn) -> bytes:
    """A tar in PAX or GNU form with files of 0 to several MiB, all entry types, long and unicode names."""
    names = draw(st.lists(_NAME, min_size=1, max_size=12, unique_by=normalize_path))
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    files: list[str] = []
    large = False  # at most one file of MiBs per layer keeps the suite fast
    for name in names:
        kind = draw(st.sampled_from([EntryType.FILE] * 4 + [*_TYPES, EntryType.HARDLINK]))
        info = tarfile.TarInfo(name)
        info.mode = draw(st.integers(0, 0o7777))
        info.uid, info.gid = draw(st.integers(0, 70000)), draw(st.integers(0, 70000))
        info.uname, info.gname = draw(st.sampled_from(["", "root", "ü" * 3])), "staff"
        info.mtime = draw(st.integers(0, 2**33))
        if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
            info.pax_headers = {
                "mtime": f"{info.mtime}.{draw(st.integers(0, 999_999_999)):09d}",
                "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\udcff",
                "SCHILY.xattr.user.note": draw(st.text(max_size=20)),
            }
        data = None
        if kind is EntryType.FILE:
            # Hypothesis favours small numbers: pick the size class first so MiB-sized files really occur.
            size_class = draw(st.sampled_from(["edge", "small", "medium"] + ["large"] * (not large)))
            large = large or size_class == "large"
            size = draw(
                {
                    "edge": st.sampled_from([0, 1, 511, 512, 513, 4097]),
                    "small": st.integers(0, 20_000),
                    "medium": st.integers(20_000, 400_000),
                    "large": st.integers(1 << 20, 3 << 20),
                }[size_class]
            )
            data = _content(size, draw(st.integers(0, 2**32)))
            info.size = len(data)
            files.append(name)
        elif kind is EntryType.HARDLINK and files:
            info.type, info.linkname = tarfile.LNKTYPE, draw(st.sampled_from(files))
        elif kind is EntryType.SYMLINK:
            info.type, info.linkname = tarfile.SYMTYPE, draw(_NAME)
        else:
            info.type = _TYPES.get(kind, tarfile.DIRTYPE)
            info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 4095))
        members.append((info, data))
    return make_tar(members, fmt)


def _chunked(blob: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(blob):
        step = sizes[i % len(sizes)]
        out.append(blob[pos : pos + step])
        pos, i = pos + step, i + 1
    return out


@_SETTINGS
@given(
    tar=layers(),
    compression=st.sampled_from(sorted(COMPRESSORS)),
    spacing=st.sampled_from([16 << 10, 256 << 10, 1 << 20]),
    chunk_sizes=st.lists(st.integers(1, 200_000), min_size=1, max_size=8),
    data=st.data(),
)
def test_reads_through_index_equal_tarfile(
    tar: bytes, compression: str, spacing: int, chunk_sizes: list[int], data: st.DataObject
) -> None:
    """Every entry's metadata and every random read (each file's first one checking its header) through the index
    match tarfile; DiffID is sha256 of the tar; the completion check finds no difference."""
    fmt, compress = COMPRESSORS[compression]
    blob = compress(tar)
    index = build_index("test", fmt, _chunked(blob, chunk_sizes), gzip_spacing=spacing)
    assert index == build_index("test", fmt, [blob], gzip_spacing=spacing)
    assert compare_with_blob(index, _chunked(blob, chunk_sizes)) == []
    assert index.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert index.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert index.uncompressed_size == len(tar)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        members = archive.getmembers()
        assert len(members) == len(index.entries)
        reads = []
        for member, entry in zip(members, index.entries, strict=True):
            _check_metadata(member, entry)
            if entry.type is EntryType.FILE:
                content = archive.extractfile(member).read()  # type: ignore[union-attr]
                offset = data.draw(st.integers(0, entry.size + 10))
                length = data.draw(st.integers(0, entry.size + 10))
                reads += [
                    (entry, 0, entry.size, content),
                    (entry, offset, length, content[offset : offset + length]),
                ]

    async def check() -> None:
        reader = LayerReader(
            index, blob_source(blob), decoded_cache_bytes=data.draw(st.sampled_from([0, 8 << 20]))
        )
        for entry, offset, length, expected in reads:
            assert await reader.read(entry, offset, length) == expected

    trio.run(check)


def _check_metadata(member: tarfile.TarInfo, entry: object) -> None:
    from index.model import Entry

    assert isinstance(entry, Entry)
    assert entry.path == normalize_path(member.name)
    assert entry.type is _KIND_OF[member.type]
    assert entry.mode == member.mode
    assert (entry.uid, entry.gid, entry.uname, entry.gname) == (
        member.uid,
        member.gid,
        member.uname,
        member.gname,
    )
    if "mtime" in member.pax_headers:
        assert entry.mtime_ns == int(Decimal(member.pax_headers["mtime"]).scaleb(9))
    else:
        assert entry.mtime_ns == int(member.mtime) * 10**9
    if member.isfile():
        assert entry.size == member.size and entry.data_offset == member.offset_data
    if member.issym():
        assert entry.link_target == member.linkname
    if member.islnk():
        assert entry.link_target == normalize_path(member.linkname)
    if member.ischr() or member.isblk():
        assert (entry.devmajor, entry.devminor) == (member.devmajor, member.devminor)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            assert entry.xattrs[key.removeprefix("SCHILY.xattr.")] == value.encode("utf-8", "surrogateescape")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    tar=layers(),
    compression=st.sampled_from(sorted(COMPRESSORS)),
    damage=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.none() | st.floats(0, 1),
)
def test_damaged_blobs_fail_cleanly(
    tar: bytes, compression: str, damage: list[tuple[float, int]], cut: float | None
) -> None:
    """Flipped bytes or truncation anywhere end in LayerFormatError/IntegrityError, never another exception."""
    fmt, compress = COMPRESSORS[compression]
    original = compress(tar)  # once: gzip headers carry the current time
    blob = bytearray(original)
    for where, xor in damage:
        blob[min(int(where * len(blob)), len(blob) - 1)] ^= xor
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    try:
        build_index("test", fmt, [bytes(blob)])
    except (LayerFormatError, IntegrityError):
        pass
    try:
        build_index("test", fmt, [bytes(blob)], digest="sha256:" + hashlib.sha256(original).hexdigest())
    except (LayerFormatError, IntegrityError) as exc:
        assert "sha256:" in str(exc)  # names the layer
    else:
        assert bytes(blob) == original  # a damaged blob never passes the digest check


_LIES = {
    "mode": lambda e, other: {"mode": e.mode ^ 0o4000},
    "uid": lambda e, other: {"uid": e.uid + 1},
    "size": lambda e, other: {"size": e.size + 1},
    "data": lambda e, other: {"data_offset": other.data_offset, "header_offset": other.header_offset},
}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    tar=layers(),
    compression=st.sampled_from(sorted(COMPRESSORS)),
    lie=st.sampled_from(sorted(_LIES)),
    pick=st.tuples(st.integers(0, 1000), st.integers(1, 1000)),
)
def test_any_lie_about_a_file_is_caught_at_its_first_read_and_at_completion(
    tar: bytes, compression: str, lie: str, pick: tuple[int, int]
) -> None:
    """A file given another mode, owner, size or another file's bytes fails its first read and is reported at completion."""
    fmt, compress = COMPRESSORS[compression]
    blob = compress(tar)
    index = build_index("test", fmt, [blob])
    files = [e for e in index.entries if e.type is EntryType.FILE and e.size > 0]
    if len(files) < 2:
        return
    target = files[pick[0] % len(files)]
    other = files[(pick[0] + pick[1] % (len(files) - 1) + 1) % len(files)]  # any file but the target
    liar = dataclasses.replace(target, **_LIES[lie](target, other))  # type: ignore[arg-type]
    entries = [liar if e is target else e for e in index.entries]
    assert compare_with_blob(dataclasses.replace(index, entries=entries), [blob]) != []

    async def first_read() -> None:
        with pytest.raises(MappingMismatch):
            await LayerReader(index, blob_source(blob)).read(liar, 0, liar.size)

    trio.run(first_read)
