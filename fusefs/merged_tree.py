"""A chain of layers as one read-only tree with overlay semantics.

Layers are given bottom first, each as its entries in tar order. Within a layer, whiteouts
(``.wh.NAME``, ``.wh..wh..opq``) apply to the layers below it only, as the OCI image spec says,
so they are applied before the layer's own entries are added. Every node is an inode: a
hardlink is the same ``Node`` object under several names, which is how ``st_nlink`` and the
shared ``st_ino`` come out right. A node keeps ``(layer, entry)`` of where its data lives.

Pure Python; no FUSE here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from index.errors import LayerFormatError
from index.model import Entry, EntryType

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Directories a layer implies without listing them (a/b/c without a/) get what containerd's
# mkparent gives them: 0755, owned by root, and no meaningful time.
IMPLICIT_DIR_MODE = 0o755
# Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
MAX_SYMLINK_HOPS = 40


class Node:
    """One inode of the merged tree.

    ``children`` maps names to nodes for a directory and is ``None`` otherwise. ``index`` is the
    node's stable number in the tree (0 is the root); ``parent`` is set for directories only,
    since a hardlinked file has several.
    """

    __slots__ = ("children", "entry", "index", "layer", "nlink", "parent")

    def __init__(self, layer: int, entry: Entry, children: dict[str, Node] | None) -> None:
        self.layer = layer
        self.entry = entry
        self.children = children
        self.index = -1
        self.nlink = 0
        self.parent: Node | None = None

    @property
    def is_dir(self) -> bool:
        """Whether this node is a directory."""
        return self.children is not None

    def __repr__(self) -> str:
        return f"Node(index={self.index}, layer={self.layer}, path={self.entry.path!r}, type={self.entry.type.value})"


def _implicit_dir(path: str, layer: int) -> Node:
    return Node(layer, Entry(path=path, type=EntryType.DIR, mode=IMPLICIT_DIR_MODE), {})


class _Builder:
    """Applies layers one after the other onto a tree of nodes."""

    def __init__(self) -> None:
        self.root = _implicit_dir("", 0)

    def find(self, path: str) -> Node | None:
        """The node at ``path`` in the tree as it stands, or None."""
        node = self.root
        if not path:
            return node
        for name in path.split("/"):
            if node.children is None:
                return None
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def add_layer(self, layer: int, entries: Sequence[Entry]) -> None:
        """Apply one layer's whiteouts to the tree below it, then add its entries in tar order."""
        for entry in entries:
            parent_path, _, name = entry.path.rpartition("/")
            if name.startswith(WHITEOUT_PREFIX):
                self._whiteout(parent_path, name)
        # Directories already resolved in this layer; only valid while no directory is replaced.
        dirs: dict[str, Node] = {"": self.root}
        # Non-directory nodes this layer created, by path: hardlinks resolve here first.
        seen: dict[str, Node] = {}
        for entry in entries:
            if not entry.path:
                if entry.type is EntryType.DIR:
                    self.root.layer, self.root.entry = layer, entry
                continue
            parent_path, _, name = entry.path.rpartition("/")
            # A whiteout still says its directory exists in this layer.
            parent = self._dir(parent_path, layer, dirs)
            if name.startswith(WHITEOUT_PREFIX):
                continue
            assert parent.children is not None
            old = parent.children.get(name)
            if entry.type is EntryType.DIR:
                if old is not None and old.children is not None:
                    # Directory over directory merges; metadata comes from the upper one.
                    old.layer, old.entry = layer, entry
                    continue
                node = Node(layer, entry, {})
            elif entry.type is EntryType.HARDLINK:
                node = self._link_target(layer, entry, seen)
            else:
                node = Node(layer, entry, None)
            if old is not None and old.children is not None:
                dirs = {"": self.root}
            parent.children[name] = node
            if node.children is None:
                seen[entry.path] = node

    def _whiteout(self, parent_path: str, name: str) -> None:
        parent = self.find(parent_path)
        if parent is None or parent.children is None:
            return  # nothing below to hide
        if name == OPAQUE_MARKER:
            parent.children.clear()
        elif not name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):  # aufs metadata (.wh..wh.plnk): ignored
            parent.children.pop(name[len(WHITEOUT_PREFIX) :], None)

    def _dir(self, path: str, layer: int, dirs: dict[str, Node]) -> Node:
        """The directory at ``path``, creating implicit ones (replacing non-directories) on the way."""
        cached = dirs.get(path)
        if cached is not None:
            return cached
        node = self.root
        walked = ""
        for name in path.split("/"):
            walked = f"{walked}/{name}" if walked else name
            assert node.children is not None
            child = node.children.get(name)
            if child is None or child.children is None:
                child = _implicit_dir(walked, layer)
                node.children[name] = child
            node = child
            dirs[walked] = node
        return node

    def _link_target(self, layer: int, entry: Entry, seen: dict[str, Node]) -> Node:
        # Resolve within the link's own layer first: a later layer may hide or replace the target's
        # path, and the link must still show the original data. Lower layers are only a fallback
        # (containerd links to whatever is on disk).
        target = seen.get(entry.link_target) or self.find(entry.link_target)
        if target is None or target.children is not None:
            raise LayerFormatError(
                f"layer {layer}: hardlink {entry.path!r} points to {entry.link_target!r}, "
                "which is not an earlier non-directory entry; the layer is malformed"
            )
        return target


def _number(root: Node) -> list[Node]:
    """Number nodes depth first in sorted name order, sort each directory, count links."""
    nodes: list[Node] = []
    root.parent = root
    stack = [root]
    while stack:
        node = stack.pop()
        if node.index >= 0:  # another name of a hardlinked inode
            node.nlink += 1
            continue
        node.index = len(nodes)
        nodes.append(node)
        if node.children is None:
            node.nlink = 1
            continue
        items = sorted(node.children.items())
        node.children = dict(items)
        node.nlink = 2
        for _, child in reversed(items):
            if child.children is not None:
                child.parent = node
                node.nlink += 1
            stack.append(child)
    return nodes


class MergedTree:
    """The merged, immutable tree of a layer chain; nodes are numbered 0..len-1, root first."""

    __slots__ = ("_nodes", "file_bytes", "root")

    def __init__(self, root: Node) -> None:
        self.root = root
        self._nodes = _number(root)
        self.file_bytes = sum(n.entry.size for n in self._nodes if n.entry.type is EntryType.FILE)

    @classmethod
    def build(cls, layers: Sequence[Sequence[Entry]]) -> MergedTree:
        """Merge layers (bottom first, entries in tar order); raises LayerFormatError on a dangling hardlink."""
        builder = _Builder()
        for number, entries in enumerate(layers):
            builder.add_layer(number, entries)
        return cls(builder.root)

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, index: int) -> Node:
        """The node numbered ``index``; raises IndexError if there is none."""
        if index < 0:
            raise IndexError(index)
        return self._nodes[index]

    def lookup(self, path: str) -> Node | None:
        """The node at a normalized path ("" is the root), or None."""
        node = self.root
        for name in path.split("/") if path else ():
            if node.children is None or name not in node.children:
                return None
            node = node.children[name]
        return node

    def resolve(self, path: str, max_links: int = MAX_SYMLINK_HOPS) -> Node | None:
        """The node at ``path`` (relative to the root) with symlinks followed in every component, or None.

        Absolute link targets resolve from this tree's root, never from the host's, and ``..``
        stops at the root, as inside a container.
        """
        parts = [p for p in path.split("/") if p not in ("", ".")]
        stack: list[Node] = [self.root]  # the directories from the root to the current one
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            children = stack[-1].children
            node = children.get(name) if children is not None else None
            if node is None:
                return None
            if node.entry.type is EntryType.SYMLINK:
                hops += 1
                if hops > max_links:
                    return None
                target = node.entry.link_target
                if target.startswith("/"):
                    stack = [self.root]
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            stack.append(node)
        return stack[-1]

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every path with its node, depth first in sorted order; a hardlinked node comes once per name."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children is not None:
                prefix = f"{path}/" if path else ""
                stack.extend((prefix + name, child) for name, child in reversed(node.children.items()))
