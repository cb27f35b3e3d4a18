"""``lazysnap demo``: start a local registry, push a small sample image, resolve it and show its layers.

Everything is local: Debian's docker-registry on a free 127.0.0.1 port in a temporary directory,
an image built in Python (three gzip layers), pushed and then resolved with RegistryClient.
Later issues turn this into a lazy mount of the same image.
"""

from __future__ import annotations

import trio
from rich.console import Console

from snapshotter.chain_ids import chain_ids
from snapshotter.image_builder import Layer, directory, file, make_layer, push_image, symlink, whiteout
from snapshotter.local_registry import LocalRegistry
from snapshotter.reference import Reference
from snapshotter.registry_client import RegistryClient, ResolvedImage

DEMO_REPOSITORY = "lazysnap/demo"


def sample_layers() -> list[Layer]:
    """Three small gzip layers: a base, an app on top, and a layer that deletes a base file."""
    base = [
        directory("etc"),
        file("etc/os-release", 'NAME="lazysnap demo"\nID=demo\n'),
        file("etc/motd", "this file is removed by the third layer\n"),
        directory("usr/bin"),
        symlink("bin", "usr/bin"),
    ]
    app = [
        directory("app"),
        file("app/main.py", "print('hello from a lazily mounted layer')\n", mode=0o755),
        file("app/data.bin", bytes(range(256)) * 4096),
    ]
    cleanup = [whiteout("etc/motd"), file("etc/hostname", "demo\n")]
    return [make_layer(entries, "gzip") for entries in (base, app, cleanup)]


async def _push_and_resolve(registry: LocalRegistry) -> ResolvedImage:
    ref = Reference(registry.host, DEMO_REPOSITORY, "latest", None)
    # No config.json: the demo registry is anonymous, and the user's credentials are none of its business.
    async with RegistryClient(docker_config_path="/nonexistent/lazysnap-demo.json") as client:
        await push_image(client, ref, sample_layers())
        return await client.resolve(ref)


def _print(console: Console, image: ResolvedImage) -> None:
    # Plain lines rather than a table: full digests must stay copyable in a narrow terminal.
    console.print(f"image    {image.reference}", highlight=False, soft_wrap=True)
    console.print(
        f"manifest {image.manifest_digest} ({image.manifest_media_type})", highlight=False, soft_wrap=True
    )
    console.print(f"config   {image.config.digest}", highlight=False, soft_wrap=True)
    for i, (layer, chain) in enumerate(zip(image.layers, chain_ids(image.diff_ids), strict=True)):
        console.print(f"layer {i}  digest   {layer.digest}", highlight=False, soft_wrap=True)
        console.print(
            f"         type     {layer.media_type}, {layer.size:,} bytes", highlight=False, soft_wrap=True
        )
        console.print(f"         diff ID  {image.diff_ids[i]}", highlight=False, soft_wrap=True)
        console.print(f"         chain ID {chain}", highlight=False, soft_wrap=True)


def run_demo() -> int:
    """Run the demo and return the exit code; raises FetchError if docker-registry is missing or won't start."""
    console = Console()
    with LocalRegistry() as registry:
        console.print(
            f"registry: docker-registry on {registry.url} (storage in {registry.root})", soft_wrap=True
        )
        image = trio.run(_push_and_resolve, registry)
        _print(console, image)
    console.print("registry stopped")
    return 0
