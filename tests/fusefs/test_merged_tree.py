"""The merged tree: overlay rules, hardlinks, implicit directories, stable numbering."""

from __future__ import annotations

import pytest

from fusefs.merged_tree import MergedTree
from index.errors import LayerFormatError
from index.model import Entry
from index.model import EntryType as T


def d(path: str, mode: int = 0o755, uid: int = 0) -> Entry:
    return Entry(path, T.DIR, mode, uid=uid)


def f(path: str, size: int = 1) -> Entry:
    return Entry(path, T.FILE, 0o644, size=size)


def paths(tree: MergedTree) -> list[str]:
    return [p for p, _ in tree.walk()]


def test_whiteout_hides_file_below() -> None:
    """A .wh.NAME entry in an upper layer hides NAME of the layers below, and never shows itself."""
    tree = MergedTree.build([[d("a"), f("a/x"), f("a/y")], [f("a/.wh.x")]])
    assert paths(tree) == ["", "a", "a/y"]


def test_whiteout_of_directory_hides_its_subtree() -> None:
    """Whiting out a directory removes everything under it."""
    tree = MergedTree.build([[d("a"), d("a/b"), f("a/b/c")], [f(".wh.a")]])
    assert paths(tree) == [""]


def test_opaque_hides_lower_but_keeps_same_layer() -> None:
    """An opaque marker empties the directory of lower content but keeps what its own layer adds, in any order."""
    lower = [d("a"), f("a/old"), d("a/sub"), f("a/sub/old")]
    upper = [d("a"), f("a/new"), f("a/.wh..wh..opq"), d("a/sub"), f("a/sub/new")]
    tree = MergedTree.build([lower, upper])
    assert paths(tree) == ["", "a", "a/new", "a/sub", "a/sub/new"]


def test_whiteout_applies_only_below() -> None:
    """A whiteout never hides an entry of its own layer."""
    tree = MergedTree.build([[f("x")], [f("x", size=7), f(".wh.x")]])
    node = tree.lookup("x")
    assert node is not None and node.layer == 1 and node.entry.size == 7


def test_file_replaced_by_directory_and_back() -> None:
    """A directory replaces a file below it (starting empty) and a file replaces a directory with its subtree."""
    tree = MergedTree.build([[f("p"), d("q"), f("q/inner")], [d("p"), f("p/child"), f("q")]])
    assert paths(tree) == ["", "p", "p/child", "q"]
    q = tree.lookup("q")
    assert q is not None and not q.is_dir and q.layer == 1


def test_directory_metadata_from_topmost_layer_and_contents_merge() -> None:
    """A directory over a directory merges contents and takes the upper layer's metadata."""
    tree = MergedTree.build([[d("a", 0o700, uid=5), f("a/x")], [d("a", 0o750, uid=7), f("a/y")]])
    a = tree.lookup("a")
    assert a is not None and a.entry.mode == 0o750 and a.entry.uid == 7 and a.layer == 1
    assert paths(tree) == ["", "a", "a/x", "a/y"]


def test_implicit_parents_get_defaults() -> None:
    """Parents a layer implies without listing get 0755 root; an existing lower directory keeps its metadata."""
    tree = MergedTree.build([[d("keep", 0o700, uid=3)], [f("keep/x"), f("new/deep/y")]])
    new = tree.lookup("new/deep")
    keep = tree.lookup("keep")
    assert new is not None and new.is_dir and new.entry.mode == 0o755 and new.entry.uid == 0
    assert keep is not None and keep.entry.mode == 0o700 and keep.entry.uid == 3


def test_hardlinks_share_one_node_and_count_links() -> None:
    """Hardlinks across directories are one node whose nlink counts the names."""
    layer = [
        d("a"),
        d("b"),
        f("a/f"),
        Entry("b/g", T.HARDLINK, link_target="a/f"),
        Entry("h", T.HARDLINK, link_target="b/g"),
    ]
    tree = MergedTree.build([layer])
    f_node, g_node, h_node = tree.lookup("a/f"), tree.lookup("b/g"), tree.lookup("h")
    assert f_node is g_node is h_node and f_node is not None
    assert f_node.nlink == 3 and f_node.entry.path == "a/f" and f_node.entry.type is T.FILE


def test_hardlink_survives_hidden_target() -> None:
    """A hardlink whose target is later hidden keeps the original data, and nlink counts only surviving names."""
    tree = MergedTree.build([[f("t"), Entry("l", T.HARDLINK, link_target="t")], [f(".wh.t")]])
    node = tree.lookup("l")
    assert tree.lookup("t") is None and node is not None
    assert (node.layer, node.entry.path, node.nlink) == (0, "t", 1)


def test_hardlink_survives_replaced_target() -> None:
    """When an upper layer replaces a hardlink's target, the link still shows the original entry of its own layer."""
    tree = MergedTree.build([[f("t", 3), Entry("l", T.HARDLINK, link_target="t")], [f("t", 9)]])
    t, link = tree.lookup("t"), tree.lookup("l")
    assert t is not None and link is not None and t is not link
    assert (link.layer, link.entry.size, link.nlink, t.layer, t.nlink) == (0, 3, 1, 1, 1)


def test_dangling_hardlink_is_a_format_error() -> None:
    """A hardlink to nothing is a malformed layer."""
    with pytest.raises(LayerFormatError):
        MergedTree.build([[Entry("l", T.HARDLINK, link_target="missing")]])


def test_directory_nlink_and_parent() -> None:
    """A directory's nlink is 2 plus its subdirectories, and its parent is known."""
    tree = MergedTree.build([[d("a"), d("a/b"), d("a/c"), f("a/x")]])
    a = tree.lookup("a")
    assert a is not None and a.nlink == 4 and a.parent is tree.root and tree.root.parent is tree.root


def test_numbering_is_stable_and_root_is_zero() -> None:
    """The same chain always gives the same numbers, with the root first and every index resolvable."""
    layers = [[d("z"), f("z/1"), f("b"), d("a"), f("a/q")], [f("c"), f(".wh.b")]]
    one, two = MergedTree.build(layers), MergedTree.build(layers)
    assert [(p, n.index) for p, n in one.walk()] == [(p, n.index) for p, n in two.walk()]
    assert one.root.index == 0 and len(one) == 6
    assert all(one.node(n.index) is n for _, n in one.walk())
    with pytest.raises(IndexError):
        one.node(len(one))


def test_root_entry_sets_root_metadata() -> None:
    """A layer's "" entry gives the root its metadata; file bytes are totalled."""
    tree = MergedTree.build([[d("", 0o711, uid=1), f("x", 10)], [f("y", 5)]])
    assert tree.root.entry.mode == 0o711 and tree.file_bytes == 15
