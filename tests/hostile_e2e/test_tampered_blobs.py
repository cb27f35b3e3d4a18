"""Blob bytes that lie on the wire: a tampering proxy between ``lazysnap mount`` and the registry.

A read returns the original bytes or EIO, never what the proxy made up; the other files stay
readable, the daemon lives, and once the proxy stops tampering the same mount reads right.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from snapshotter.layers.sources import HOW_DOWNLOADED, HOW_ESTARGZ, HOW_STORED
from tests.support.hostile import (
    BIG,
    BIG_SIZE,
    SMALL,
    Victim,
    assert_all_correct,
    assert_daemon_alive,
    assert_one_line_error,
    contents,
    estargz_layer,
    honest_index,
    layer_stats,
    publish,
    push_victim,
    read_at,
    through,
    victim_entries,
)
from tests.support.lazysnap_cli import CliSession, push
from tests.support.registry import TestRegistry
from tests.support.tampering_proxy import FaultKind, TamperingProxy

FAR = BIG_SIZE - (700 << 10)  # an offset in BIG far from anything read before


def lazy_victim(registry: TestRegistry, fmt: str, seed: int) -> Victim:
    """A victim served lazily without a download: eStargz with its annotation, else with a published index."""
    victim = push_victim(registry, f"tamper-{fmt}", fmt, seed)
    if fmt != "estargz":
        publish(victim.ref, [honest_index(victim)])
    return victim


def expected_how(fmt: str) -> str:
    """How a lazy victim's layer is served."""
    return HOW_ESTARGZ if fmt == "estargz" else HOW_STORED


@pytest.mark.parametrize("fault", ["flip", "truncate", "503", "reset"])
@pytest.mark.parametrize("fmt", ["gzip", "zstd", "estargz"])
def test_a_corrupt_or_failed_range_gives_eio_then_recovers(
    fmt: str,
    fault: FaultKind,
    registry: TestRegistry,
    proxy: TamperingProxy,
    cli: CliSession,
    mountpoint: Path,
) -> None:
    """While the proxy flips, truncates, refuses (503) or resets blob reads, a cold read of that file fails with EIO, a cached file still reads right and the daemon lives; afterwards the same mount reads the right bytes."""
    victim = lazy_victim(registry, fmt, seed=21)
    cli.mount_ok(through(proxy, victim.image), mountpoint, "--no-background-fetch")
    assert layer_stats(cli, mountpoint)[0]["how"] == expected_how(fmt)
    assert (mountpoint / SMALL).read_bytes() == victim.files[SMALL]
    proxy.set_fault(fault, victim.image.layers[0].digest)
    assert read_at(mountpoint / BIG, FAR, 4096) == errno.EIO
    assert proxy.tampered > 0
    assert (mountpoint / SMALL).read_bytes() == victim.files[SMALL]
    assert_daemon_alive(cli, mountpoint)
    if fault == "flip":
        assert layer_stats(cli, mountpoint)[0]["integrity_failures"] > 0
    proxy.set_fault("none")
    assert read_at(mountpoint / BIG, FAR, 4096) == victim.files[BIG][FAR : FAR + 4096]
    assert_all_correct(mountpoint, victim.files)


@pytest.mark.parametrize("fmt", ["gzip", "zstd", "estargz"])
def test_a_whole_blob_answered_to_a_range_request_reads_right(
    fmt: str, registry: TestRegistry, proxy: TamperingProxy, cli: CliSession, mountpoint: Path
) -> None:
    """A registry that answers Range requests with 200 and the whole blob still gives the right bytes of every file."""
    victim = lazy_victim(registry, fmt, seed=22)
    proxy.set_fault("full200", victim.image.layers[0].digest)
    cli.mount_ok(through(proxy, victim.image), mountpoint, "--no-background-fetch")
    assert read_at(mountpoint / BIG, FAR, 4096) == victim.files[BIG][FAR : FAR + 4096]
    assert_all_correct(mountpoint, victim.files)
    assert proxy.tampered > 0
    assert_daemon_alive(cli, mountpoint)


def same_size_impostor(blob: bytes) -> bytes:
    """Another blob of the same length: every byte inverted."""
    return bytes(b ^ 0xFF for b in blob)


def unannotated_estargz_victim(registry: TestRegistry, seed: int) -> Victim:
    """An eStargz image whose layer lacks the toc.digest annotation."""
    entries = victim_entries(seed)
    layer = estargz_layer(entries, annotated=False)
    return Victim(push(registry.ref("estargz-unpinned"), [layer]), layer, contents(entries))


def test_estargz_without_its_annotation_is_indexed_during_download(
    registry: TestRegistry, cli: CliSession, mountpoint: Path
) -> None:
    """An eStargz layer without the toc.digest annotation is not served from its TOC (nothing pins it) but indexed during download, and reads right."""
    victim = unannotated_estargz_victim(registry, seed=23)
    cli.mount_ok(victim.ref, mountpoint, "--no-background-fetch")
    (stats,) = layer_stats(cli, mountpoint)
    assert stats["how"] == HOW_DOWNLOADED, stats
    assert_all_correct(mountpoint, victim.files)


@pytest.mark.parametrize("annotated", [False, True])
def test_a_same_size_impostor_blob_is_never_served(
    annotated: bool, registry: TestRegistry, proxy: TamperingProxy, cli: CliSession, mountpoint: Path
) -> None:
    """A different blob of the same size served for the layer's digest makes the mount fail naming the layer (its stream is not the blob, or its TOC fails the annotation): none of its bytes is ever shown."""
    victim = lazy_victim(registry, "estargz", 24) if annotated else unannotated_estargz_victim(registry, 24)
    digest = victim.image.layers[0].digest
    proxy.substitute[digest] = same_size_impostor(victim.layer.blob)
    result = cli.mount(through(proxy, victim.image), mountpoint, "--no-background-fetch")
    assert result.returncode != 0, result.stdout
    assert digest in result.stderr, result.stderr[-3000:]
    assert not list(mountpoint.iterdir())


def test_a_same_size_impostor_blob_is_reported_in_one_line(
    registry: TestRegistry, proxy: TamperingProxy, cli: CliSession, mountpoint: Path
) -> None:
    """A same-size impostor blob for an unannotated eStargz layer is reported by one line naming the layer."""
    victim = unannotated_estargz_victim(registry, seed=25)
    proxy.substitute[victim.image.layers[0].digest] = same_size_impostor(victim.layer.blob)
    result = cli.mount(through(proxy, victim.image), mountpoint, "--no-background-fetch")
    assert_one_line_error(result, victim.image.layers[0].digest)


@pytest.mark.parametrize("fmt", ["gzip", "estargz"])
def test_a_503_storm_then_recovery_in_the_same_mount(
    fmt: str, registry: TestRegistry, proxy: TamperingProxy, cli: CliSession, mountpoint: Path
) -> None:
    """During a storm of 503s every cold read fails with EIO; when the storm ends, the same mount reads every file right."""
    victim = lazy_victim(registry, fmt, seed=26)
    cli.mount_ok(through(proxy, victim.image), mountpoint, "--no-background-fetch")
    proxy.set_fault("503")
    outcomes = [read_at(mountpoint / BIG, offset, 4096) for offset in (FAR, FAR - (1 << 20), 1 << 20)]
    assert outcomes == [errno.EIO] * 3
    assert_daemon_alive(cli, mountpoint)
    proxy.set_fault("none")
    assert_all_correct(mountpoint, victim.files)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("fmt", ["gzip", "zstd", "estargz"])
def test_a_range_ignoring_registry_moves_each_blob_about_once(
    fmt: str,
    background: bool,
    registry: TestRegistry,
    proxy: TamperingProxy,
    cli: CliSession,
    mountpoint: Path,
) -> None:
    """Where every Range request is answered with the whole blob, reading every file moves at most 1.1 times the blob."""
    victim = lazy_victim(registry, fmt, seed=27)
    digest = victim.image.layers[0].digest
    proxy.set_fault("full200", digest)
    flags = () if background else ("--no-background-fetch",)
    cli.mount_ok(through(proxy, victim.image), mountpoint, *flags)
    assert_all_correct(mountpoint, victim.files)
    assert read_at(mountpoint / BIG, FAR, 4096) == victim.files[BIG][FAR : FAR + 4096]
    assert_daemon_alive(cli, mountpoint)
    moved = proxy.blob_bytes_sent[digest]
    print(f"range-ignored {fmt} background={background}: moved {moved} of {len(victim.layer.blob)} bytes")
    assert moved <= 1.1 * len(victim.layer.blob), (moved, len(victim.layer.blob))
