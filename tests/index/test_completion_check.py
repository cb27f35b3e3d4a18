"""When a layer completes, its index must list exactly what its verified tar does: every lie is reported."""

from __future__ import annotations

import dataclasses
import gzip

import pytest

from index.completion_check import compare_with_blob, compare_with_tar, verify_index
from index.errors import IndexMismatch
from index.model import Entry, EntryType, LayerIndex
from tests.index.conftest import (
    LAYER_KINDS,
    entry_named,
    overlapping_chunks_layer,
    trust_layer,
)


def pieces(blob: bytes, size: int = 1000) -> list[bytes]:
    """``blob`` cut as a download delivers it: the check streams, whatever the cuts."""
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def lied(index: LayerIndex, path: str, **change: object) -> LayerIndex:
    """``index`` with the last entry at ``path`` changed."""
    target = entry_named(index, path)
    entries = [dataclasses.replace(e, **change) if e is target else e for e in index.entries]  # type: ignore[arg-type]
    return dataclasses.replace(index, entries=entries)


@pytest.mark.parametrize("kind", LAYER_KINDS)
async def test_a_genuine_index_equals_its_tar(kind: str) -> None:
    """A genuine index of a tar, gzip, multi-frame zstd or eStargz layer shows no difference from its blob's tar."""
    index, blob = await trust_layer(kind)
    assert compare_with_blob(index, pieces(blob)) == []
    verify_index(index, [blob])


async def test_the_uncompressed_tar_can_be_compared_directly() -> None:
    """compare_with_tar takes a tar/gzip/zstd layer's uncompressed stream; an eStargz index needs its blob."""
    index, blob = await trust_layer("gzip")
    assert compare_with_tar(index, pieces(gzip.decompress(blob))) == []
    estargz, _ = await trust_layer("estargz")
    with pytest.raises(ValueError, match="compare_with_blob"):
        compare_with_tar(estargz, [])


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd-frames"])
async def test_content_mapped_elsewhere_is_reported(kind: str) -> None:
    """A file mapped to another file's data offset, or given another entry's header offset, is reported with both offsets."""
    index, blob = await trust_layer(kind)
    hostname, shadow = entry_named(index, "etc/hostname"), entry_named(index, "etc/shadow")
    lie = lied(index, "etc/hostname", data_offset=shadow.data_offset)
    assert compare_with_blob(lie, [blob]) == [
        f"'etc/hostname': data_offset: index {shadow.data_offset}, tar {hostname.data_offset}"
    ]
    lie = lied(index, "etc/hostname", header_offset=shadow.header_offset)
    assert compare_with_blob(lie, [blob]) == [
        f"'etc/hostname': header_offset: index {shadow.header_offset}, tar {hostname.header_offset}"
    ]


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize(
    ("path", "change", "difference"),
    [
        ("etc/hostname", {"size": 5}, "'etc/hostname': size: index 5, tar 4"),
        ("bin/tool", {"mode": 0o4755}, "'bin/tool': mode: index '0o4755', tar '0o755'"),
        ("etc/shadow", {"uid": 1000}, "'etc/shadow': uid: index 1000, tar 0"),
        ("bin/sh", {"link_target": "/evil"}, "'bin/sh': link_target: index '/evil', tar 'tool'"),
        (
            "bin/tool",
            {"xattrs": {"user.origin": b"elsewhere"}},
            "'bin/tool': xattrs: index {'user.origin': b'elsewhere'}, tar {'user.origin': b'build'}",
        ),
        ("dev/null", {"devminor": 5}, "'dev/null': devminor: index 5, tar 3"),
        ("bin/sh", {"type": EntryType.FILE}, "'bin/sh': type: index 'file', tar 'symlink'"),
    ],
)
async def test_a_changed_field_is_reported(
    kind: str, path: str, change: dict[str, object], difference: str
) -> None:
    """A changed size, mode (setuid added), owner, symlink target, xattr, device number or type is reported by name."""
    index, blob = await trust_layer(kind)
    assert difference in compare_with_blob(lied(index, path, **change), pieces(blob))


@pytest.mark.parametrize("kind", LAYER_KINDS)
async def test_invented_and_missing_entries_are_reported(kind: str) -> None:
    """An entry the tar lacks (an invented setuid file) and one the index lacks (a file, a whiteout) are reported."""
    index, blob = await trust_layer(kind)
    invented = dataclasses.replace(
        index, entries=[*index.entries, Entry("usr/bin/su", EntryType.FILE, 0o4755)]
    )
    assert compare_with_blob(invented, [blob]) == ["'usr/bin/su': in the index, not in the tar"]
    kept = [e for e in index.entries if e.path not in ("etc/shadow", "var/.wh.old")]
    assert compare_with_blob(dataclasses.replace(index, entries=kept), [blob]) == [
        "'etc/shadow': missing from the index",
        "'var/.wh.old': missing from the index",
    ]


@pytest.mark.parametrize("kind", LAYER_KINDS)
async def test_a_later_entry_for_a_path_replaces_an_earlier_one(kind: str) -> None:
    """Only the last entry of a path counts, on both sides: dropping the overridden copy is no difference, serving it is."""
    index, blob = await trust_layer(kind)
    copies = [e for e in index.entries if e.path == "etc/passwd"]
    assert len(copies) == 2
    without_first = dataclasses.replace(index, entries=[e for e in index.entries if e is not copies[0]])
    assert compare_with_blob(without_first, [blob]) == []
    first_wins = dataclasses.replace(index, entries=[e for e in index.entries if e is not copies[1]])
    assert "'etc/passwd': size: index 26, tar 28" in compare_with_blob(first_wins, [blob])


async def test_an_estargz_toc_with_overlapping_chunks_is_reported() -> None:
    """An eStargz TOC that gives file b file a's chunk is reported: b's chunk does not lie at b's bytes in the tar."""
    index, blob, written = await overlapping_chunks_layer()
    a_data, b_data = written.tar.index(b"A" * 100), written.tar.index(b"B" * 100)
    assert compare_with_blob(index, pieces(blob)) == [
        f"'b': chunk at 0: tar offset: index {a_data}, tar {b_data}"
    ]


async def test_a_hardlink_to_content_elsewhere_is_reported() -> None:
    """A hardlink stands for its target's content: an index moving that content is reported at the link too."""
    index, blob = await trust_layer("gzip")
    tool, hostname = entry_named(index, "bin/tool"), entry_named(index, "etc/hostname")
    differences = compare_with_blob(lied(index, "bin/tool", data_offset=hostname.data_offset), [blob])
    assert differences == [
        f"'bin/tool': data_offset: index {hostname.data_offset}, tar {tool.data_offset}",
        f"'bin/alias' (hardlink to 'bin/tool'): data_offset: index {hostname.data_offset}, tar {tool.data_offset}",
    ]


async def test_verify_index_raises_with_the_first_differences() -> None:
    """verify_index raises IndexMismatch naming the layer, with every difference kept on the error."""
    index, blob = await trust_layer("zstd-frames")
    lie = lied(lied(index, "bin/tool", mode=0o4755), "etc/shadow", uid=1000)
    with pytest.raises(IndexMismatch, match=index.digest) as caught:
        verify_index(lie, pieces(blob))
    assert caught.value.differences == [
        "'etc/shadow': uid: index 1000, tar 0",
        "'bin/tool': mode: index '0o4755', tar '0o755'",
    ]


async def test_a_blob_that_is_not_the_layer_is_one_difference() -> None:
    """A blob that does not decompress or parse as a tar is reported, not raised."""
    index, blob = await trust_layer("gzip")
    assert compare_with_blob(index, [blob[: len(blob) // 2]])[0].startswith(
        "the blob does not replay as a tar"
    )
