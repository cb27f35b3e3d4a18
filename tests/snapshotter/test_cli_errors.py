"""Every CLI error is one line on stderr naming its cause, with no traceback unless --verbose is given."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.config import UNIX_SOCKET_PATH_LIMIT

EXIT_FAILURE = 1
EXIT_USAGE = 2
REPO = Path(__file__).resolve().parents[2]
# Never reached: every error below is raised before a registry is contacted.
REFERENCE = "127.0.0.1:9/lazysnap/none:latest"
SHA512_REFERENCE = "127.0.0.1:9/lazysnap/none@sha512:" + "ab" * 64


def lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m snapshotter.cli ARGS`` and capture what it says (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """The command failed with ``code`` and said one line on stderr containing every needle."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lazysnap: ")
    for needle in needles:
        assert needle in lines[0]


def private_address(tmp_path: Path, command: list[str]) -> list[str]:
    """An --address under tmp_path for serve: with --root, a test that fails never serves on the host's."""
    return ["--address", str(tmp_path / "serve.sock")] if command == ["serve"] else []


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[Path]:
    """A directory on a read-only tmpfs (root only; skipped where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("command", [["mount", REFERENCE, "MNT"], ["index", "push", REFERENCE], ["serve"]])
def test_read_only_root(tmp_path: Path, mountpoint: Path, command: list[str]) -> None:
    """A --root on a read-only filesystem is refused in one line naming the root and the cause."""
    args = [str(mountpoint) if arg == "MNT" else arg for arg in command]
    with read_only_directory(tmp_path / "ro") as read_only:
        root = read_only / "state"
        result = lazysnap(*args, "--root", str(root), *private_address(tmp_path, command))
    assert_one_line(result, EXIT_FAILURE, str(root), "Read-only file system")


def test_root_too_long_for_the_control_socket(tmp_path: Path, mountpoint: Path) -> None:
    """A --root whose control socket path would exceed the unix socket limit is refused, naming the limit."""
    root = tmp_path / ("r" * 120)
    result = lazysnap("mount", REFERENCE, str(mountpoint), "--root", str(root))
    assert_one_line(result, EXIT_FAILURE, "unix socket path limit", f"{UNIX_SOCKET_PATH_LIMIT} bytes")


def test_address_too_long(tmp_path: Path) -> None:
    """serve refuses an --address over the unix socket path limit, naming the limit."""
    address = tmp_path / ("a" * 120) / "s.sock"
    result = lazysnap("serve", "--root", str(tmp_path / "root"), "--address", str(address))
    assert_one_line(result, EXIT_FAILURE, "address", "unix socket path limit")


@pytest.mark.parametrize("command", [["mount", REFERENCE, "MNT"], ["index", "push", REFERENCE], ["serve"]])
def test_invalid_log_level(tmp_path: Path, mountpoint: Path, command: list[str]) -> None:
    """An unknown log_level in the config file is refused at start, naming the key and the choices."""
    config = tmp_path / "config.toml"
    config.write_text('log_level = "loud"\n')
    args = [str(mountpoint) if arg == "MNT" else arg for arg in command]
    result = lazysnap(
        *args, "--config", str(config), "--root", str(tmp_path / "root"), *private_address(tmp_path, command)
    )
    assert_one_line(result, EXIT_FAILURE, "log_level", "loud", "debug, info")


@pytest.mark.parametrize("command", [["mount", SHA512_REFERENCE, "MNT"], ["index", "push", SHA512_REFERENCE]])
def test_sha512_digest_in_a_reference(tmp_path: Path, mountpoint: Path, command: list[str]) -> None:
    """A reference pinned by a sha512 digest is refused in one line saying only sha256 is supported."""
    args = [str(mountpoint) if arg == "MNT" else arg for arg in command]
    result = lazysnap(*args, "--root", str(tmp_path / "root"))
    assert_one_line(result, EXIT_FAILURE, "sha512", "only sha256")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[fetch]\nretries = -1\n", "fetch.retries"),
        ("[fetch]\ntimeout = 1\n", "fetch.timeout"),
        ("x = ", "TOML"),
    ],
)
def test_bad_config_files(tmp_path: Path, mountpoint: Path, text: str, needle: str) -> None:
    """A config with a bad value, an unknown key or broken TOML is one line naming the key."""
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = lazysnap("mount", REFERENCE, str(mountpoint), "--config", str(config))
    assert_one_line(result, EXIT_FAILURE, needle)


def test_missing_config_file(tmp_path: Path) -> None:
    """A --config that does not exist is one line naming the file."""
    result = lazysnap(
        "serve",
        "--config",
        str(tmp_path / "nope.toml"),
        "--root",
        str(tmp_path / "root"),
        "--address",
        "x.sock",
    )
    assert_one_line(result, EXIT_FAILURE, "nope.toml", "cannot read")


def test_verbose_adds_the_traceback(tmp_path: Path) -> None:
    """With --verbose (on the command or the group) the same error comes with its traceback."""
    config = tmp_path / "config.toml"
    config.write_text('log_level = "loud"\n')
    for args in (["serve", "--verbose"], ["--verbose", "serve"]):
        result = lazysnap(
            *args,
            "--config",
            str(config),
            "--root",
            str(tmp_path / "root"),
            *private_address(tmp_path, ["serve"]),
        )
        assert result.returncode == EXIT_FAILURE
        assert "Traceback" in result.stderr
        assert result.stderr.splitlines()[-1].startswith("lazysnap: ")
