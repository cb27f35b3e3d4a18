"""The ``index`` package's public surface: every exported name resolves, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import index


def test_every_exported_name_resolves() -> None:
    """Each name in ``index.__all__`` is importable from the package."""
    for name in index.__all__:
        assert getattr(index, name) is not None, name


def test_small_modules_do_not_load_the_heavy_ones() -> None:
    """Importing index.errors and index.model loads neither the builder nor the reader (a mount's start-up)."""
    code = (
        "import sys, index.errors, index.model, index.estargz\n"
        "print(sorted(m for m in ('index.builder', 'index.gzip_seek', 'index.reader') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
