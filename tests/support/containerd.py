"""pytest fixtures around the containerd launcher in ``snapshotter/containerd_env.py``.

Use the ``containerd`` fixture for a default instance, or ``containerd_factory`` to start
one with proxy snapshotter plugins::

    def test_x(containerd_factory):
        ctrd = containerd_factory(proxy_plugins={"lazysnap": "/tmp/x/lazysnap.sock"})
        ctrd.ctr("image", "ls")

Read a container's output with ``run_shell``, not from ``ctr run``'s stdout (see its docstring).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

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
    "run_shell",
]

# Where run_shell's container sees its host output directory.
OUTPUT_MOUNT = "/.lazysnap-test-output"


class RunsCtr(Protocol):
    """Anything that runs ``ctr`` against one containerd: ``Containerd`` and ``LazysnapStack``."""

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]: ...


def run_shell(
    ctrd: RunsCtr,
    ref: str,
    container: str,
    script: str,
    *,
    ctr_args: Sequence[str] = (),
    timeout: float = 120,
) -> str:
    """Run ``/bin/sh -c script`` in a new container of ``ref`` (``ctr run --rm``); return what it printed.

    The container's stdout goes to a file in a bind-mounted host directory, not through ctr:
    containerd 1.6's client closes the task's stdout FIFO in ``task.Delete`` before its copy
    goroutine has drained it (fixed upstream in 1.7 by commit 34a93a0, "task: don't close() io before
    cancel()"), so a container that prints and exits at once sometimes leaves ``ctr run`` with an
    empty stdout. A file the process wrote is complete once ``ctr run`` returned.

    Raises:
        subprocess.CalledProcessError: ``ctr run`` or the script failed (its stderr is attached).
    """
    with tempfile.TemporaryDirectory(prefix="ctr-output-") as host_dir:
        mount = f"type=bind,src={host_dir},dst={OUTPUT_MOUNT},options=rbind:rw"
        wrapped = f"exec > {OUTPUT_MOUNT}/stdout; {script}"
        ctrd.ctr(
            "run",
            "--rm",
            "--mount",
            mount,
            *ctr_args,
            ref,
            container,
            "/bin/sh",
            "-c",
            wrapped,
            timeout=timeout,
        )
        return (Path(host_dir) / "stdout").read_text()


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
