"""Where the scripts in this directory put what they produce: the directory named by ``--out``.

Never the current directory, so running a benchmark from the repository leaves the working tree
clean. Without ``--out`` each run gets a new directory under the system temp dir, printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--out DIR`` to ``parser``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for the results, created if missing (default: a new directory under the system temp dir)",
    )


def out_dir(out: Path | None, script: str) -> Path:
    """The directory ``--out`` named (created if missing), or a new one under the temp dir; printed either way."""
    if out is None:
        directory = Path(tempfile.mkdtemp(prefix=f"{script}-"))
    else:
        directory = out
        directory.mkdir(parents=True, exist_ok=True)
    print(f"{script}: results go to {directory}")
    return directory


def write_json(directory: Path, name: str, document: Any) -> Path:
    """Write ``document`` as indented JSON to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
