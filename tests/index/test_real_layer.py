"""A real tree (Python's standard library) tarred by GNU tar and gzipped, indexed in one pass and read back."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from index.builder import LayerIndexBuilder
from index.model import EntryType, LayerFormat
from index.reader import LayerReader
from tests.index.conftest import blob_source

TREE = Path("/usr/lib/python3.11")


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, bytes]:
    """(tar, tar.gz) of TREE, made by the system tar and gzip as a layer build would."""
    if not TREE.is_dir():
        pytest.skip(f"{TREE} is not present")
    tar = subprocess.run(
        ["tar", "-C", str(TREE.parent), "-cf", "-", TREE.name], check=True, capture_output=True
    ).stdout
    blob = subprocess.run(["gzip", "-6", "-n"], input=tar, check=True, capture_output=True).stdout
    return tar, blob


async def test_every_file_reads_back_identically(layer: tuple[bytes, bytes]) -> None:
    """Every regular file read through the one-pass index equals the file on disk; the DiffID is sha256 of the tar."""
    tar, blob = layer
    builder = LayerIndexBuilder(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        LayerFormat.GZIP,
        digest="sha256:" + hashlib.sha256(blob).hexdigest(),
    )
    for i in range(0, len(blob), 1 << 16):  # pieces as an HTTP download delivers them
        builder.feed(blob[i : i + (1 << 16)])
    index = builder.finish()
    assert index.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    reader = LayerReader(index, blob_source(blob), decoded_cache_bytes=16 << 20)
    files = [e for e in index.entries if e.type is EntryType.FILE]
    assert len(files) > 1000
    for entry in files:
        assert await reader.read(entry, 0, entry.size) == (TREE.parent / entry.path).read_bytes(), entry.path
    kinds = {e.type for e in index.entries}
    assert {EntryType.DIR, EntryType.FILE} <= kinds
