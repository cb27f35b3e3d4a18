"""Two ``lazysnap mount`` processes on one ``--root``: they share the blob cache and index store safely."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from snapshotter.mount.state import pid_alive
from tests.support.hostile import (
    assert_all_correct,
    assert_daemon_alive,
    contents,
    estargz_layer,
    layer_stats,
    push_victim,
    victim_entries,
)
from tests.support.lazysnap_cli import CliSession, push, wait_for
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


SLOW_FILL = """\
[cache]
background_request_bytes = 65536  # one span a request: a fill that can be killed halfway
[background_fetch]
delay_seconds = 0
quiet_seconds = 0
"""


def presence_files(root: Path, digest: str) -> list[Path]:
    """The shared presence maps of a blob in the cache under ``root``, one per chunk size."""
    return sorted((root / "cache" / "sha256" / digest[7:]).glob("chunks-*/present"))


def trusted_chunks_are_right(root: Path, digest: str, blob: bytes) -> int:
    """Fail unless every chunk a presence map marks present holds the blob's bytes; return how many are marked."""
    marked = 0
    for present in presence_files(root, digest):
        chunk = int(present.parent.name.removeprefix("chunks-"))
        data = (present.parent / "data").read_bytes()
        for index, byte in enumerate(present.read_bytes()):
            if byte:
                marked += 1
                start = index * chunk
                assert data[start : start + chunk] == blob[start : start + chunk], (present, index)
    return marked


@pytest.mark.parametrize("fmt", ["gzip", "estargz"])
def test_a_mount_killed_mid_fill_leaves_a_cache_trusted_only_where_right(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """A mount killed with SIGKILL while filling the cache leaves only right chunks marked, no verified marker, and a later mount on the same root reads right and verifies the layer."""
    victim = push_victim(registry, f"killed-{fmt}", fmt, seed=33)
    digest, blob = victim.image.layers[0].digest, victim.layer.blob
    config = tmp_path / "slow-fill.toml"
    config.write_text(SLOW_FILL)
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    if fmt == "gzip":
        # A first mount downloads and indexes the layer whole; with the index stored and the
        # cache emptied, the next mount serves it lazily and fills the cache in the background.
        cli.mount_ok(victim.ref, first, "--no-background-fetch")
        assert cli.umount(first).returncode == 0
        shutil.rmtree(cli.root / "cache")
    cli.mount_ok(victim.ref, first, "--config", str(config))
    pid = cli.daemon_pid(first)
    assert pid is not None

    def halfway() -> bool:
        marks = b"".join(path.read_bytes() for path in presence_files(cli.root, digest))
        return marks.count(1) >= 8

    assert wait_for(halfway, timeout=30, interval=0.002)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(pid), timeout=10)
    marked = trusted_chunks_are_right(cli.root, digest, blob)
    total = sum(
        -(-len(blob) // int(path.parent.name.removeprefix("chunks-")))
        for path in presence_files(cli.root, digest)
    )
    assert 0 < marked < total, "killed before or after the fill, not during it"
    assert not list((cli.root / "cache" / "sha256" / digest[7:]).glob("chunks-*/verified"))
    subprocess.run(["umount", "-l", str(first)], check=False, capture_output=True)  # the dead FUSE mount
    cli.mount_ok(victim.ref, second, "--config", str(config))
    assert_all_correct(second, victim.files)
    assert wait_for(lambda: all(layer["verified"] for layer in layer_stats(cli, second)), timeout=60)
    assert trusted_chunks_are_right(cli.root, digest, blob) > 0


def test_two_mounts_caching_one_blob_in_two_chunk_sizes_both_read_right(
    registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """An unannotated eStargz layer mounted at once from its TOC (4 KiB chunks) and by download (64 KiB spans) on one root reads right in both, and so does a third mount afterwards."""
    entries = victim_entries(seed=34)
    image = push(registry.ref("two-geometries"), [estargz_layer(entries, annotated=False)])
    ref = str(dataclasses.replace(image.reference, digest=None))
    files = contents(entries)
    unpinned = tmp_path / "unpinned.toml"
    unpinned.write_text("[layers]\nallow_unpinned_toc = true\n")
    from_toc, downloaded, later = tmp_path / "toc", tmp_path / "download", tmp_path / "later"
    for directory in (from_toc, downloaded, later):
        directory.mkdir()
    mount_concurrently(cli, ref, [from_toc, downloaded], [["--config", str(unpinned)], []])
    assert layer_stats(cli, from_toc)[0]["index_source"] != layer_stats(cli, downloaded)[0]["index_source"]
    assert len(presence_files(cli.root, image.layers[0].digest)) == 2  # one map per chunk size
    threads = [threading.Thread(target=assert_all_correct, args=(m, files)) for m in (from_toc, downloaded)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_all_correct(from_toc, files)
    assert_all_correct(downloaded, files)
    cli.mount_ok(ref, later, "--config", str(unpinned))
    assert_all_correct(later, files)
    for mountpoint in (from_toc, downloaded, later):
        assert_daemon_alive(cli, mountpoint)
