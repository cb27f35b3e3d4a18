"""``lazysnap mount`` end to end: a real registry, the real CLI and daemon, compared with ``--eager``."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fusefs.mount import is_mounted
from snapshotter.devtools.image_builder import Layer, PushedImage, TarEntry, file, make_layer
from snapshotter.layers.sources import HOW_DOWNLOADED, HOW_ESTARGZ, HOW_STORED, TOC_DIGEST_ANNOTATION
from snapshotter.mount.state import pid_alive
from snapshotter.remote.request import RetryPolicy
from tests.support.estargz_writer import TOC_NAME, build_estargz
from tests.support.lazysnap_cli import CliSession, push, wait_for
from tests.support.registry import TestRegistry
from tests.support.tcp_proxy import TcpProxy
from tests.support.tree_compare import layer_entries, snapshot

FORMATS = ["gzip", "zstd", "tar", "estargz"]
FIRST_HOW = {"gzip": HOW_DOWNLOADED, "zstd": HOW_DOWNLOADED, "tar": HOW_DOWNLOADED, "estargz": HOW_ESTARGZ}
ZSTD_FRAME = 256 << 10
ESTARGZ_CHUNK = 1 << 20


def directories(tmp_path: Path, *names: str) -> list[Path]:
    """Fresh empty directories under ``tmp_path``."""
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.mkdir()
    return paths


def build_layers(fmt: str, layers: Sequence[Sequence[TarEntry]]) -> list[Layer]:
    """Each entry list as a layer in ``fmt``: gzip, multi-frame zstd, plain tar, or eStargz."""
    if fmt == "zstd":
        return [make_layer(entries, "zstd", frame_size=ZSTD_FRAME) for entries in layers]
    if fmt != "estargz":
        return [make_layer(entries, "gzip" if fmt == "gzip" else "tar") for entries in layers]
    result = []
    for entries in layers:
        written = build_estargz(entries, chunk_size=ESTARGZ_CHUNK)
        annotations = {TOC_DIGEST_ANNOTATION: written.toc_digest}
        result.append(Layer(written.tar, written.blob, "gzip", annotations=annotations))
    return result


def fidelity_layers() -> list[list[TarEntry]]:
    """The shared fidelity image plus files of several MiB, so gzip checkpoints and zstd frames matter."""
    base, middle, top = layer_entries()
    rng = random.Random(4)
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(150_000))
    base += [file("big/random.bin", rng.randbytes(3 << 20)), file("big/text.txt", text)]
    middle += [file("big/random.bin", rng.randbytes((2 << 20) + 12345), mode=0o600)]
    return [base, middle, top]


def metadata_walk(root: Path) -> int:
    """lstat, list xattrs of and readlink every path under ``root`` without reading file data; return the count."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            for key in os.listxattr(path, follow_symlinks=False):
                os.getxattr(path, key, follow_symlinks=False)
            if os.path.islink(path):
                os.readlink(path)
            count += st.st_nlink > 0
    return count


def layer_stats(cli: CliSession, mountpoint: Path) -> list[dict[str, Any]]:
    """The per-layer statistics of a running mount."""
    layers: list[dict[str, Any]] = cli.stats(mountpoint)["layers"]
    return layers


def assert_same_tree(lazy: dict[str, Any], eager: dict[str, Any], fmt: str) -> None:
    """Both views hold the same paths with the same metadata and content."""
    if fmt == "estargz":
        # An eager unpack writes the TOC as a file, as containerd's plain unpack of eStargz does;
        # the lazy view hides it, as stargz-snapshotter does.
        eager = {path: info for path, info in eager.items() if path != TOC_NAME}
        # The TOC records modtime in whole seconds (RFC 3339 without fractions), so sub-second
        # mtimes of the tar headers can't survive; stargz-snapshotter shows the same.
        eager = {
            path: {**info, "mtime_ns": info["mtime_ns"] // 10**9 * 10**9} for path, info in eager.items()
        }
    assert sorted(lazy) == sorted(eager)
    for path in sorted(eager):
        assert lazy[path] == eager[path], path


@pytest.mark.parametrize("fmt", FORMATS)
def test_lazy_mount_matches_eager_mount(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """A lazy mount, first fresh and then from a stored index with an empty cache, equals the eager mount in every path's metadata and content."""
    image: PushedImage = push(registry.ref(f"fidelity-{fmt}"), build_layers(fmt, fidelity_layers()))
    ref = str(image.reference)
    eager_dir, lazy_dir = directories(tmp_path, "eager", "lazy")
    cli.mount_ok(ref, eager_dir, "--eager")
    eager = snapshot(eager_dir)
    assert cli.umount(eager_dir).returncode == 0

    cli.mount_ok(ref, lazy_dir, "--no-background-fetch")
    assert [layer["how"] for layer in layer_stats(cli, lazy_dir)] == [FIRST_HOW[fmt]] * 3
    assert_same_tree(snapshot(lazy_dir), eager, fmt)
    assert cli.umount(lazy_dir).returncode == 0

    shutil.rmtree(cli.root / "cache")
    cli.mount_ok(ref, lazy_dir, "--no-background-fetch")
    assert metadata_walk(lazy_dir) == len(eager) - (fmt == "estargz")
    before = layer_stats(cli, lazy_dir)
    assert [layer["how"] for layer in before] == [HOW_STORED] * 3
    assert [layer["bytes_fetched"] for layer in before] == [0, 0, 0]
    assert_same_tree(snapshot(lazy_dir), eager, fmt)
    after = layer_stats(cli, lazy_dir)
    assert all(layer["bytes_fetched"] > 0 for layer in after)
    assert not any(layer["integrity_failures"] for layer in after)
    assert cli.umount(lazy_dir).returncode == 0


LARGE_FILES = 96
LARGE_FILE_SIZE = 256 << 10  # 96 x 256 KiB = 24 MiB of incompressible data
SMALL = "etc/small.conf"


def large_layer_entries() -> list[TarEntry]:
    """Many incompressible files, with one small file in the middle of the layer."""
    rng = random.Random(7)
    entries = [file(f"data/{i:03d}.bin", rng.randbytes(LARGE_FILE_SIZE)) for i in range(LARGE_FILES)]
    entries.insert(LARGE_FILES // 2, file(SMALL, "key = value\n"))
    return entries


def store_index_only(cli: CliSession, ref: str, mountpoint: Path) -> None:
    """Mount once so the layer indexes are stored, then drop the blob cache: the next mount is lazy and cold."""
    cli.mount_ok(ref, mountpoint, "--no-background-fetch")
    assert cli.umount(mountpoint).returncode == 0
    shutil.rmtree(cli.root / "cache")


@pytest.mark.parametrize("fmt", ["estargz", "gzip"])
def test_reading_one_file_fetches_a_small_part_of_the_layer(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """Mounting and reading one small file transfers a few percent of a large layer, and the stats count what the registry sent."""
    (layer,) = build_layers(fmt, [large_layer_entries()])
    ref = str(push(registry.ref(f"lazy-{fmt}"), [layer]).reference)
    (mountpoint,) = directories(tmp_path, "mnt")
    if fmt != "estargz":
        store_index_only(cli, ref, mountpoint)
    mark = registry.mark()
    cli.mount_ok(ref, mountpoint, "--no-background-fetch")
    assert (mountpoint / SMALL).read_bytes() == b"key = value\n"
    sent = registry.bytes_sent_since(mark, method="GET")
    (stats,) = layer_stats(cli, mountpoint)
    assert stats["how"] == (HOW_ESTARGZ if fmt == "estargz" else HOW_STORED)
    assert sent < len(layer.blob) // 10, (sent, len(layer.blob))
    # The registry also sent the manifest and config (a few KiB) that the layer stats don't count.
    assert stats["bytes_fetched"] <= sent <= stats["bytes_fetched"] + 16 << 10, (sent, stats)
    assert stats["bytes_present"] < len(layer.blob) // 10


def test_background_fetch_completes_and_verifies_the_layer(
    registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """Without --no-background-fetch, a lazily served layer becomes fully present and verified within a bounded time."""
    (layer,) = build_layers("estargz", [large_layer_entries()[32:65]])
    ref = str(push(registry.ref("background"), [layer]).reference)
    (mountpoint,) = directories(tmp_path, "mnt")
    cli.mount_ok(ref, mountpoint)
    deadline = time.monotonic() + 30
    # The blob digest is checked first, the DiffID (a whole decompression) after it: wait for both.
    while time.monotonic() < deadline:
        stats = layer_stats(cli, mountpoint)[0]
        if stats["verified"] and stats["diff_id_verified"]:
            break
        time.sleep(0.2)
    assert stats["verified"] and stats["diff_id_verified"], stats
    assert stats["bytes_present"] == len(layer.blob)
    assert stats["background_bytes"] > 0
    assert not cli.stats(mountpoint)["background_errors"]
    assert (mountpoint / SMALL).read_bytes() == b"key = value\n"


FAULT_FILES = 24  # 24 x 256 KiB: several gzip checkpoints on each side of the small file
BIG_FILE = "data/big.bin"
READ_FAILS_WITHIN = 30.0  # seconds: the registry client's bounded retries, with room for a slow machine
DEFAULT_ATTEMPTS = RetryPolicy().max_retries + 1  # what `lazysnap mount` uses


def fault_image(registry: TestRegistry, fmt: str) -> tuple[PushedImage, Layer, bytes]:
    """A one-layer image: large files around the small one, and BIG_FILE (whose bytes are returned too)."""
    middle = LARGE_FILES // 2
    entries = large_layer_entries()[middle - FAULT_FILES // 2 : middle + FAULT_FILES // 2 + 1]
    big = random.Random(9).randbytes(4 << 20)
    (layer,) = build_layers(fmt, [[*entries, file(BIG_FILE, big)]])
    return push(registry.ref(f"fault-{fmt}"), [layer]), layer, big


def read_at(path: Path, offset: int, length: int) -> bytes:
    """Read ``length`` bytes of ``path`` at ``offset`` with one pread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_registry_gone_mid_read_gives_eio_then_recovers(
    registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """While the registry is unreachable a read fails with EIO within a bounded time; once it is back the same read returns the right bytes."""
    image, _, content = fault_image(registry, "estargz")
    (mountpoint,) = directories(tmp_path, "mnt")
    with TcpProxy("127.0.0.1", registry.registry.port) as proxy:
        ref = f"{proxy.host}/{image.reference.repository}@{image.manifest_digest}"
        cli.mount_ok(ref, mountpoint, "--no-background-fetch")
        path = mountpoint / BIG_FILE
        assert read_at(path, 0, 4096) == content[:4096]
        proxy.cut()
        with pytest.raises(OSError) as failure:
            read_at(path, 3_500_000, 4096)
        assert failure.value.errno == errno.EIO
        # Bounded by the retry count, not by the FUSE read deadline: the default retries, then EIO.
        assert f"failed after {DEFAULT_ATTEMPTS} attempt(s)" in cli.daemon_log()
        proxy.restore()
        assert read_at(path, 3_500_000, 4096) == content[3_500_000:3_504_096]
        assert path.read_bytes() == content
    (stats,) = layer_stats(cli, mountpoint)
    assert stats["integrity_failures"] == 0
    assert "read-failed" in cli.daemon_log()


def registry_blob_path(registry: TestRegistry, digest: str) -> Path:
    """Where docker-registry keeps a blob's bytes."""
    hexpart = digest.partition(":")[2]
    return registry.registry.root / f"storage/docker/registry/v2/blobs/sha256/{hexpart[:2]}/{hexpart}/data"


@contextlib.contextmanager
def tampered(path: Path, start: int, end: int) -> Iterator[None]:
    """Invert bytes [start, end) of a file for the duration of the block."""
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[start:end] = bytes(b ^ 0xFF for b in original[start:end])
    path.write_bytes(bytes(damaged))
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("fmt", ["gzip", "estargz"])
def test_corrupt_bytes_from_the_registry_give_eio_and_a_log_line(
    fmt: str, registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """Bytes that fail their digest are never returned: the read fails with EIO, the log names the layer and offset, and a later read of good bytes succeeds."""
    image, layer, _ = fault_image(registry, fmt)
    ref = str(image.reference)
    (mountpoint,) = directories(tmp_path, "mnt")
    store_index_only(cli, ref, mountpoint)
    # Spoil the compressed bytes around the small file, after the index was stored. Its data sits
    # among incompressible files, so its offset in the blob is close to its offset in the tar.
    near = layer.tar.index(b"key = value\n")
    with tampered(registry_blob_path(registry, layer.digest), near - (512 << 10), near + (64 << 10)):
        cli.mount_ok(ref, mountpoint, "--no-background-fetch")
        with pytest.raises(OSError) as failure:
            (mountpoint / SMALL).read_bytes()
        assert failure.value.errno == errno.EIO
    log = cli.daemon_log()
    assert re.search(rf"read-failed layer=0 path={SMALL} offset=0 .*{layer.digest}", log), log[-3000:]
    # Where in the blob: the span the cache rejected (gzip), or the eStargz chunk the reader rejected.
    where = (
        r"span \d+ \(bytes \d+-\d+\)" if fmt == "gzip" else r"chunk-integrity-failure .* blob_bytes=\d+-\d+"
    )
    assert re.search(rf"{layer.digest} {where}" if fmt == "gzip" else where, log), log[-3000:]
    assert (mountpoint / SMALL).read_bytes() == b"key = value\n"
    (stats,) = layer_stats(cli, mountpoint)
    assert stats["integrity_failures"] >= 1


def test_sigterm_during_a_stuck_read_unmounts(
    registry: TestRegistry, cli: CliSession, tmp_path: Path
) -> None:
    """SIGTERM while a read waits on an unreachable registry still unmounts and ends the daemon; the reader gets an error, not a hang."""
    image, _, _ = fault_image(registry, "estargz")
    (mountpoint,) = directories(tmp_path, "mnt")
    with TcpProxy("127.0.0.1", registry.registry.port) as proxy:
        ref = f"{proxy.host}/{image.reference.repository}@{image.manifest_digest}"
        cli.mount_ok(ref, mountpoint, "--no-background-fetch")
        pid = cli.daemon_pid(mountpoint)
        assert pid is not None
        proxy.cut()
        outcome: list[BaseException | bytes] = []
        reader = threading.Thread(target=lambda: outcome.append(_try_read(mountpoint / BIG_FILE)))
        reader.start()
        time.sleep(0.5)  # the read is now waiting on the registry's retries
        os.kill(pid, signal.SIGTERM)
        reader.join(timeout=READ_FAILS_WITHIN)
        assert not reader.is_alive()
        assert wait_for(lambda: not pid_alive(pid), READ_FAILS_WITHIN)
    assert isinstance(outcome[0], OSError), outcome
    assert not is_mounted(str(mountpoint))
    os.listdir(mountpoint)  # raises ENOTCONN on a dead mount


def _try_read(path: Path) -> BaseException | bytes:
    try:
        return read_at(path, 3_500_000, 4096)
    except OSError as error:
        return error
