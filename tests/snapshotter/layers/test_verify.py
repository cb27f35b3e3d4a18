"""Whole-layer verification reads a blob's tar only as far as its index says the tar goes."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from index.errors import LayerFormatError
from index.model import LayerFormat
from snapshotter.layers.verify import diff_id_of


def test_a_tar_inflating_past_its_bound_is_refused(tmp_path: Path) -> None:
    """A blob whose tar grows past the size its index claims stops with a LayerFormatError, not a full disk."""
    blob = tmp_path / "data"
    blob.write_bytes(gzip.compress(bytes(16 << 20)))  # 16 MiB of zeros in a few KiB
    with pytest.raises(LayerFormatError, match="grows past the 1048576 bytes"):
        diff_id_of(blob, LayerFormat.GZIP, limit=1 << 20)


def test_a_tar_within_its_bound_hashes_as_usual(tmp_path: Path) -> None:
    """Exactly the claimed size passes, and the DiffID is the tar's sha256."""
    tar = bytes(1 << 20)
    blob = tmp_path / "data"
    blob.write_bytes(gzip.compress(tar))
    assert diff_id_of(blob, LayerFormat.GZIP, limit=len(tar)) == "sha256:" + hashlib.sha256(tar).hexdigest()
