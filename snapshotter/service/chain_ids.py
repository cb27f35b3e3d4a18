"""Chain IDs of a layer stack, as the OCI image spec defines them.

``ChainID(L0) = DiffID(L0)`` and ``ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))``, over the
``sha256:...`` strings. containerd names the committed snapshot of each layer by its chain ID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from snapshotter.errors import InvalidReference


def chain_id(parent: str | None, diff_id: str) -> str:
    """Return the chain ID of ``diff_id`` stacked on the layer whose chain ID is ``parent``."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Return the chain ID of every prefix of ``diff_ids`` (bottom layer first); raises InvalidReference on a non-digest."""
    result: list[str] = []
    parent: str | None = None
    for diff_id in diff_ids:
        # Only the "algorithm:value" shape is checked: the definition works on the strings, and the
        # spec's own tests use short placeholders such as "sha256:a".
        algorithm, sep, value = diff_id.partition(":")
        if not (algorithm and sep and value) or " " in diff_id:
            raise InvalidReference(f"diff_id {diff_id!r} is not a digest ('sha256:' and hex digits)")
        parent = chain_id(parent, diff_id)
        result.append(parent)
    return result
