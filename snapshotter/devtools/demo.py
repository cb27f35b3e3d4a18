"""``lazysnap demo``: a local registry, a sample image, and a lazy mount of it, end to end.

1. start Debian's docker-registry on a free 127.0.0.1 port in a temporary directory;
2. build a sample image in Python (this Python's standard library as a big gzip layer, plus two
   small layers, one of which deletes a file of the first) and push it;
3. publish its layer indexes next to it (``lazysnap index push``, what an image's CI would do);
4. mount it lazily with ``lazysnap mount`` from an empty cache, list it, read files, and compare
   the bytes fetched from the registry with the image size; then unmount and stop the registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

import trio
from rich.console import Console

from snapshotter.config import load_config
from snapshotter.devtools.image_builder import (
    Layer,
    directory,
    file,
    make_layer,
    push_image,
    symlink,
    whiteout,
)
from snapshotter.devtools.local_registry import LocalRegistry
from snapshotter.layers.index_push import push_image_indexes
from snapshotter.remote.client import ResolvedImage, open_registry_client
from snapshotter.remote.reference import Reference
from snapshotter.service.chain_ids import chain_ids

DEMO_REPOSITORY = "lazysnap/demo"
STDLIB_IN_IMAGE = "usr/lib/python3"
SAMPLE_FILE = "json/decoder.py"


def stdlib_layer() -> Layer:
    """A gzip layer holding this Python's standard library (no caches), about 10 MB compressed."""
    stdlib = sysconfig.get_paths()["stdlib"]
    out = io.BytesIO()

    def skip_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if "__pycache__" in info.name or "site-packages" in info.name else info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(stdlib, arcname=STDLIB_IN_IMAGE, filter=skip_caches)
    return make_layer(out.getvalue(), "gzip")


def sample_layers() -> list[Layer]:
    """The standard library, an app layer, and a layer that deletes a file of the first."""
    app = [
        directory("etc"),
        file("etc/os-release", 'NAME="lazysnap demo"\nID=demo\n'),
        file("etc/motd", "this file is removed by the third layer\n"),
        directory("app"),
        file("app/main.py", "print('hello from a lazily mounted layer')\n", mode=0o755),
        symlink("app/stdlib", f"/{STDLIB_IN_IMAGE}"),
    ]
    cleanup = [whiteout("etc/motd"), file("etc/hostname", "demo\n")]
    return [stdlib_layer(), make_layer(app, "gzip"), make_layer(cleanup, "gzip")]


async def _publish(registry: LocalRegistry, publisher_root: str) -> ResolvedImage:
    ref = Reference(registry.host, DEMO_REPOSITORY, "latest", None)
    # No config.json: the demo registry is anonymous, and the user's credentials are none of its business.
    config = load_config(
        None, root=publisher_root, **{"registry.credentials_file": "/nonexistent/lazysnap-demo.json"}
    )
    async with open_registry_client(config) as client:
        await push_image(client, ref, sample_layers())
        image = await client.resolve(ref)
    await push_image_indexes(str(ref), config)
    return image


def _lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args], capture_output=True, text=True, check=False
    )


def _show_image(console: Console, image: ResolvedImage) -> None:
    console.print(f"image    {image.reference}", highlight=False, soft_wrap=True)
    for number, (layer, chain) in enumerate(zip(image.layers, chain_ids(image.diff_ids), strict=True)):
        console.print(
            f"layer {number}  {layer.digest}  {layer.size:>10,} bytes  chain ID {chain[:19]}...",
            highlight=False,
            soft_wrap=True,
        )


def _explore(console: Console, mountpoint: Path) -> None:
    """List the mounted image and read a few files, checking one against the original."""
    console.print(f"$ ls {mountpoint}", highlight=False)
    console.print("  " + "  ".join(sorted(os.listdir(mountpoint))), highlight=False)
    console.print(f"$ cat {mountpoint}/etc/os-release", highlight=False)
    console.print(
        "  " + (mountpoint / "etc/os-release").read_text().strip().replace("\n", "\n  "), highlight=False
    )
    motd_gone = not (mountpoint / "etc/motd").exists()
    console.print(f"etc/motd deleted by the upper layer's whiteout: {motd_gone}", highlight=False)
    original = Path(sysconfig.get_paths()["stdlib"]) / SAMPLE_FILE
    mounted = mountpoint / STDLIB_IN_IMAGE / SAMPLE_FILE
    # Read with cat, as someone browsing the image would: a Python process opening a .py file
    # looks like an import about to run, and would have the module's imports prefetched.
    content = subprocess.run(["cat", str(mounted)], capture_output=True, check=True).stdout
    same = hashlib.sha256(content).digest() == hashlib.sha256(original.read_bytes()).digest()
    console.print(
        f"{STDLIB_IN_IMAGE}/{SAMPLE_FILE} read lazily, identical to the original: {same}", highlight=False
    )
    if not (motd_gone and same):
        raise RuntimeError("the mounted image does not show what was pushed")


def run_demo() -> int:
    """Run the demo and return the exit code (0 when every step worked)."""
    console = Console()
    with tempfile.TemporaryDirectory(prefix="lazysnap-demo-") as scratch, LocalRegistry() as registry:
        console.print(f"registry: docker-registry on {registry.url}", soft_wrap=True)
        image = trio.run(_publish, registry, os.path.join(scratch, "publisher"))
        _show_image(console, image)
        console.print("published the layer indexes next to the image (lazysnap index push)")
        root, mountpoint = os.path.join(scratch, "root"), Path(scratch, "mnt")
        mountpoint.mkdir()
        mount = _lazysnap(
            "mount", "--root", root, "--no-background-fetch", str(image.reference), str(mountpoint)
        )
        console.print(mount.stderr.strip() or mount.stdout.strip(), highlight=False, soft_wrap=True)
        if mount.returncode != 0:
            return mount.returncode
        try:
            _explore(console, mountpoint)
            stats = json.loads(_lazysnap("stats", "--json", "--root", root, str(mountpoint)).stdout)
        finally:
            _lazysnap("umount", "--root", root, str(mountpoint))
        for number, layer in enumerate(stats["layers"]):
            console.print(f"layer {number}: {layer['how']} ({layer['reason']})", highlight=False)
        fetched, size = stats["bytes_fetched"], stats["image_size"]
        console.print(
            f"fetched {fetched:,} bytes of a {size:,}-byte image ({100 * fetched / size:.1f}%) "
            "to mount it, list it and read those files",
            highlight=False,
        )
    console.print("unmounted, registry stopped")
    return 0
