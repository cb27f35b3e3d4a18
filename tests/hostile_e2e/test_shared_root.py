"""Two ``lazysnap mount`` processes on one ``--root``: they share the blob cache and index store safely."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.hostile import assert_all_correct, assert_daemon_alive, push_victim
from tests.support.lazysnap_cli import CliSession
from tests.support.registry import TestRegistry

FORMATS = ["gzip", "zstd", "tar", "estargz"]


def mount_concurrently(cli: CliSession, ref: str, mountpoints: list[Path], flags: list[list[str]]) -> None:
    """Start one ``lazysnap mount`` per mount point at the same moment; fail unless all succeed."""
    results: dict[Path, subprocess.CompletedProcess[str]] = {}
    barrier = threading.Barrier(len(mountpoints))

    def run(mountpoint: Path, extra: list[str]) -> None:
        barrier.wait()
        results[mountpoint] = cli.mount(ref, mountpoint, *extra)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(mountpoints, flags, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mountpoint, result in results.items():
        assert result.returncode == 0, (mountpoint, result.stderr[-3000:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_mounts_started_together_on_one_root_both_read_right(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """Two mounts of one image with one root, started at the same moment, both serve every file's right bytes and neither dies."""
    victim = push_victim(registry, f"shared-{fmt}", fmt, seed=31)
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    mount_concurrently(cli, victim.ref, [first, second], [["--no-background-fetch"]] * 2)
    for mountpoint in (first, second):
        assert_all_correct(mountpoint, victim.files)
    for mountpoint in (first, second):
        assert_daemon_alive(cli, mountpoint)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mount_started_while_another_fills_the_cache_reads_right(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """A second mount started while the first one's background fetch fills the shared cache serves the right bytes, and so does the first."""
    victim = push_victim(registry, f"filling-{fmt}", fmt, seed=32)
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    cli.mount_ok(victim.ref, first)  # background fetch on: it is filling the cache now
    cli.mount_ok(victim.ref, second)
    threads = [threading.Thread(target=assert_all_correct, args=(m, victim.files)) for m in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_all_correct(second, victim.files)
    assert_all_correct(first, victim.files)
    for mountpoint in (first, second):
        assert_daemon_alive(cli, mountpoint)
