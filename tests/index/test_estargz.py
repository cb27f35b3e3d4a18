"""eStargz footer and TOC reading, against blobs written by tests/support/estargz_writer.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.errors import DigestMismatch, LayerFormatError, UnsafePath
from index.estargz import (
    EstargzError,
    _normalize,
    is_estargz,
    parse_footer,
    parse_modtime,
    read_estargz,
    read_estargz_index,
    speculative_tail_for,
)
from index.model import Entry, EntryType, LayerFormat, LayerIndex
from index.tar_entries import normalize_path
from tests.support.estargz_writer import (
    EstargzBlob,
    build_estargz,
    footer,
    gzip_member,
)
from tests.support.image_builder import (
    TarEntry,
    block_device,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    symlink,
    whiteout,
)

MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


class CountingSource:
    """An in-memory blob that records every range read."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.calls: list[tuple[int, int]] = []

    async def __call__(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(self.blob), (offset, length)
        self.calls.append((offset, length))
        return self.blob[offset : offset + length]


def sample_entries() -> list[TarEntry]:
    big = hashlib.sha256(b"seed").digest() * (300_000 // 32)  # ~300 KB, several 64 KiB chunks
    return [
        directory("./"),
        directory("./etc/", uid=1, gid=2, uname="bin", gname="daemon"),
        file("etc/hosts", b"127.0.0.1 localhost\n", mtime=1_700_000_000),
        file("usr/bin/tool", big, mode=0o4755),
        symlink("usr/bin/alias", "tool"),
        hardlink("usr/bin/hard", "./usr/bin/tool"),
        file("empty"),
        char_device("dev/null", 1, 3),
        block_device("dev/sda", 8, 0),
        fifo("run/pipe"),
        file("cap", b"x", xattrs={"security.capability": b"\x01\x00\x00\x02\x00\x20"}),
        whiteout("etc/gone"),
    ]


async def index_of(blob: EstargzBlob, **kwargs: object) -> tuple[list[Entry], CountingSource]:
    source = CountingSource(blob.blob)
    layer = await read_estargz(source, len(blob.blob), digest=blob.digest, media_type=MEDIA_TYPE, **kwargs)  # type: ignore[arg-type]
    return layer.index.entries, source


def file_bytes(blob: bytes, entry: Entry) -> bytes:
    """A file's content from its chunks (decompressed here with gzip), each checked against its digest."""
    out = b""
    for chunk in entry.chunks:
        member = gzip.decompress(blob[chunk.blob_offset : chunk.blob_end])
        piece = member[chunk.inner_offset : chunk.inner_offset + chunk.size]
        assert "sha256:" + hashlib.sha256(piece).hexdigest() == chunk.digest
        out += piece
    return out


class TestFooter:
    """The footer gives the TOC offset, in both its forms."""

    @pytest.mark.parametrize("legacy", [False, True])
    def test_both_forms(self, legacy: bool) -> None:
        """A 51-byte and a 47-byte footer both give their offset, also after other bytes."""
        data = footer(0x1234_5678_9A, legacy=legacy)
        assert len(data) == (47 if legacy else 51)
        assert parse_footer(data) == 0x1234_5678_9A
        assert parse_footer(b"junk" * 20 + data) == 0x1234_5678_9A
        assert is_estargz(b"junk" + data)

    def test_footer_is_an_empty_gzip_member(self) -> None:
        """The writer's footer is valid gzip that decompresses to nothing (the format's promise)."""
        assert gzip.decompress(footer(99)) == b""

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"\0" * 51,
            gzip_member(b""),
            gzip_member(b"x" * 100),
            footer(5).replace(b"STARGZ", b"STARGX"),
            footer(5).replace(b"SG", b"XG"),
            footer(5).replace(b"0000000000000005", b"00000000000000z5"),
            footer(5)[:-1],
            footer(5, legacy=True)[1:],
        ],
    )
    def test_garbage_is_rejected(self, data: bytes) -> None:
        """Anything but a well-formed footer raises EstargzError (a LayerFormatError)."""
        with pytest.raises(LayerFormatError):
            parse_footer(data)
        assert not is_estargz(data)


class TestToc:
    """The TOC becomes the layer's entries, with chunks that locate every file byte."""

    async def test_entries(self) -> None:
        """Every entry type and attribute comes through, paths normalized."""
        blob = build_estargz(sample_entries(), chunk_size=64 << 10)
        entries, _ = await index_of(blob, toc_digest=blob.toc_digest)
        by_path = {e.path: e for e in entries}
        assert [e.path for e in entries] == [
            "",
            "etc",
            "etc/hosts",
            "usr/bin/tool",
            "usr/bin/alias",
            "usr/bin/hard",
            "empty",
            "dev/null",
            "dev/sda",
            "run/pipe",
            "cap",
            "etc/.wh.gone",
        ]
        assert by_path["etc"].type is EntryType.DIR
        assert (by_path["etc"].uid, by_path["etc"].gid) == (1, 2)
        assert (by_path["etc"].uname, by_path["etc"].gname) == ("bin", "daemon")
        assert by_path["etc/hosts"].mtime_ns == 1_700_000_000 * 10**9
        assert by_path["usr/bin/tool"].mode == 0o4755
        assert by_path["usr/bin/alias"].type is EntryType.SYMLINK
        assert by_path["usr/bin/alias"].link_target == "tool"
        assert by_path["usr/bin/hard"].type is EntryType.HARDLINK
        assert by_path["usr/bin/hard"].link_target == "usr/bin/tool"
        assert (by_path["dev/null"].type, by_path["dev/null"].devmajor, by_path["dev/null"].devminor) == (
            EntryType.CHAR,
            1,
            3,
        )
        assert by_path["dev/sda"].type is EntryType.BLOCK
        assert by_path["run/pipe"].type is EntryType.FIFO
        assert by_path["cap"].xattrs == {"security.capability": b"\x01\x00\x00\x02\x00\x20"}
        assert by_path["empty"].size == 0 and by_path["empty"].chunks == ()

    async def test_chunks_give_the_file_bytes(self) -> None:
        """Each file's chunks are contiguous, bounded by the next member, and hold its bytes."""
        source = sample_entries()
        blob = build_estargz(source, chunk_size=64 << 10)
        entries, _ = await index_of(blob)
        tool = next(e for e in entries if e.path == "usr/bin/tool")
        assert len(tool.chunks) == 5
        assert [c.file_offset for c in tool.chunks] == [i * (64 << 10) for i in range(5)]
        assert all(a.blob_end == b.blob_offset for a, b in zip(tool.chunks, tool.chunks[1:], strict=False))
        for entry in source:
            if entry.kind == "file" and entry.content:
                indexed = next(e for e in entries if e.path == normalize_path(entry.path))
                assert indexed.size == len(entry.content)
                assert file_bytes(blob.blob, indexed) == entry.content
                assert all(c.digest.startswith("sha256:") for c in indexed.chunks)

    async def test_inner_offsets(self) -> None:
        """Small files sharing one gzip member are found by their inner offsets."""
        files = [file(f"f{i}", bytes([i]) * (100 + i)) for i in range(20)]
        blob = build_estargz(files, min_chunk_size=4096)
        entries, _ = await index_of(blob)
        assert any(c.inner_offset > 0 for e in entries for c in e.chunks)
        for source, entry in zip(files, entries, strict=True):
            assert file_bytes(blob.blob, entry) == source.content

    async def test_index_fields(self) -> None:
        """The LayerIndex carries the format, digest, size and the verified TOC digest."""
        blob = build_estargz(sample_entries())
        source = CountingSource(blob.blob)
        index = await read_estargz_index(
            source, len(blob.blob), digest=blob.digest, media_type=MEDIA_TYPE, toc_digest=blob.toc_digest
        )
        assert index.format is LayerFormat.ESTARGZ
        assert (index.digest, index.compressed_size, index.media_type) == (
            blob.digest,
            len(blob.blob),
            MEDIA_TYPE,
        )
        assert index.toc_digest == blob.toc_digest

    async def test_legacy_footer(self) -> None:
        """A blob with the 47-byte footer indexes the same as one with the 51-byte footer."""
        modern, _ = await index_of(build_estargz(sample_entries()))
        legacy, _ = await index_of(build_estargz(sample_entries(), legacy_footer=True))
        assert [(e.path, e.size) for e in legacy] == [(e.path, e.size) for e in modern]

    async def test_the_blob_is_a_plain_tar_gz_too(self) -> None:
        """Sanity check of the writer: gunzip + tar sees the same names, with the TOC last."""
        blob = build_estargz(sample_entries())
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.blob))) as archive:
            names = archive.getnames()
        assert names[-1] == "stargz.index.json"
        assert len(names) == len(sample_entries()) + 1


class TestWithLayerReader:
    """The index drives index.reader: random reads of eStargz files return the right bytes."""

    async def test_random_reads(self) -> None:
        """Reads at chunk boundaries and across them equal the source bytes; a bad chunk is refused."""
        reader_module = pytest.importorskip("index.reader")
        source = sample_entries()
        blob = build_estargz(source, chunk_size=64 << 10, min_chunk_size=1024)
        entries, counting = await index_of(blob)
        reader = reader_module.LayerReader(await _index(blob), counting)
        tool = next(e for e in entries if e.path == "usr/bin/tool")
        data = source[3].content
        for offset, length in [
            (0, 10),
            (65530, 12),
            (64 << 10, 64 << 10),
            (100_000, 1 << 20),
            (len(data) - 3, 9),
        ]:
            assert await reader.read(tool, offset, length) == data[offset : offset + length]
        hosts = next(e for e in entries if e.path == "etc/hosts")
        assert await reader.read(hosts, 0, 100) == source[2].content

        # Chunk 1's member replaced by a valid member of other bytes, same length (nothing shifts).
        corrupt = bytearray(blob.blob)
        start, end = tool.chunks[1].blob_offset, tool.chunks[1].blob_end
        forged = gzip_member(b"\0" * tool.chunks[1].size)
        assert len(forged) <= end - start
        corrupt[start:end] = forged + b"\0" * (end - start - len(forged))
        bad = reader_module.LayerReader(await _index(blob), CountingSource(bytes(corrupt)))
        with pytest.raises(DigestMismatch):
            await bad.read(tool, 64 << 10, 10)


async def _index(blob: EstargzBlob) -> LayerIndex:
    return await read_estargz_index(
        CountingSource(blob.blob), len(blob.blob), digest=blob.digest, media_type=""
    )


class TestLandmarks:
    """Landmarks are bookkeeping: hidden from the entries, remembered for prefetch."""

    async def test_prefetch_landmark(self) -> None:
        """The entries before .prefetch.landmark are the prioritized ones."""
        blob = build_estargz(sample_entries(), prefetch_count=4)
        layer = await read_estargz(
            CountingSource(blob.blob), len(blob.blob), digest=blob.digest, media_type=""
        )
        paths = [e.path for e in layer.index.entries]
        assert ".prefetch.landmark" not in paths and "stargz.index.json" not in paths
        assert layer.prefetch_count == 4
        tool = layer.index.entries[3]
        assert tool.path == "usr/bin/tool"
        assert 0 < tool.chunks[-1].blob_end <= layer.prefetch_end

    async def test_no_prefetch_landmark(self) -> None:
        """.no.prefetch.landmark means: prefetch nothing."""
        blob = build_estargz(sample_entries(), prefetch_count=0)
        layer = await read_estargz(
            CountingSource(blob.blob), len(blob.blob), digest=blob.digest, media_type=""
        )
        assert layer.prefetch_count == 0
        assert ".no.prefetch.landmark" not in [e.path for e in layer.index.entries]

    async def test_without_landmark(self) -> None:
        """No landmark: prefetch_count is None."""
        blob = build_estargz(sample_entries())
        layer = await read_estargz(
            CountingSource(blob.blob), len(blob.blob), digest=blob.digest, media_type=""
        )
        assert layer.prefetch_count is None


class TestReads:
    """The footer and TOC cost at most two range reads, whatever the TOC's size."""

    async def test_small_layer_one_read(self) -> None:
        """A TOC inside the speculative tail needs exactly one read."""
        blob = build_estargz(sample_entries())
        _, source = await index_of(blob)
        assert len(source.calls) == 1

    def test_default_tail_grows_with_the_blob(self) -> None:
        """The first read is 1/128 of the blob, at least 64 KiB and at most 1 MiB."""
        assert speculative_tail_for(1000) == 64 << 10
        assert speculative_tail_for(70 << 20) == (70 << 20) // 128
        assert speculative_tail_for(10 << 30) == 1 << 20

    async def test_default_tail_one_read_for_a_large_blob(self) -> None:
        """A blob 128 times its TOC's size needs one read with the default tail."""
        files = [file(f"dir/file-{i:05}", b"%d" % i) for i in range(2000)]
        blob = build_estargz(files)
        padded = build_estargz([file("pad", random.Random(3).randbytes(130 * len(blob.blob))), *files])
        entries, source = await index_of(padded)
        assert len(source.calls) == 1
        assert len(entries) == 2001

    @pytest.mark.parametrize("tail", [51, 100, 4096])
    async def test_large_toc_two_reads(self, tail: int) -> None:
        """A TOC larger than the speculative tail needs exactly one more read."""
        files = [file(f"dir/file-{i:05}", b"%d" % i) for i in range(2000)]
        blob = build_estargz(files)
        entries, source = await index_of(blob, speculative_tail=tail)
        assert len(source.calls) == 2
        assert len(entries) == 2000

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=8),
        chunk_size=st.sampled_from([1000, 4096, 65536]),
        tail=st.integers(0, 200_000),
    )
    async def test_any_layout(self, sizes: list[int], chunk_size: int, tail: int) -> None:
        """For any file sizes, chunk size and tail size: at most 2 reads and every byte right."""
        files = [
            file(f"f{i}", (hashlib.sha256(b"%d" % i).digest() * (n // 32 + 1))[:n])
            for i, n in enumerate(sizes)
        ]
        blob = build_estargz(files, chunk_size=chunk_size)
        entries, source = await index_of(blob, speculative_tail=tail, toc_digest=blob.toc_digest)
        assert len(source.calls) <= 2
        for spec, entry in zip(files, entries, strict=True):
            assert file_bytes(blob.blob, entry) == spec.content


class TestBadInput:
    """Bad blobs raise LayerFormatError or DigestMismatch naming the layer."""

    async def test_toc_digest_mismatch(self) -> None:
        """A TOC that does not hash to the annotation is refused."""
        blob = build_estargz(sample_entries())
        with pytest.raises(DigestMismatch, match=blob.digest):
            await index_of(blob, toc_digest="sha256:" + "0" * 64)

    async def test_toc_offset_outside_the_blob(self) -> None:
        """A footer pointing past the blob's end is refused."""
        blob = build_estargz(sample_entries())
        bad = EstargzBlob(blob.blob[:-51] + footer(len(blob.blob) + 10), blob.toc_json, 0, b"")
        with pytest.raises(LayerFormatError, match=bad.digest):
            await index_of(bad)

    async def test_toc_offset_not_at_the_toc(self) -> None:
        """A footer pointing at some other member is refused (the TOC must end at the footer)."""
        blob = build_estargz(sample_entries())
        bad = EstargzBlob(blob.blob[:-51] + footer(0), blob.toc_json, 0, b"")
        with pytest.raises(LayerFormatError, match=bad.digest):
            await index_of(bad)

    async def test_huge_toc(self) -> None:
        """A TOC over the size limit is refused before it is read."""
        blob = build_estargz([file(f"f{i}", b"x") for i in range(500)])
        with pytest.raises(LayerFormatError, match="limit"):
            await index_of(blob, max_toc_size=1000, speculative_tail=51)

    async def test_toc_bomb(self) -> None:
        """A small compressed TOC that inflates beyond the limit is refused."""
        toc = json.dumps({"version": 1, "entries": [], "pad": " " * 2_000_000}).encode()
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        member = gzip_member(info.tobuf() + toc + b"\0" * (-len(toc) % 512 + 1024), level=9)
        raw = EstargzBlob(member + footer(0), toc, 0, b"")
        with pytest.raises(LayerFormatError, match="limit"):
            await index_of(raw, max_toc_size=100_000)

    async def test_chunk_offset_outside(self) -> None:
        """A chunk whose member lies at or after the TOC is refused."""
        await self._expect_bad_toc(lambda e: e[1].update(offset=10**9))

    async def test_chunks_with_a_gap(self) -> None:
        """A file whose chunks do not cover it is refused."""
        await self._expect_bad_toc(lambda e: e[1].update(chunkSize=1000))

    async def test_chunk_without_file(self) -> None:
        """A chunk entry not following its file is refused."""
        await self._expect_bad_toc(lambda e: e.insert(0, {"name": "zz", "type": "chunk", "offset": 0}))

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("mode", "0755"),
            ("uid", -1),
            ("gid", 1 << 32),  # no Linux file can have it
            ("size", True),  # JSON true is not a number
            ("size", "3000"),
            ("offset", [1]),
            ("chunkSize", 1.5),
            ("chunkDigest", 7),
            ("linkName", None),
            ("modtime", 0),
            ("type", ["reg"]),
        ],
    )
    async def test_fields_of_the_wrong_json_type(self, field: str, value: object) -> None:
        """A field of the wrong JSON type (or a negative number) is a clean EstargzError naming the layer."""
        await self._expect_bad_toc(lambda e: e[1].update({field: value}))

    async def test_unknown_type(self) -> None:
        """An unknown entry type is refused."""
        await self._expect_bad_toc(lambda e: e[0].update(type="socket"))

    async def test_file_replacing_root(self) -> None:
        """A non-directory whose path normalizes to the root is refused."""
        await self._expect_bad_toc(
            lambda e: e[0].update(name="../", type="symlink", linkName="x"), UnsafePath
        )

    async def test_hardlink_to_nothing_earlier(self) -> None:
        """A hardlink must name an earlier non-directory entry of the layer."""
        await self._expect_bad_toc(
            lambda e: e.insert(0, {"name": "h", "type": "hardlink", "linkName": "d/f"}), UnsafePath
        )
        await self._expect_bad_toc(
            lambda e: e.append({"name": "h", "type": "hardlink", "linkName": "d"}), UnsafePath
        )

    async def test_paths_escaping_the_root(self) -> None:
        """Names with .. or a leading slash stay inside the layer root."""
        blob = build_estargz([file("/../../etc/passwd", b"x"), directory("a/../../b")])
        entries, _ = await index_of(blob)
        assert [e.path for e in entries] == ["etc/passwd", "b"]

    async def test_not_estargz(self) -> None:
        """A plain gzip layer has no footer: a LayerFormatError that says so."""
        data = gzip_member(hashlib.sha256(b"x").digest() * 100)
        with pytest.raises(EstargzError, match="footer"):
            await index_of(EstargzBlob(data, b"", 0, b""))

    async def test_short_read(self) -> None:
        """A source returning fewer bytes than asked is an error, not a silent misparse."""
        blob = build_estargz(sample_entries())

        async def short(offset: int, length: int) -> bytes:
            return blob.blob[offset : offset + length - 1]

        with pytest.raises(LayerFormatError, match="got"):
            await read_estargz_index(short, len(blob.blob), digest=blob.digest, media_type="")

    async def _expect_bad_toc(self, mutate: object, error: type[Exception] = EstargzError) -> None:
        blob = build_estargz([directory("d/"), file("d/f", b"abc" * 1000)])
        toc = json.loads(blob.toc_json)
        mutate(toc["entries"])  # type: ignore[operator]
        toc_json = json.dumps(toc).encode()
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        head = blob.blob[: blob.toc_offset]
        tail = gzip_member(info.tobuf() + toc_json + b"\0" * (-len(toc_json) % 512 + 1024))
        bad = EstargzBlob(head + tail + footer(blob.toc_offset), toc_json, blob.toc_offset, b"")
        with pytest.raises(error, match=bad.digest):
            await index_of(bad)


def test_parse_modtime() -> None:
    """RFC 3339 times with zones and nanoseconds become nanoseconds since the epoch."""
    assert parse_modtime("1970-01-01T00:00:01Z") == 10**9
    assert parse_modtime("1970-01-01T01:00:01+01:00") == 10**9
    assert parse_modtime("1970-01-01T00:00:01.000000005Z") == 10**9 + 5
    with pytest.raises(ValueError):
        parse_modtime("yesterday")


@given(st.text(alphabet="a./\x00", max_size=12))
def test_toc_names_normalize_as_tar_names(name: str) -> None:
    """A TOC name becomes the path the tar parser would give it (the fast path changes nothing)."""
    try:
        expected = normalize_path(name)
    except UnsafePath:
        with pytest.raises(UnsafePath):
            _normalize(name)
        return
    assert _normalize(name) == expected
