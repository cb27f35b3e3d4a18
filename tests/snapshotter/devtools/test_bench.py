"""``lazysnap bench`` end to end on a tiny busybox image: every run recorded with plausible numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.devtools.bench.network import LinkError, LinkProfile, parse_duration, parse_rate
from snapshotter.devtools.image_builder import Layer, directory, file, push_image, symlink
from snapshotter.layers.sources import TOC_DIGEST_ANNOTATION
from snapshotter.remote.client import RegistryClient
from tests.support.estargz_writer import build_estargz
from tests.support.registry import TestRegistry

BUSYBOX = "/bin/busybox"
REPO = Path(__file__).resolve().parents[3]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts, chroot and drop_caches need root"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static (scripts/setup.sh)"),
]


@pytest.fixture
async def busybox_image(registry: TestRegistry, registry_client: RegistryClient) -> str:
    """A one-layer eStargz image: a static busybox as /bin/sh and /bin/true, and 4 MB no workload reads."""
    entries = [
        directory("bin"),
        file("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755),
        symlink("bin/sh", "busybox"),
        symlink("bin/true", "busybox"),
        directory("data"),
        file("data/blob", os.urandom(4 << 20)),
    ]
    written = build_estargz(entries, chunk_size=1 << 20)
    layer = Layer(written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest})
    ref = registry.ref("bench-busybox", "v1")
    await push_image(registry_client, ref, [layer], config={"Cmd": ["/bin/sh"]})
    return str(ref)


async def run_bench(tmp_path: Path, image: str, *args: str) -> tuple[dict[str, Any], Path]:
    """Run the CLI (in a thread: the registry fixture shares this trio loop) and return results.json and --out."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "snapshotter.cli", "bench", image, "--out", str(out), *args]
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def check_common(document: dict[str, Any], out: Path, modes: list[str], repeat: int) -> None:
    """Every (mode, repeat) has one run without error, with times and byte counts that make sense."""
    runs = document["runs"]
    assert sorted((r["mode"], r["repeat"]) for r in runs) == sorted(
        (m, n) for m in modes for n in range(1, repeat + 1)
    )
    for run in runs:
        assert not run["error"]
        assert run["workload"] == "sh -c true"  # no python3 in the image
        assert 0 < run["time_to_ready_s"] < 60
        assert run["mount_s"] + run["workload_s"] == pytest.approx(run["time_to_ready_s"], abs=0.01)
        assert 0 < run["bytes_before_ready"] <= run["bytes_total"]
        assert run["image_size"] > 2 << 20
        # The relay counts HTTP headers and manifests too, but nothing is fetched twice.
        assert run["bytes_total"] < run["image_size"] * 1.2 + 64_000
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {row["mode"] for row in document["summary"]} == set(modes)


async def test_bench_loopback_all_lazysnap_modes(tmp_path: Path, busybox_image: str) -> None:
    """On loopback every lazysnap mode runs; eager fetches the whole image before ready, no-background-fetch does not."""
    modes = ["eager", "lazy+no-background-fetch", "lazy+stored-index"]
    args = [arg for mode in modes for arg in ("--mode", mode)]
    document, out = await run_bench(tmp_path, busybox_image, "--repeat", "1", *args)
    check_common(document, out, modes, 1)
    assert document["setup"]["network"] == "loopback"
    by_mode = {run["mode"]: run for run in document["runs"]}
    eager = by_mode["eager"]
    assert eager["bytes_before_ready"] >= eager["image_size"]
    assert (
        by_mode["lazy+no-background-fetch"]["bytes_total"] < eager["image_size"]
    )  # the 2 MB file is never read
    assert by_mode["lazy+stored-index"]["layers"][0]["how"] == "lazy: stored index"
    assert not list(Path("/var/tmp").glob("lazysnap-bench-*")), "scratch space left behind"


@pytest.mark.skipif(shutil.which("tc") is None, reason="needs iproute2 (tc, ip netns)")
async def test_bench_shaped_link(tmp_path: Path, busybox_image: str) -> None:
    """Through a tbf-shaped netns link with added RTT the runs still complete, and no netns is left."""
    before = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    )
    document, out = await run_bench(
        tmp_path, busybox_image, "--repeat", "1", "--mode", "lazy", "--rate", "200mbit", "--rtt", "10ms"
    )
    check_common(document, out, ["lazy"], 1)
    assert document["setup"]["network"] == "200mbit+10ms"
    # Two round trips at least: connect plus the manifest request, before anything else.
    assert document["runs"][0]["time_to_ready_s"] > 0.02
    after = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not {name for name in after - before if name.startswith("lzbench")}, "the bench left its netns"


def test_link_profile_parsing() -> None:
    """Rates and RTTs use tc's units; a bad value is a usage error naming the flag."""
    assert parse_rate("100mbit") == 100e6
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert LinkProfile(100e6, 0.02).name == "100mbit+20ms"
    assert LinkProfile().name == "loopback"
    with pytest.raises(LinkError, match="--rate"):
        parse_rate("fast")
    with pytest.raises(LinkError, match="--rtt"):
        parse_duration("20")


def test_bench_without_matplotlib_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, bench refuses at once in one line naming lazysnap[bench]."""
    import importlib.util

    from snapshotter.devtools.bench.report import require_matplotlib
    from snapshotter.errors import UsageError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    with pytest.raises(UsageError, match=r"pip install 'lazysnap\[bench\]'"):
        require_matplotlib()
