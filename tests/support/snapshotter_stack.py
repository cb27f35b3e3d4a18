"""The containerd + ``lazysnap serve`` stack for tests: it lives in ``snapshotter/containerd_stack.py``.

``lazysnap bench`` runs it too, so the package holds it; this module keeps the tests' import path.
"""

from __future__ import annotations

from snapshotter.devtools.containerd_stack import LAZYSNAP_SERVE, SNAPSHOTTER, LazysnapStack, fuse_root

__all__ = ["LAZYSNAP_SERVE", "SNAPSHOTTER", "LazysnapStack", "fuse_root"]
