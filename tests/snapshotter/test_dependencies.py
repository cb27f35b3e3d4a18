"""The daemons never import the bench extra (matplotlib): it is not installed on nodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

IMPORT_CLI = "import sys, snapshotter.cli; print('matplotlib' in sys.modules)"
SERVE_HELP = """
import sys
from snapshotter.cli import cli
try:
    cli(["serve", "--help"])
except SystemExit:
    pass
print("matplotlib" in sys.modules)
"""


def run_python(code: str) -> str:
    """The last stdout line of ``python -c code`` run from the repository."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    )
    return result.stdout.splitlines()[-1]


def test_importing_the_cli_does_not_import_matplotlib() -> None:
    """`import snapshotter.cli` leaves matplotlib unimported."""
    assert run_python(IMPORT_CLI) == "False"


def test_serve_help_does_not_import_matplotlib() -> None:
    """`lazysnap serve --help` leaves matplotlib unimported."""
    assert run_python(SERVE_HELP) == "False"


def test_matplotlib_is_an_extra_not_a_dependency() -> None:
    """pyproject lists matplotlib only under the bench extra."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("matplotlib") for dep in project["dependencies"])
    assert any(dep.startswith("matplotlib") for dep in project["optional-dependencies"]["bench"])
