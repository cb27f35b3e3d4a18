#!/usr/bin/env python3
"""Build the benchmark images from Debian packages and push them to a local registry.

For each image (``python``: debootstrap bookworm minbase + python3; ``python-large`` with --large:
the same plus a few hundred MB of packages) it pushes three tags:

- ``NAME:gzip``     one gzip layer of the rootfs, as a normal ``docker build`` would give;
- ``NAME:estargz``  the same image converted by ``ctr-remote image convert --estargz --oci``
                    (inside a private containerd, see snapshotter/containerd_env.py);
- ``NAME:estargz-opt`` (with --optimized) ``ctr-remote image optimize``: eStargz with the files
                    ``python3 -c 'import json'`` reads first, before a prefetch landmark;
- ``NAME:indexed``  the gzip image again, plus its lazysnap index published with
                    ``lazysnap index push --spacing`` (``--index-spacing``, default 256 KiB).

The debootstrap result is cached as a tarball (``--cache-dir``, default /var/cache/lazysnap-bench),
so a rerun takes seconds. Without ``--registry HOST:PORT`` a docker-registry is started on
``--registry-root`` (persistent, default CACHE/registry); ``--serve`` keeps it running afterwards::

    sudo .venv/bin/python scripts/build_bench_images.py --serve --port 5000

The references it pushed are listed in ``images.json`` in the ``--out`` directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.bench_output import add_out_argument, out_dir, write_json  # noqa: E402
from snapshotter.devtools.containerd_env import Containerd, containerd_available  # noqa: E402
from snapshotter.devtools.image_builder import make_layer, push_image  # noqa: E402
from snapshotter.devtools.local_registry import LocalRegistry  # noqa: E402
from snapshotter.remote.client import RegistryClient  # noqa: E402
from snapshotter.remote.reference import parse_reference  # noqa: E402

DEFAULT_CACHE = Path("/var/cache/lazysnap-bench")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# Package sets: the small image is the one issue 4 and issue 6 name; the large one adds a few
# hundred MB of libraries a real Python service image would carry.
IMAGES: dict[str, list[str]] = {
    "python": ["python3"],
    "python-large": ["python3", "python3-numpy", "python3-scipy", "python3-pandas", "gcc", "perl"],
}
# Removed from the rootfs before it becomes a layer, as Dockerfiles usually do: apt's caches
# are ~90 MB that no container reads.
PRUNE = ["var/cache/apt", "var/lib/apt/lists"]
LAZYSNAP = [sys.executable, "-m", "snapshotter.cli"]


def log(message: str) -> None:
    """Print a progress line with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def rootfs_tarball(name: str, cache_dir: Path) -> Path:
    """Return the cached rootfs tar of image ``name``, running debootstrap first if it is missing."""
    tarball = cache_dir / f"{name}.rootfs.tar"
    if tarball.exists():
        log(f"{name}: cached rootfs {tarball} ({tarball.stat().st_size / 1e6:.0f} MB)")
        return tarball
    work = cache_dir / f"{name}.rootfs.partial"
    if work.exists():
        shutil.rmtree(work)  # a partial debootstrap can't be resumed reliably
    cache_dir.mkdir(parents=True, exist_ok=True)
    include = ",".join(IMAGES[name])
    log(f"{name}: debootstrap --variant=minbase --include={include} {SUITE} (about a minute)")
    started = time.monotonic()
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(work), MIRROR],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    finish_rootfs(work, tarball)
    log(f"{name}: debootstrap done in {time.monotonic() - started:.0f} s")
    return tarball


def finish_rootfs(work: Path, tarball: Path) -> None:
    """Prune apt's caches from a debootstrap tree and tar it (sorted, numeric ids, xattrs)."""
    for relative in PRUNE:
        target = work / relative
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    partial = tarball.with_suffix(".tar.partial")
    subprocess.run(
        [
            "tar",
            "--format=pax",
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-C",
            str(work),
            "-cf",
            str(partial),
            ".",
        ],
        check=True,
    )
    os.replace(partial, tarball)
    shutil.rmtree(work)


async def push_gzip(host: str, name: str, tarball: Path, tags: list[str]) -> None:
    """Push the rootfs tar as a one-layer gzip image under each tag."""
    started = time.monotonic()
    tar = tarball.read_bytes()
    layer = await trio.to_thread.run_sync(lambda: make_layer(tar, "gzip"))
    log(f"{name}: gzip layer {len(layer.blob) / 1e6:.1f} MB ({len(tar) / 1e6:.0f} MB tar)")
    config = {"Cmd": ["/usr/bin/python3"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"]}
    async with RegistryClient(plain_http=True) as client:
        for tag in tags:
            # The same layer, but a manifest of its own per tag: published indexes are found by
            # manifest digest, so NAME:gzip must not share NAME:indexed's.
            annotations = {"org.lazysnap.bench.variant": tag}
            ref = parse_reference(f"{host}/{name}:{tag}")
            await push_image(client, ref, [layer], config=config, annotations=annotations)
    log(f"{name}: pushed {', '.join(tags)} in {time.monotonic() - started:.1f} s")


def push_estargz(host: str, name: str) -> None:
    """Convert NAME:gzip to eStargz with ctr-remote inside a private containerd and push NAME:estargz."""
    if not containerd_available():
        log(f"{name}: SKIP estargz: needs root, containerd, ctr, runc, unshare, nsenter")
        return
    source, target = f"{host}/{name}:gzip", f"{host}/{name}:estargz"
    started = time.monotonic()
    with Containerd() as ctrd:
        ctrd.ctr("image", "pull", "--plain-http", source, timeout=600)
        ctrd.ctr_remote("image", "convert", "--estargz", "--oci", source, target, timeout=900)
        ctrd.ctr("image", "push", "--plain-http", target, timeout=600)
    log(f"{name}: pushed {target} (ctr-remote convert) in {time.monotonic() - started:.1f} s")


def push_estargz_optimized(host: str, name: str, workload: list[str]) -> None:
    """Convert NAME:gzip with ``ctr-remote image optimize`` (records what ``workload`` reads) to NAME:estargz-opt."""
    if not containerd_available():
        log(f"{name}: SKIP estargz-opt: needs root, containerd, ctr, runc, unshare, nsenter")
        return
    source, target = f"{host}/{name}:gzip", f"{host}/{name}:estargz-opt"
    started = time.monotonic()
    entrypoint, args = json.dumps(workload[:1]), json.dumps(workload[1:])
    with Containerd() as ctrd:
        ctrd.ctr("image", "pull", "--plain-http", source, timeout=600)
        # --period: how long the recorded run may take; import json needs well under a second.
        ctrd.ctr_remote(
            "image", "optimize", "--oci", "--period", "5", "--entrypoint", entrypoint, "--args", args,
            source, target, timeout=900,
        )  # fmt: skip
        ctrd.ctr("image", "push", "--plain-http", target, timeout=600)
    log(
        f"{name}: pushed {target} (ctr-remote optimize for {' '.join(workload)}) in {time.monotonic() - started:.1f} s"
    )


def push_index_artifact(host: str, name: str, spacing: int) -> bool:
    """Publish NAME:indexed's lazysnap index with ``lazysnap index push``; returns True."""
    ref = f"{host}/{name}:indexed"
    subprocess.run(
        [*LAZYSNAP, "index", "push", "--plain-http", "--spacing", str(spacing), ref], check=True, cwd=REPO
    )
    log(f"{name}: published the index of {ref} (gzip seek points every {spacing} bytes)")
    return True


@contextlib.contextmanager
def registry_for(args: argparse.Namespace) -> Iterator[str]:
    """Yield the registry host to push to: the given one, or a LocalRegistry on the persistent root."""
    if args.registry:
        yield args.registry
        return
    registry = LocalRegistry(args.registry_root or args.cache_dir / "registry", port=args.port)
    registry.start()
    try:
        yield registry.host
    finally:
        registry.stop()


def main() -> int:
    """Build and push the benchmark images; return the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="rootfs tarball cache")
    parser.add_argument("--registry", help="push to this HOST:PORT (plain HTTP) instead of starting one")
    parser.add_argument("--registry-root", type=Path, help="storage of the self-started registry")
    parser.add_argument("--port", type=int, help="port of the self-started registry (default: a free one)")
    parser.add_argument("--large", action="store_true", help="also build python-large (a few hundred MB)")
    parser.add_argument("--no-estargz", action="store_true", help="skip the ctr-remote conversion")
    parser.add_argument(
        "--optimized",
        action="store_true",
        help="also push NAME:estargz-opt (ctr-remote image optimize, prefetch list of python3 -c 'import json')",
    )
    parser.add_argument("--serve", action="store_true", help="keep the self-started registry running")
    parser.add_argument(
        "--index-spacing",
        type=int,
        default=256 << 10,
        help="gzip seek-point spacing of NAME:indexed's published index (smaller: less fetched per cold read)",
    )
    add_out_argument(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("build_bench_images: run as root (debootstrap, containerd)", file=sys.stderr)
        return 2
    out = out_dir(args.out, "build_bench_images")
    names = ["python", "python-large"] if args.large else ["python"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks: registry, containerd
    with registry_for(args) as host:
        log(f"registry {host}")
        for name in names:
            tarball = rootfs_tarball(name, args.cache_dir)
            trio.run(push_gzip, host, name, tarball, ["gzip", "indexed"])
            if not args.no_estargz:
                push_estargz(host, name)
            if args.optimized:
                push_estargz_optimized(host, name, ["/usr/bin/python3", "-c", "import json"])
            push_index_artifact(host, name, args.index_spacing)
        tags = ["gzip", "estargz", "indexed"] + (["estargz-opt"] if args.optimized else [])
        pushed = {name: [f"{host}/{name}:{tag}" for tag in tags] for name in names}
        for refs in pushed.values():
            print("  " + "  ".join(refs))
        print(f"wrote {write_json(out, 'images.json', {'registry': host, 'images': pushed})}")
        if args.serve and not args.registry:
            log("serving; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
