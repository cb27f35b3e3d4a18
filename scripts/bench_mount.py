#!/usr/bin/env python3
"""Issue 4's figures for ``lazysnap mount`` on the Debian python3 image, in one run, on loopback.

Measured (each cold: lazysnap root removed, page cache dropped, lazysnap's code read back):

1. mount ready: time of ``lazysnap mount --no-background-fetch`` and registry bytes by then, for
   the eStargz image (TOC) and the gzip image with a published index (stored index);
2. ``chroot MERGED python3 -c 'import json'`` in a writable overlay over each mount: time and
   bytes (mount + import, as a share of the image), next to ``lazysnap mount --eager``;
3. sequential read of a 256 MiB file once its blob is cached (page cache dropped before reading),
   next to reading a copy of the same file from local disk;
4. ``ls -lR`` of the whole tree (after dropping caches) on the lazy mount next to the eager tree.

Images come from ``scripts/build_bench_images.py`` (run it first; its registry storage is reused
here with a registry of our own on a free port, whose log gives the bytes sent). The 256 MiB
image is built and pushed here on first use. Prints a table with ratios against the baselines
measured in the same run and writes JSON (``bench_mount.json``) to the ``--out`` directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.bench_output import add_out_argument, out_dir, write_json  # noqa: E402
from snapshotter.devtools.bench.runner import (  # noqa: E402
    LAZYSNAP,
    drop_caches,
    overlay_over,
    remove_tree,
    run_chroot,
    warm_tools,
)
from snapshotter.devtools.image_builder import directory, file, make_layer, push_image  # noqa: E402
from snapshotter.devtools.local_registry import LocalRegistry  # noqa: E402
from snapshotter.remote.client import RegistryClient  # noqa: E402
from snapshotter.remote.reference import parse_reference  # noqa: E402

DEFAULT_CACHE = Path("/var/cache/lazysnap-bench")
BIG_FILE = "data/big.bin"
BIG_SIZE = 256 << 20
WORKLOAD = "python3 -c 'import json'"
READ_BLOCK = 1 << 20

# Logs and pipes get 80 columns by default, which squeezes the table; a terminal keeps its width.
console = Console() if sys.stdout.isatty() else Console(width=130)


class Bench:
    """One benchmark session: a registry on the cached storage and a scratch directory."""

    def __init__(self, registry: LocalRegistry, scratch: Path) -> None:
        self.registry = registry
        self.scratch = scratch
        self.root = scratch / "root"
        self.results: dict[str, Any] = {}

    def ref(self, tag: str, name: str = "python") -> str:
        """An image reference on our registry."""
        return f"{self.registry.host}/{name}:{tag}"

    def cold(self) -> None:
        """Remove lazysnap's state, drop the page cache, read lazysnap's code back."""
        remove_tree(self.root)
        drop_caches()
        warm_tools()

    @contextlib.contextmanager
    def mounted(self, ref: str, *flags: str) -> Iterator[tuple[Path, float, int]]:
        """Mount ``ref`` cold; yield (mountpoint, seconds the mount command took, registry bytes)."""
        self.cold()
        mountpoint = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.scratch))
        argv = [*LAZYSNAP, "mount", "--root", str(self.root), *flags, ref, str(mountpoint)]
        mark = self.registry.mark()
        started = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
        seconds = time.monotonic() - started
        try:
            yield mountpoint, seconds, self.registry.bytes_sent_since(mark)
        finally:
            subprocess.run(
                [*LAZYSNAP, "umount", "--root", str(self.root), str(mountpoint)],
                capture_output=True,
                cwd=REPO,
            )
            remove_tree(mountpoint)

    def stats(self, mountpoint: Path) -> dict[str, Any]:
        """``lazysnap stats --json`` of a mount."""
        out = subprocess.run(
            [*LAZYSNAP, "stats", "--json", "--root", str(self.root), str(mountpoint)],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout
        document: dict[str, Any] = json.loads(out)
        return document

    def image_size(self, tag: str) -> int:
        """Compressed size of an image's layers, from its manifest."""

        async def size() -> int:
            async with RegistryClient(plain_http=True) as client:
                image = await client.resolve(self.ref(tag))
                return sum(layer.size for layer in image.layers)

        return trio.run(size)

    # -- the measurements ------------------------------------------------------------------

    def mount_and_import(self, label: str, tag: str, *flags: str) -> dict[str, Any]:
        """Cold mount, then the import workload in an overlay: times and bytes of both."""
        size = self.image_size(tag)
        with self.mounted(self.ref(tag), *flags) as (mountpoint, mount_s, mount_bytes):
            info = self.stats(mountpoint) if "--eager" not in flags else {}
            mark = self.registry.mark()
            with overlay_over(mountpoint, self.scratch / f"overlay-{label}") as merged:
                started = time.monotonic()
                run_chroot(merged, WORKLOAD)
                import_s = time.monotonic() - started
            import_bytes = self.registry.bytes_sent_since(mark)
            remove_tree(self.scratch / f"overlay-{label}")
        row: dict[str, Any] = {
            "image": self.ref(tag),
            "image_size": size,
            "mount_s": mount_s,
            "daemon_ready_s": info.get("ready_seconds"),
            "mount_bytes": mount_bytes,
            "import_s": import_s,
            "import_bytes": import_bytes,
            "total_s": mount_s + import_s,
            "total_bytes": mount_bytes + import_bytes,
            "fraction_of_image": (mount_bytes + import_bytes) / size,
            "how": [layer["how"] for layer in info.get("layers", [])],
        }
        self.results[label] = row
        console.print(
            f"  {label}: mount {mount_s:.2f} s ({mount_bytes / 1e6:.2f} MB), import json {import_s:.2f} s "
            f"({import_bytes / 1e6:.2f} MB), {100 * row['fraction_of_image']:.1f}% of {size / 1e6:.1f} MB"
        )
        return row

    def ls_lr(self, tag: str, *flags: str) -> float:
        """Seconds for ``ls -lR`` of a cold mount's whole tree (page and dentry caches dropped)."""
        with self.mounted(self.ref(tag), *flags) as (mountpoint, _, _):
            drop_caches()
            started = time.monotonic()
            subprocess.run(["ls", "-lR", str(mountpoint)], check=True, stdout=subprocess.DEVNULL)
            return time.monotonic() - started

    def sequential_read(self) -> dict[str, float]:
        """MB/s reading the 256 MiB file from a lazy mount with its blob cached, and from local disk."""
        ref = self.ref("v1", name="bigfile")
        with self.mounted(ref, "--no-background-fetch") as (mountpoint, mount_s, mount_bytes):
            info = self.stats(mountpoint)
            path = mountpoint / BIG_FILE
            first = read_speed(path)  # fetches whatever the mount did not download already
            local = self.scratch / "local-big.bin"
            shutil.copyfile(path, local)
            # Medians of three, page cache dropped before each: the machine is shared and noisy.
            cached = median_speed(path)
            disk = median_speed(local)
            read_speed(path)
            cached_hot = read_speed(path)  # the kernel's page cache (keep_cache) holds it now
            local.unlink()
        row = {
            "how": info["layers"][0]["how"],
            "mount_s": mount_s,
            "mount_bytes": mount_bytes,
            "first_read_mb_s": first,
            "cached_read_mb_s": cached,
            "local_disk_mb_s": disk,
            "cached_page_cache_mb_s": cached_hot,
        }
        self.results["sequential_read"] = row
        return row


def median_speed(path: Path, runs: int = 3) -> float:
    """Median MB/s of ``runs`` sequential reads of ``path``, each after dropping the page cache."""
    speeds = []
    for _ in range(runs):
        drop_caches()
        speeds.append(read_speed(path))
    return statistics.median(speeds)


def read_speed(path: Path) -> float:
    """Read a file sequentially in 1 MiB blocks; return MB/s."""
    started = time.monotonic()
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(READ_BLOCK):
            total += len(block)
    return total / 1e6 / (time.monotonic() - started)


async def push_big_file_image(host: str) -> None:
    """Push ``bigfile:v1``: one gzip layer holding one 256 MiB file of random bytes."""
    layer = await trio.to_thread.run_sync(
        lambda: make_layer([directory("data"), file(BIG_FILE, os.urandom(BIG_SIZE))], "gzip", level=1)
    )
    async with RegistryClient(plain_http=True) as client:
        await push_image(client, parse_reference(f"{host}/bigfile:v1"), [layer])


def has_image(host: str, name: str, tag: str) -> bool:
    """Whether the registry has ``name:tag``."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{host}/v2/{name}/manifests/{tag}", method="HEAD")
    # One header: urllib keeps only the last value of a repeated add_header.
    request.add_header(
        "Accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
    )
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except (urllib.error.URLError, OSError):
        return False


def check(value: float, target: float, *, at_most: bool) -> str:
    """``ok`` or ``MISS`` against a target."""
    good = value <= target if at_most else value >= target
    return "[green]ok[/green]" if good else "[red]MISS[/red]"


def report(results: dict[str, Any]) -> Table:
    """The human table: each figure, its baseline from this run, the ratio and the target."""
    table = Table(title="bench_mount: python image, loopback (cold: root removed, page cache dropped)")
    for column in ("figure", "lazysnap", "baseline (same run)", "ratio", "target", ""):
        table.add_column(column)
    est, idx, eager = results["estargz"], results["indexed"], results["eager"]
    table.add_row(
        "mount ready, eStargz",
        f"{est['mount_s']:.2f} s (daemon {est['daemon_ready_s']:.2f} s), {est['mount_bytes'] / 1e6:.2f} MB",
        f"eager mount {eager['mount_s']:.2f} s",
        f"{est['mount_s'] / eager['mount_s']:.2f}x",
        "< 0.5 s, < 1 MB",
        check(est["mount_s"], 0.5, at_most=True) + " " + check(est["mount_bytes"], 1e6, at_most=True),
    )
    table.add_row(
        "mount ready, stored index",
        f"{idx['mount_s']:.2f} s (daemon {idx['daemon_ready_s']:.2f} s), {idx['mount_bytes'] / 1e6:.2f} MB",
        f"eager mount {eager['mount_s']:.2f} s",
        f"{idx['mount_s'] / eager['mount_s']:.2f}x",
        "",
        "",
    )
    for label in ("estargz", "indexed"):
        row = results[label]
        table.add_row(
            f"mount + import json cold, {label}",
            f"{row['total_s']:.2f} s, {row['total_bytes'] / 1e6:.2f} MB ({100 * row['fraction_of_image']:.1f}%)",
            f"eager {eager['total_s']:.2f} s, {eager['total_bytes'] / 1e6:.2f} MB",
            f"{row['total_s'] / eager['total_s']:.2f}x",
            "< 10% of image",
            check(row["fraction_of_image"], 0.10, at_most=True),
        )
        table.add_row(
            f"  import json alone, {label}",
            f"{row['import_s']:.2f} s",
            f"eager {eager['import_s']:.2f} s",
            f"{row['import_s'] / eager['import_s']:.2f}x",
            "",
            "",
        )
    seq = results["sequential_read"]
    table.add_row(
        "sequential read 256 MiB, cached",
        f"{seq['cached_read_mb_s']:.0f} MB/s",
        f"local disk {seq['local_disk_mb_s']:.0f} MB/s",
        f"{seq['cached_read_mb_s'] / seq['local_disk_mb_s']:.2f}x",
        ">= 0.5x",
        check(seq["cached_read_mb_s"] / seq["local_disk_mb_s"], 0.5, at_most=False),
    )
    ls = results["ls_lR"]
    table.add_row(
        "ls -lR whole tree, cold",
        f"{ls['lazy_s']:.2f} s",
        f"eager tree {ls['eager_s']:.2f} s",
        f"{ls['lazy_s'] / ls['eager_s']:.2f}x",
        "<= 2x",
        check(ls["lazy_s"] / ls["eager_s"], 2.0, at_most=True),
    )
    return table


def main() -> int:
    """Run every measurement and print and write the results; return the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry-root", type=Path, default=DEFAULT_CACHE / "registry")
    add_out_argument(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_mount: run as root (mounts, chroot, drop_caches)", file=sys.stderr)
        return 2
    out = out_dir(args.out, "bench_mount")
    scratch = Path(tempfile.mkdtemp(prefix="bench-mount-", dir="/var/tmp"))
    try:
        with LocalRegistry(args.registry_root) as registry:
            for tag in ("estargz", "indexed"):
                if not has_image(registry.host, "python", tag):
                    print(f"python:{tag} missing: run scripts/build_bench_images.py first", file=sys.stderr)
                    return 2
            if not has_image(registry.host, "bigfile", "v1"):
                console.print("pushing bigfile:v1 (256 MiB of random bytes, once)")
                trio.run(push_big_file_image, registry.host)
            bench = Bench(registry, scratch)
            console.print(f"registry {registry.host} on {args.registry_root}; scratch {scratch}")
            bench.mount_and_import("estargz", "estargz", "--no-background-fetch")
            bench.mount_and_import("indexed", "indexed", "--no-background-fetch")
            bench.mount_and_import("eager", "gzip", "--eager")
            bench.results["ls_lR"] = {
                "lazy_s": bench.ls_lr("estargz", "--no-background-fetch"),
                "eager_s": bench.ls_lr("gzip", "--eager"),
            }
            console.print(f"  ls -lR: {bench.results['ls_lR']}")
            console.print(f"  sequential read: {bench.sequential_read()}")
    finally:
        remove_tree(scratch)
    setup = {
        "host": os.uname().nodename,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "network": "loopback, registry started by this script",
        "workload": WORKLOAD,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    written = write_json(out, "bench_mount.json", {"setup": setup, "results": bench.results})
    console.print(report(bench.results))
    console.print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
