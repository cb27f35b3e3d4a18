"""End to end: real containerd and runc pull and run images through ``lazysnap serve`` as a proxy plugin.

Every test starts containerd in a private mount namespace with lazysnap's daemon inside the same
namespace (``tests/support/snapshotter_stack.py``), pulls busybox-based images from a local
docker-registry with ``ctr-remote image rpull`` and runs them with ``ctr run``.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from index.estargz import TOC_DIGEST_ANNOTATION
from snapshotter.devtools.containerd_env import CTR_REMOTE, DEFAULT_NAMESPACE, containerd_available
from snapshotter.devtools.image_builder import (
    Layer,
    TarEntry,
    directory,
    file,
    make_layer,
    push_image,
    symlink,
)
from snapshotter.devtools.local_registry import LocalRegistry
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import Reference
from snapshotter.service.chain_ids import chain_ids
from tests.support.containerd import run_shell
from tests.support.estargz_writer import build_estargz
from tests.support.lazysnap_cli import index_push
from tests.support.registry import TestRegistry
from tests.support.snapshotter_stack import SNAPSHOTTER, LazysnapStack

BUSYBOX = Path("/bin/busybox")
pytestmark = [
    pytest.mark.containerd,
    pytest.mark.skipif(
        not (containerd_available() and shutil.which("ctr-remote") and BUSYBOX.exists()),
        reason="needs root, containerd, runc, ctr-remote and busybox-static (scripts/setup.sh)",
    ),
]

LOWER_TEXT = "from the lowest layer\n"
TOP_TEXT = "from the top layer\n"
SMALL_TEXT = "a small file next to the big one\n"
BIG_SIZE = 8 << 20  # incompressible, so the blob is as large as the data
APPLETS = ("sh", "cat", "echo", "wc", "head", "ls", "true")
#: Background fetch off, so the registry's log counts only what the container's reads needed.
NO_BACKGROUND = "[background_fetch]\nenabled = false\n"
#: Registry failures surface quickly: short timeouts, few retries.
FAST_FAILURE = (
    "[fetch]\ntimeout_seconds = 3.0\nconnect_timeout_seconds = 1.0\nretries = 2\nbackoff_seconds = 0.1\n"
    "[fuse]\nread_timeout_seconds = 4.0\n"
)


def output(stack: LazysnapStack, ref: str, container: str, script: str, timeout: float = 120) -> str:
    """What ``sh -c script`` printed in a new container of ``ref`` on lazysnap (read from a file: see run_shell)."""
    return run_shell(stack, ref, container, script, ctr_args=("--snapshotter", SNAPSHOTTER), timeout=timeout)


@dataclass(frozen=True)
class TestImage:
    """A pushed image and what its layers weigh in the registry."""

    __test__ = False

    ref: str
    layer_digests: list[str]
    layer_bytes: int
    chain_ids: list[str]


def _entries(name: str) -> list[list[TarEntry]]:
    """Three layers: busybox and a text file; a big random file; a small top layer; each unique to ``name``."""
    base = [directory(d) for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "data")]
    base.append(file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755))
    base += [symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    base.append(file("etc/lower.txt", LOWER_TEXT))
    big = [
        directory("data"),
        file("data/big.bin", random.Random(5).randbytes(BIG_SIZE)),
        file("data/small.txt", SMALL_TEXT),
    ]
    top = [directory("etc"), file("etc/top.txt", TOP_TEXT)]
    # A file naming the image makes every blob unique, so no test finds another's index or cache.
    return [[*entries, file(f"etc/layer-{n}", name)] for n, entries in enumerate([base, big, top])]


def _estargz_layer(entries: Sequence[TarEntry]) -> Layer:
    blob = build_estargz(entries)
    return Layer(blob.tar, blob.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: blob.toc_digest})


def _push(ref: Reference, layers: Sequence[Layer]) -> TestImage:
    async def run() -> TestImage:
        async with RegistryClient(docker_config_path="/nonexistent/config.json") as client:
            pushed = await push_image(client, ref, layers, config={"Cmd": ["/bin/sh"]})
        return TestImage(
            f"{ref.registry}/{ref.repository}:{ref.tag}",
            [layer.digest for layer in pushed.layers],
            sum(layer.size for layer in pushed.layers),
            chain_ids(pushed.diff_ids),
        )

    return trio.run(run)


def push_estargz(registry: TestRegistry | LocalRegistry, name: str) -> TestImage:
    """Push the test image with eStargz layers (TOC digests annotated)."""
    return _push(_ref(registry, name), [_estargz_layer(entries) for entries in _entries(name)])


def push_gzip(registry: TestRegistry | LocalRegistry, name: str, *, index: bool, tmp: Path) -> TestImage:
    """Push the test image with plain gzip layers, and publish its indexes if ``index``."""
    image = _push(_ref(registry, name), [make_layer(entries, "gzip") for entries in _entries(name)])
    if index:
        index_push(image.ref, tmp, "--plain-http")
    return image


def _ref(registry: TestRegistry | LocalRegistry, name: str) -> Reference:
    if isinstance(registry, TestRegistry):
        return registry.ref(name)
    return Reference(registry.host, f"test/{name}", "latest", None)


def layer_bytes_since(registry: TestRegistry | LocalRegistry, mark: int, image: TestImage) -> int:
    """Bytes of the image's layer blobs the registry sent after ``mark``."""
    target = registry.registry if isinstance(registry, TestRegistry) else registry
    return sum(
        request.written
        for request in target.requests_since(mark)
        if request.method == "GET" and any(request.uri.endswith(f"/blobs/{d}") for d in image.layer_digests)
    )


def prepared_lines(log: str, value: str) -> list[str]:
    """The daemon's ``remote-snapshot-prepared=VALUE`` log lines."""
    return [line for line in log.splitlines() if f"remote-snapshot-prepared={value}" in line]


@pytest.fixture(scope="module")
def stack(registry: TestRegistry) -> Iterator[LazysnapStack]:
    """containerd + lazysnap (background fetch off) for the pull-and-run tests of this module."""
    with LazysnapStack(plain_http=[registry.host], config_extra=NO_BACKGROUND) as running:
        yield running


def _pull_and_run_lazily(stack: LazysnapStack, registry: TestRegistry, image: TestImage, name: str) -> float:
    """rpull and run ``image``; check the output and the log; return the fraction of layer bytes fetched."""
    mark = registry.mark()
    before = len(prepared_lines(stack.log(), "true"))
    stack.rpull(image.ref)
    printed = output(stack, image.ref, name, "cat /etc/lower.txt /data/small.txt /etc/top.txt")
    assert printed == LOWER_TEXT + SMALL_TEXT + TOP_TEXT
    fetched = layer_bytes_since(registry, mark, image)
    assert len(prepared_lines(stack.log(), "true")) - before == len(image.layer_digests), stack.log()
    return fetched / image.layer_bytes


def test_estargz_image_runs_lazily(stack: LazysnapStack, registry: TestRegistry) -> None:
    """An eStargz image is pulled as remote snapshots and runs having fetched a fraction of its layers."""
    image = push_estargz(registry, "estargz")
    fraction = _pull_and_run_lazily(stack, registry, image, "estargz-run")
    print(f"estargz: fetched {fraction:.1%} of {image.layer_bytes} layer bytes before the container ran")
    # The first read of data/small.txt checks its tar header, which an eStargz writer puts in the
    # member holding big.bin's last 4 MiB chunk: that member comes too (the price of catching a
    # TOC that maps a file to another file's bytes at its first read). big.bin's first chunk does not.
    assert fraction < 0.5 + (4 << 20) / image.layer_bytes


def test_indexed_gzip_image_runs_lazily(stack: LazysnapStack, registry: TestRegistry, tmp_path: Path) -> None:
    """A gzip image with a published index is pulled as remote snapshots and runs having fetched a fraction."""
    image = push_gzip(registry, "indexed", index=True, tmp=tmp_path)
    fraction = _pull_and_run_lazily(stack, registry, image, "indexed-run")
    print(f"indexed gzip: fetched {fraction:.1%} of {image.layer_bytes} layer bytes before the container ran")
    assert fraction < 0.5


def test_gzip_image_without_index_falls_back(
    stack: LazysnapStack, registry: TestRegistry, tmp_path: Path
) -> None:
    """A gzip image without an index falls back to containerd's download and still runs."""
    image = push_gzip(registry, "plain", index=False, tmp=tmp_path)
    mark = registry.mark()
    before = len(prepared_lines(stack.log(), "false"))
    stack.rpull(image.ref)
    assert output(stack, image.ref, "plain-run", "cat /etc/lower.txt /etc/top.txt") == LOWER_TEXT + TOP_TEXT
    assert len(prepared_lines(stack.log(), "false")) > before
    assert layer_bytes_since(registry, mark, image) >= image.layer_bytes


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry of this test's own, which the test may stop and start."""
    with LocalRegistry(tmp_path / "registry") as running:
        yield running


def _kill_during_pull(stack: LazysnapStack, image: TestImage, marker: str) -> None:
    """Start an rpull of ``image`` and kill -9 the daemon once its log shows the first ``marker`` line."""
    seen = stack.log().count(marker)
    argv = [CTR_REMOTE, "--address", str(stack.containerd.address), "--namespace", DEFAULT_NAMESPACE]
    argv += ["image", "rpull", "--plain-http", "--snapshotter", "lazysnap", image.ref]
    pulling = stack.containerd.popen_in_namespace(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while stack.log().count(marker) <= seen:
            assert time.monotonic() < deadline, f"no new {marker} line:\n{stack.log()}"
            time.sleep(0.005)
        stack.kill_daemon()
    finally:
        pulling.wait(timeout=60)


def _restart_keeps(stack: LazysnapStack) -> None:
    """Restart the daemon (after a kill -9) and check every snapshot listed before is listed again."""
    before = set(stack.snapshot_keys()) if stack.daemon is not None else None
    stack.kill_daemon()
    stack.start_daemon()
    if before is not None:
        assert before <= set(stack.snapshot_keys())


def test_restart_keeps_snapshots_and_cached_data(private_registry: LocalRegistry, tmp_path: Path) -> None:
    """After kill -9 during and after pulls, a restarted daemon lists every committed snapshot and runs from the cache."""
    lazy = push_estargz(private_registry, "restart-lazy")
    indexed = push_gzip(private_registry, "restart-indexed", index=True, tmp=tmp_path / "indexer")
    plain = push_gzip(private_registry, "restart-plain", index=False, tmp=tmp_path / "indexer")
    images = {"lazy": lazy, "indexed": indexed, "plain": plain}
    with LazysnapStack(plain_http=[private_registry.host], config_extra=NO_BACKGROUND) as stack:
        stack.rpull(lazy.ref)
        assert output(stack, lazy.ref, "warm", "cat /etc/lower.txt") == LOWER_TEXT
        _restart_keeps(stack)  # kill -9 after a pull

        # kill -9 in the middle of a lazy pull and of a fallback (containerd extracting) pull.
        committed = set(stack.snapshot_keys())
        _kill_during_pull(stack, indexed, "remote-snapshot-prepared=true")
        _restart_keeps(stack)
        assert committed <= set(stack.snapshot_keys())
        committed = set(stack.snapshot_keys())
        _kill_during_pull(stack, plain, "remote-snapshot-prepared=false")
        _restart_keeps(stack)
        assert committed <= set(stack.snapshot_keys())

        for name, image in images.items():
            stack.rpull(image.ref)  # completes an interrupted pull
            assert output(stack, image.ref, f"after-{name}", "cat /etc/top.txt") == TOP_TEXT
        committed = set(stack.snapshot_keys())

        # Registry gone: a fresh daemon serves what was read before from its cache.
        private_registry.stop()
        _restart_keeps(stack)
        assert committed <= set(stack.snapshot_keys())
        for name, image in images.items():
            assert output(stack, image.ref, f"offline-{name}", "cat /etc/top.txt") == TOP_TEXT
        assert output(stack, lazy.ref, "offline-lower", "cat /etc/lower.txt") == LOWER_TEXT
        assert "remote-snapshot-restored=false" not in stack.log()


@contextlib.contextmanager
def _silent_listener(port: int) -> Iterator[None]:
    """A socket on ``port`` that completes TCP handshakes (in its backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        yield


@pytest.mark.parametrize("outage", ["refused", "silent"])
def test_unreachable_registry_gives_eio_not_a_hang(private_registry: LocalRegistry, outage: str) -> None:
    """With the registry gone, Mounts still answers and a read of uncached bytes fails with EIO in bounded time."""
    image = push_estargz(private_registry, f"unreachable-{outage}")
    with LazysnapStack(
        plain_http=[private_registry.host], config_extra=NO_BACKGROUND + FAST_FAILURE
    ) as stack:
        stack.rpull(image.ref)
        assert output(stack, image.ref, "warm", "cat /etc/lower.txt") == LOWER_TEXT
        private_registry.stop()
        with contextlib.ExitStack() as outages:
            if outage == "silent":
                outages.enter_context(_silent_listener(private_registry.port))
            top_chain = next(key for key in stack.snapshot_keys() if key.startswith("sha256:"))
            stack.snapshots("prepare", "probe-unreachable", top_chain)
            assert "overlay" in stack.snapshots("mounts", "/mnt", "probe-unreachable", timeout=10).stdout
            # cat's error message goes to the output file too (2>&1), so nothing is read through ctr.
            command = "cat /etc/lower.txt; cat /data/big.bin 2>&1 > /dev/null || echo read-failed"
            printed = output(stack, image.ref, "cold", command, timeout=120)
        assert printed.startswith(LOWER_TEXT) and printed.endswith("read-failed\n"), printed
        assert "Input/output error" in printed, printed
        # What bounded the wait, by design: the retry count when connections are refused; the FUSE
        # read deadline when they hang (the registry client alone would wait 3 attempts x 3 s).
        # Refused: the client's retries end the read; silent: the read deadline does (its first
        # attempt gets fuse.read_timeout_seconds less the retry budget, so the log names less than 4 s).
        bound = r"failed after 3 attempt\(s\)" if outage == "refused" else r"not read within [0-3]\.\d+ s"
        assert re.search(bound, stack.log()), stack.log()


def test_retagged_image_is_resolved_again(stack: LazysnapStack, registry: TestRegistry) -> None:
    """When a tag moves to another image, the new image's layers are still served lazily."""
    ref = registry.ref("retagged")
    first = _push(ref, [_estargz_layer(entries) for entries in _entries("retag-first")])
    stack.rpull(first.ref)
    second = _push(ref, [_estargz_layer(entries) for entries in _entries("retag-second")])
    before = len(prepared_lines(stack.log(), "true"))
    stack.rpull(second.ref)
    assert len(prepared_lines(stack.log(), "true")) - before == len(second.layer_digests), stack.log()
    assert output(stack, second.ref, "retagged-run", "cat /etc/layer-0") == "retag-second"


def test_mixed_image_stacks_local_layers_on_remote_ones(stack: LazysnapStack, registry: TestRegistry) -> None:
    """An eStargz layer under plain gzip layers stays remote; the layers above fall back and the image runs."""
    base, big, top = _entries("mixed")
    image = _push(
        registry.ref("mixed"), [_estargz_layer(base), make_layer(big, "gzip"), make_layer(top, "gzip")]
    )
    before_true = len(prepared_lines(stack.log(), "true"))
    before_false = len(prepared_lines(stack.log(), "false"))
    stack.rpull(image.ref)
    assert len(prepared_lines(stack.log(), "true")) - before_true == 1, stack.log()
    assert len(prepared_lines(stack.log(), "false")) - before_false == 2, stack.log()
    printed = output(stack, image.ref, "mixed-run", "cat /etc/lower.txt /data/small.txt /etc/top.txt")
    assert printed == LOWER_TEXT + SMALL_TEXT + TOP_TEXT


def test_background_fetch_completes_layers_for_offline_use(private_registry: LocalRegistry) -> None:
    """With background fetch on, whole layers arrive and verify, so unread files survive a registry outage."""
    image = push_estargz(private_registry, "background")
    config = "[background_fetch]\nenabled = true\ndelay_seconds = 0.5\n"
    with LazysnapStack(plain_http=[private_registry.host], config_extra=config) as stack:
        stack.rpull(image.ref)
        assert output(stack, image.ref, "warm", "cat /etc/lower.txt") == LOWER_TEXT
        deadline = time.monotonic() + 60
        while stack.log().count("background-fetch-complete") < len(image.layer_digests):
            assert "background-fetch-failed" not in stack.log(), stack.log()
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.1)
        private_registry.stop()
        assert output(stack, image.ref, "offline", "wc -c < /data/big.bin").strip() == str(BIG_SIZE)


def test_removed_image_releases_and_pulls_again(stack: LazysnapStack, registry: TestRegistry) -> None:
    """Removing an image removes its remote snapshots; pulling it again serves them lazily again."""
    image = push_estargz(registry, "removed")
    stack.rpull(image.ref)
    assert set(image.chain_ids) <= set(stack.snapshot_keys())
    stack.ctr("image", "rm", "--sync", image.ref)
    assert not set(image.chain_ids) & set(stack.snapshot_keys())
    before = len(prepared_lines(stack.log(), "true"))
    stack.rpull(image.ref)
    assert len(prepared_lines(stack.log(), "true")) - before == len(image.layer_digests), stack.log()
    assert output(stack, image.ref, "removed-run", "cat /etc/top.txt") == TOP_TEXT


def test_repeated_layer_is_served_lazily_at_each_position(
    stack: LazysnapStack, registry: TestRegistry
) -> None:
    """A blob used twice in one image is matched to the right position by its chain id, both times lazily."""
    base, _, top = _entries("repeated")
    marker = [directory("etc"), file("etc/marker", "same blob twice\n")]
    layers = [_estargz_layer(base), _estargz_layer(marker), _estargz_layer(top), _estargz_layer(marker)]
    image = _push(registry.ref("repeated"), layers)
    before = len(prepared_lines(stack.log(), "true"))
    stack.rpull(image.ref)
    assert len(prepared_lines(stack.log(), "true")) - before == 4, stack.log()
    assert output(stack, image.ref, "repeated-run", "cat /etc/marker") == "same blob twice\n"
