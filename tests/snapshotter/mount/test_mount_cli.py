"""``lazysnap mount/umount`` as processes: bad input, exit codes, and daemons that never leave a dead mount."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fusefs.mount import is_mounted
from snapshotter.devtools.image_builder import directory, file, make_layer
from snapshotter.mount.state import pid_alive, record_path
from tests.support.lazysnap_cli import CliSession, push, wait_for
from tests.support.registry import TestRegistry

EXIT_USAGE = 2
EXIT_FAILURE = 1
STOPS_WITHIN = 15.0  # seconds for a daemon to unmount and exit


@pytest.fixture(scope="module")
def image_ref(registry: TestRegistry) -> str:
    """A small one-layer image in the session registry."""
    layer = make_layer([directory("etc"), file("etc/hostname", "box\n")], "gzip")
    return str(push(registry.ref("cli"), [layer]).reference)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def assert_nothing_left(cli: CliSession, mountpoint: Path) -> None:
    """No mount, no mount record, and a directory that answers (not a dead FUSE endpoint)."""
    assert not is_mounted(str(mountpoint))
    assert not record_path(str(cli.root), str(mountpoint)).exists()
    os.listdir(mountpoint)  # raises ENOTCONN on a dead mount


def test_mount_on_a_non_empty_directory_is_a_usage_error(
    cli: CliSession, image_ref: str, mountpoint: Path
) -> None:
    """Mounting on a directory with something in it exits 2 with a message saying so, and mounts nothing."""
    (mountpoint / "precious").write_text("keep me")
    result = cli.mount(image_ref, mountpoint)
    assert result.returncode == EXIT_USAGE
    assert "not empty" in result.stderr
    assert_nothing_left(cli, mountpoint)
    assert (mountpoint / "precious").read_text() == "keep me"


def test_mount_on_a_missing_directory_is_a_usage_error(
    cli: CliSession, image_ref: str, tmp_path: Path
) -> None:
    """Mounting on a path that is not a directory exits 2 with a message saying so."""
    result = cli.mount(image_ref, tmp_path / "nowhere")
    assert result.returncode == EXIT_USAGE
    assert "not a directory" in result.stderr
    assert not is_mounted(str(tmp_path / "nowhere"))


def test_mount_on_a_mounted_directory_is_a_usage_error(
    cli: CliSession, image_ref: str, mountpoint: Path
) -> None:
    """A second mount on the same directory exits 2 and leaves the first mount working."""
    cli.mount_ok(image_ref, mountpoint)
    result = cli.mount(image_ref, mountpoint)
    assert result.returncode == EXIT_USAGE
    assert "already mounted" in result.stderr
    assert (mountpoint / "etc/hostname").read_text() == "box\n"
    assert cli.umount(mountpoint).returncode == 0
    assert_nothing_left(cli, mountpoint)


@pytest.mark.parametrize("problem", ["unknown repository", "unknown tag", "no registry"])
def test_unresolvable_reference_fails_cleanly(
    problem: str, cli: CliSession, registry: TestRegistry, image_ref: str, mountpoint: Path
) -> None:
    """A reference that can't be resolved exits 1 with a message naming it, and leaves nothing mounted or running."""
    ref = {
        "unknown repository": str(registry.ref("never-pushed")),
        "unknown tag": image_ref.split("@")[0].rsplit(":", 1)[0] + ":no-such-tag",
        "no registry": "127.0.0.1:9/test/image:latest",  # discard port: nothing listens there
    }[problem]
    result = cli.mount(ref, mountpoint)
    assert result.returncode == EXIT_FAILURE, result.stderr
    assert ref.split("/")[0] in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_left(cli, mountpoint)
    assert cli.daemon_pid(mountpoint) is None


def test_umount_stops_the_daemon(cli: CliSession, image_ref: str, mountpoint: Path) -> None:
    """``lazysnap umount`` unmounts, the daemon exits, and stats then says it is not a mount."""
    cli.mount_ok(image_ref, mountpoint)
    pid = cli.daemon_pid(mountpoint)
    assert pid is not None and pid_alive(pid)
    assert cli.umount(mountpoint).returncode == 0
    assert wait_for(lambda: not pid_alive(pid), STOPS_WITHIN)
    assert_nothing_left(cli, mountpoint)
    stats = cli.run("stats", "--root", str(cli.root), str(mountpoint))
    assert stats.returncode == EXIT_USAGE
    assert "not a lazysnap mount" in stats.stderr


def test_umount_of_an_unmounted_directory_is_a_usage_error(cli: CliSession, mountpoint: Path) -> None:
    """``lazysnap umount`` on a directory with nothing mounted exits 2 and says so."""
    result = cli.umount(mountpoint)
    assert result.returncode == EXIT_USAGE
    assert "not mounted" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_stops_the_daemon(
    signum: signal.Signals, cli: CliSession, image_ref: str, mountpoint: Path
) -> None:
    """SIGTERM or SIGINT to the daemon unmounts the image and ends the daemon, leaving no dead mount."""
    cli.mount_ok(image_ref, mountpoint)
    pid = cli.daemon_pid(mountpoint)
    assert pid is not None
    os.kill(pid, signum)
    assert wait_for(lambda: not pid_alive(pid), STOPS_WITHIN)
    assert_nothing_left(cli, mountpoint)
