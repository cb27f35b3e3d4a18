"""Hostile eStargz TOCs and footers: each is an EstargzError (or UnsafePath) naming the layer, the entry and the
field, never another exception; values at Linux's limits are kept."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import pytest

from index.errors import LayerFormatError, UnsafePath
from index.estargz import EstargzError
from tests.hostile.conftest import estargz_index, with_toc
from tests.support.estargz_writer import EstargzBlob, build_estargz, footer, gzip_member
from tests.support.image_builder import directory, file

Records = list[dict[str, Any]]
BASE = build_estargz([directory("d/"), file("d/f", b"abc" * 1000)])  # records: d/, d/f (one chunk)


def _set(position: int, **fields: Any) -> Callable[[Records], None]:
    return lambda records: records[position].update(fields)


def _add(record: dict[str, Any]) -> Callable[[Records], None]:
    return lambda records: records.append(record)


_CHAR = {"name": "dev/c", "type": "char", "mode": 0o600}
_LINK = {"name": "s", "type": "symlink", "linkName": "t"}
# (case id, change to the records, error class, pattern the message must contain)
REFUSED: list[tuple[str, Callable[[Records], None], type[LayerFormatError], str]] = [
    ("uid--1", _set(1, uid=-1), EstargzError, r"uid is not a non-negative integer: -1"),
    (
        "uid-2^32",
        _set(1, uid=1 << 32),
        EstargzError,
        r"entry 'd/f' has owner 4294967296:0, not a Linux uid:gid",
    ),
    ("gid-2^40", _set(1, gid=1 << 40), EstargzError, r"entry 'd/f' has owner 0:1099511627776"),
    ("uid-string", _set(1, uid="0"), EstargzError, r"uid is not a non-negative integer: '0'"),
    ("uid-bool", _set(1, uid=True), EstargzError, r"uid is not a non-negative integer: True"),
    (
        "size-2^64",
        _set(1, size=1 << 64),
        EstargzError,
        r"entry 'd/f' has size 18446744073709551616, not a 64-bit",
    ),
    ("size-2^63", _set(1, size=1 << 63), EstargzError, r"entry 'd/f' has size 9223372036854775808"),
    ("size--1", _set(1, size=-1), EstargzError, r"size is not a non-negative integer: -1"),
    ("size-float", _set(1, size=3000.0), EstargzError, r"size is not a non-negative integer: 3000.0"),
    (
        "char-major-2^40",
        _add({**_CHAR, "devMajor": 1 << 40}),
        EstargzError,
        r"'dev/c' has device major 1099511627776",
    ),
    ("char-major-4096", _add({**_CHAR, "devMajor": 4096}), EstargzError, r"'dev/c' has device major 4096"),
    (
        "block-minor-2^20",
        _add({**_CHAR, "type": "block", "devMinor": 1 << 20}),
        EstargzError,
        r"has device minor 1048576",
    ),
    ("mode--1", _set(1, mode=-1), EstargzError, r"mode is not a non-negative integer: -1"),
    ("name-component-256", _set(0, name="x" * 256 + "/"), EstargzError, r"has a path component of 256 bytes"),
    (
        "name-64KiB",
        _add({"name": "n" * 65536, "type": "dir"}),
        EstargzError,
        r"has a path of 65536 bytes, beyond PATH_MAX",
    ),
    ("name-nul", _add({"name": "a\x00b", "type": "dir"}), UnsafePath, r"contains a NUL byte"),
    (
        "symlink-target-4096",
        _add({**_LINK, "linkName": "t" * 4096}),
        EstargzError,
        r"'s' has a symlink target of 4096 bytes",
    ),
    (
        "symlink-target-nul",
        _add({**_LINK, "linkName": "t\x00"}),
        EstargzError,
        r"'s' has a symlink target containing a NUL",
    ),
    (
        "symlink-target-empty",
        _add({**_LINK, "linkName": ""}),
        EstargzError,
        r"'s' has an empty symlink target",
    ),
    (
        "xattr-name-256",
        _set(1, xattrs={"user." + "x" * 251: ""}),
        EstargzError,
        r"'d/f' has xattr name 'user\.x+' \(256 bytes\)",
    ),
    (
        "xattr-value-64KiB+1",
        _set(1, xattrs={"user.big": base64.b64encode(bytes(65537)).decode()}),
        EstargzError,
        r"'d/f' has xattr 'user\.big' value of 65537 bytes",
    ),
    ("xattr-not-base64", _set(1, xattrs={"user.a": "%%%"}), EstargzError, r"xattr value is not base64"),
    ("xattrs-not-object", _set(1, xattrs=["user.a"]), EstargzError, r"xattrs is not an object"),
    (
        "inner-offset-2^64",
        _set(1, innerOffset=1 << 64),
        EstargzError,
        r"'d/f' has a chunk inner offset of 18446744073709551616",
    ),
    (
        "chunk-offset-beyond-toc",
        _set(1, offset=10**12),
        EstargzError,
        r"chunk offset 1000000000000 lies at or after the TOC",
    ),
    ("chunk-size-beyond-file", _set(1, chunkSize=10**6), EstargzError, r"exceeds the file"),
    ("chunk-gap", _set(1, chunkSize=1000), EstargzError, r"do not cover its 3000 bytes"),
    ("modtime-not-rfc3339", _set(1, modtime="yesterday"), EstargzError, r"not an RFC 3339 time"),
    ("type-unknown", _set(0, type="socket"), EstargzError, r"unknown entry type 'socket'"),
    ("name-not-string", _add({"name": 7, "type": "dir"}), EstargzError, r"not a TOC entry"),
    (
        "dotdot-symlink-replaces-root",
        _add({**_LINK, "name": "../.."}),
        UnsafePath,
        r"would replace the layer root",
    ),
]


@pytest.mark.parametrize(
    ("change", "error", "pattern"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
async def test_a_hostile_toc_record_is_refused_naming_the_layer_entry_and_field(
    change: Callable[[Records], None], error: type[LayerFormatError], pattern: str
) -> None:
    """The TOC is refused with exactly this error class, the layer's digest and the field's complaint in the message."""
    toc = BASE.toc
    change(toc["entries"])
    blob = with_toc(BASE, toc)
    with pytest.raises(LayerFormatError) as caught:
        await estargz_index(blob)
    assert type(caught.value) is error
    assert blob.digest in str(caught.value)
    assert re.search(pattern, str(caught.value)), str(caught.value)[:500]


@pytest.mark.parametrize(
    ("change", "path", "field", "value"),
    [
        (_add({**_CHAR, "devMajor": 4095, "devMinor": (1 << 20) - 1}), "dev/c", "devminor", (1 << 20) - 1),
        (_set(0, devMajor=1 << 40), "d", "devmajor", 0),  # not a device: the number is never read
        (_set(1, mode=0o100755), "d/f", "mode", 0o755),  # type bits dropped, as chmod(mode & 0o7777)
        (_set(1, uid=(1 << 32) - 1), "d/f", "uid", (1 << 32) - 1),
        (_add({**_LINK, "linkName": "t" * 4095}), "s", "link_target", "t" * 4095),
        (_add({"name": "../../up", "type": "dir"}), "up", "path", "up"),  # stops at the root, as tar names do
    ],
    ids=["device-at-limits", "dir-device-ignored", "mode-type-bits", "uid-max", "target-4095", "dotdot"],
)
async def test_toc_values_at_linux_limits_are_kept(
    change: Callable[[Records], None], path: str, field: str, value: object
) -> None:
    """A field exactly at Linux's limit (or one Linux ignores) is kept as the eager unpack would apply it."""
    toc = BASE.toc
    change(toc["entries"])
    index = await estargz_index(with_toc(BASE, toc))
    assert getattr({e.path: e for e in index.entries}[path], field) == value


def _footer_blob(tail: bytes) -> EstargzBlob:
    data = BASE.blob[: BASE.toc_offset] + tail
    return EstargzBlob(data, BASE.toc_json, BASE.toc_offset, b"")


_TOC_MEMBER = BASE.blob[BASE.toc_offset : -51]
FOOTERS: list[tuple[str, bytes, str]] = [
    ("offset-beyond-blob", _TOC_MEMBER + footer(1 << 40), r"TOC offset 1099511627776 lies outside the blob"),
    ("offset-max", _TOC_MEMBER + footer((1 << 64) - 1), r"lies outside the blob"),
    ("no-marker", _TOC_MEMBER + footer(BASE.toc_offset).replace(b"STARGZ", b"STARGY"), r"no eStargz footer"),
    ("truncated-footer", _TOC_MEMBER + footer(BASE.toc_offset)[:-1], r"no eStargz footer"),
    ("toc-not-gzip", b"\x00" * len(_TOC_MEMBER) + footer(BASE.toc_offset), r"the TOC is not a gzip member"),
    (
        "toc-not-tar",
        gzip_member(b"{}" * 600) + footer(BASE.toc_offset),
        r"the TOC member is not a tar|holds no",
    ),
    ("toc-not-json", gzip_member(b"x" * 100) + footer(BASE.toc_offset), r"TOC"),
]


@pytest.mark.parametrize(("tail", "pattern"), [c[1:] for c in FOOTERS], ids=[c[0] for c in FOOTERS])
async def test_a_hostile_footer_or_toc_member_is_an_estargz_error(tail: bytes, pattern: str) -> None:
    """A footer pointing anywhere, or a TOC member that is no gzip/tar, is an EstargzError naming the layer."""
    blob = _footer_blob(tail)
    with pytest.raises(EstargzError) as caught:
        await estargz_index(EstargzBlob(blob.blob, b"", 0, b""))
    assert blob.digest in str(caught.value)
    assert re.search(pattern, str(caught.value)), str(caught.value)


async def test_a_toc_that_is_not_version_1_is_refused() -> None:
    """A TOC of another version or without an entries list is an EstargzError."""
    for toc in ({"version": 2, "entries": []}, {"version": 1, "entries": {}}, {"version": 1}):
        with pytest.raises(EstargzError, match="not a version 1 TOC"):
            await estargz_index(with_toc(BASE, toc))
