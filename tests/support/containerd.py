"""pytest fixtures around the containerd launcher in ``snapshotter/containerd_env.py``.

Use the ``containerd`` fixture for a default instance, or ``containerd_factory`` to start
one with proxy snapshotter plugins::

    def test_x(containerd_factory):
        ctrd = containerd_factory(proxy_plugins={"lazysnap": "/tmp/x/lazysnap.sock"})
        ctrd.ctr("image", "ls")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from snapshotter.devtools.containerd_env import (
    CONTAINERD,
    CTR,
    CTR_REMOTE,
    DEFAULT_NAMESPACE,
    Containerd,
    containerd_available,
)

__all__ = [
    "CONTAINERD",
    "CTR",
    "CTR_REMOTE",
    "DEFAULT_NAMESPACE",
    "Containerd",
    "containerd",
    "containerd_available",
    "containerd_factory",
]


@pytest.fixture
def containerd_factory() -> Iterator[Callable[..., Containerd]]:
    """Start containerd instances on demand (``factory(proxy_plugins={...})``); all stopped at teardown."""
    if not containerd_available():
        pytest.skip("needs root, containerd, ctr, runc, unshare and nsenter")
    started: list[Containerd] = []

    def factory(**kwargs: Any) -> Containerd:
        instance = Containerd(**kwargs)
        started.append(instance)
        return instance.start()

    try:
        yield factory
    finally:
        for instance in reversed(started):
            instance.stop()


@pytest.fixture
def containerd(containerd_factory: Callable[..., Containerd]) -> Containerd:
    """A running containerd with the default config (overlayfs snapshotter, no proxy plugins)."""
    return containerd_factory()
