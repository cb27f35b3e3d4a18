"""The lazy view (FUSE mount of the merged tree) and the eager view (layers applied on disk) agree."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

from fusefs.merged_tree import MergedTree
from fusefs.operations import ReadOnlyOperations
from index.builder import build_index
from index.model import Entry, LayerFormat
from snapshotter.mount.eager_unpack import apply_layer
from tests.fusefs.fuse_harness import serve
from tests.support.image_builder import build_tar
from tests.support.tree_compare import CAP, LONG, layer_entries, snapshot

TAR = "application/vnd.oci.image.layer.v1.tar"


def layers() -> list[bytes]:
    """The fidelity image's layers as uncompressed tars."""
    return [build_tar(layer) for layer in layer_entries()]


class TarSource:
    """File bytes read straight out of the layer tars at the offsets the index recorded."""

    def __init__(self, tars: Sequence[bytes]) -> None:
        self.tars = tars

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Return the entry's bytes from its layer's tar."""
        start = entry.data_offset + offset
        return self.tars[layer][start : start + length]


def test_lazy_mount_equals_eager_unpack(tmp_path: Path, mountpoint: Path) -> None:
    """Every path has the same type, mode, owner, size, mtime, link target, xattrs, nlink, inode sharing and sha256 in both views."""
    tars = layers()
    eager = tmp_path / "eager"
    eager.mkdir()
    for tar in tars:
        apply_layer(io.BytesIO(tar), str(eager))
    tree = MergedTree.build([build_index(TAR, LayerFormat.TAR, [tar]).entries for tar in tars])
    with serve(ReadOnlyOperations(tree, TarSource(tars)), mountpoint):
        lazy_view = snapshot(mountpoint)
    eager_view = snapshot(eager)
    assert sorted(lazy_view) == sorted(eager_view)
    for path in sorted(eager_view):
        assert lazy_view[path] == eager_view[path], path
    # The interesting cases really are in the image.
    assert eager_view["rl"]["sha256"] == hashlib.sha256(b"target to replace").hexdigest()
    assert eager_view["tl"]["nlink"] == 1 and "t" not in eager_view
    assert eager_view["etc/libz-link"]["nlink"] == 2
    assert eager_view["becomes_dir/child"]["link"] == "/abs/target"
    assert sorted(p for p in eager_view if p.startswith("opq/")) == ["opq/new"]
    assert eager_view["etc/passwd"]["mtime_ns"] == 1_700_000_000_500_000_000
    assert eager_view["usr/bin/ping"]["xattrs"] == {"security.capability": CAP}
    assert LONG in eager_view and "données/日本語.txt" in eager_view
