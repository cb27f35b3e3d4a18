"""What lazysnap's mounts may do to the host: umount only its own mounts; no setuid, no devices, read-only."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.mount import is_mounted, mount_info
from snapshotter.devtools.image_builder import char_device, directory, file, make_layer
from tests.support.lazysnap_cli import CliSession, push
from tests.support.registry import TestRegistry

SETUID_ID = "usr/bin/id-setuid"
MOUNT_FLAGS = {"ro", "nosuid", "nodev"}


@pytest.fixture(scope="module")
def setuid_image(registry: TestRegistry) -> str:
    """An image holding a setuid-root copy of id(1) and a device node for the host's /dev/null."""
    layer = make_layer(
        [
            directory("usr"),
            directory("usr/bin"),
            file(SETUID_ID, Path("/usr/bin/id").read_bytes(), mode=0o4755),
            directory("dev"),
            char_device("dev/null-too", 1, 3),
        ],
        "gzip",
    )
    return str(push(registry.ref("setuid"), [layer]).reference)


@pytest.fixture
def open_mountpoint() -> Iterator[Path]:
    """An empty directory any user can reach (pytest's tmp dirs are root-only), removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="lazysnap-mnt-"))
    parent.chmod(0o755)
    (parent / "mnt").mkdir(mode=0o755)
    try:
        yield parent / "mnt"
    finally:
        if is_mounted(str(parent / "mnt")):
            subprocess.run(["umount", "-l", str(parent / "mnt")], check=False)
        shutil.rmtree(parent, ignore_errors=True)


def effective_uid_as_nobody(program: Path) -> str:
    """Run ``program -u`` (id's effective uid) as user nobody and return what it prints."""
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(program), "-u"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def assert_safe_flags(mountpoint: Path) -> None:
    """The mount at ``mountpoint`` is read-only, nosuid and nodev, in mountinfo and for the kernel."""
    info = mount_info(str(mountpoint))
    assert info is not None
    assert info.options >= MOUNT_FLAGS, info.options
    flags = os.statvfs(mountpoint).f_flag
    assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV


class TestUmountRefusesForeignMounts:
    """``lazysnap umount`` removes only what lazysnap mounted."""

    def test_a_tmpfs_is_left_mounted(self, cli: CliSession, tmp_path: Path) -> None:
        """``lazysnap umount`` of a tmpfs exits non-zero with one line naming it, and the tmpfs stays mounted with its files."""
        target = tmp_path / "tmpfs"
        target.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "lazysnap-test-tmpfs", str(target)], check=True
        )
        try:
            (target / "keep").write_text("mine")
            result = cli.umount(target)
            assert result.returncode != 0
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert "not a lazysnap mount" in lines[0]
            assert "tmpfs" in lines[0] and "lazysnap-test-tmpfs" in lines[0]
            assert is_mounted(str(target))
            assert (target / "keep").read_text() == "mine"
        finally:
            subprocess.run(["umount", str(target)], check=False)

    def test_a_tmpfs_over_an_eager_mount_is_left_mounted(
        self, cli: CliSession, setuid_image: str, tmp_path: Path
    ) -> None:
        """A tmpfs mounted over an eager mount is not taken for it: umount refuses and both stay."""
        target = tmp_path / "eager"
        target.mkdir()
        cli.mount_ok(setuid_image, target, "--eager")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "over", str(target)], check=True)
        try:
            result = cli.umount(target)
            assert result.returncode != 0
            assert "tmpfs" in result.stderr
            info = mount_info(str(target))
            assert info is not None and info.fstype == "tmpfs"
        finally:
            subprocess.run(["umount", str(target)], check=False)
        assert cli.umount(target).returncode == 0
        assert not is_mounted(str(target))

    def test_an_eager_mount_is_unmounted(self, cli: CliSession, setuid_image: str, tmp_path: Path) -> None:
        """``lazysnap umount`` of an eager mount lazysnap made unmounts it and exits 0."""
        target = tmp_path / "eager"
        target.mkdir()
        cli.mount_ok(setuid_image, target, "--eager")
        result = cli.umount(target)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(str(target))


class TestNoSetuidNoDevices:
    """An image's setuid binaries and device nodes give nobody anything, lazy or eager."""

    @pytest.mark.parametrize("mode", ["eager", "lazy"])
    def test_mount_is_readonly_nosuid_nodev(
        self, cli: CliSession, setuid_image: str, open_mountpoint: Path, mode: str
    ) -> None:
        """The mount's options include ro, nosuid and nodev, and the image's setuid-root id runs as the caller."""
        flags = ["--eager"] if mode == "eager" else ["--no-background-fetch"]
        cli.mount_ok(setuid_image, open_mountpoint, *flags)
        binary = open_mountpoint / SETUID_ID
        assert binary.stat().st_mode & 0o4000 and binary.stat().st_uid == 0  # the bit is shown...
        assert_safe_flags(open_mountpoint)
        nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True)
        assert effective_uid_as_nobody(binary) == nobody.stdout.strip()  # ...and not honoured
        with pytest.raises(PermissionError):
            (open_mountpoint / "dev" / "null-too").open("rb")
        assert cli.umount(open_mountpoint).returncode == 0


def test_two_eager_mounts_of_one_image_on_one_root_keep_their_trees(
    cli: CliSession, setuid_image: str, tmp_path: Path
) -> None:
    """A second eager mount of an image on the same root leaves the first one's tree whole, and umount removes each unpacked tree."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    cli.mount_ok(setuid_image, first, "--eager")
    cli.mount_ok(setuid_image, second, "--eager")
    assert (first / SETUID_ID).read_bytes() == Path("/usr/bin/id").read_bytes()
    assert cli.umount(second).returncode == 0
    assert (first / SETUID_ID).read_bytes() == Path("/usr/bin/id").read_bytes()
    assert cli.umount(first).returncode == 0
    assert list((cli.root / "eager").glob("*/*/rootfs")) == []
