"""The ``lazysnap`` command line: each subcommand parses flags and calls one module."""

from __future__ import annotations

import logging
import os
import sys

import click

from index.errors import LazysnapError
from snapshotter.errors import UsageError

DEFAULT_ROOT = "/var/lib/lazysnap"
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lazysnap")
def cli() -> None:
    """lazysnap: a lazy-loading container snapshotter for containerd."""


@cli.command()
def demo() -> None:
    """Start a local registry with a sample image and show what lazysnap does with it."""
    from snapshotter.devtools.demo import run_demo

    sys.exit(run_demo())


@cli.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    help="State directory (metadata, cache, FUSE); default: the config's, else /var/lib/lazysnap.",
)
@click.option(
    "--address",
    type=click.Path(dir_okay=False),
    help="Unix socket to serve the Snapshots API on; default: the config's, else /run/lazysnap/lazysnap.sock.",
)
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="TOML config file."
)
def serve(root: str | None, address: str | None, config_path: str | None) -> None:
    """Serve containerd's snapshot API as a proxy plugin on a unix socket."""
    from snapshotter.service.daemon import serve_forever
    from snapshotter.service.remote_layers import fuse_remote_layers

    sys.exit(
        serve_forever(root=root, address=address, config_path=config_path, remote_layers=fuse_remote_layers)
    )


ROOT_OPTION = click.option(
    "--root",
    default=DEFAULT_ROOT,
    show_default=True,
    type=click.Path(file_okay=False),
    help="State directory: blob cache, stored indexes, mount records.",
)
PLAIN_HTTP_OPTION = click.option(
    "--plain-http", is_flag=True, help="Use plain HTTP for this registry (automatic for localhost)."
)
DOCKER_CONFIG_OPTION = click.option(
    "--docker-config",
    type=click.Path(dir_okay=False),
    help="Credentials file (default ~/.docker/config.json).",
)


@cli.command()
@click.argument("reference")
@click.argument("mountpoint", type=click.Path())
@ROOT_OPTION
@PLAIN_HTTP_OPTION
@click.option("--foreground", is_flag=True, help="Stay attached: serve until unmounted or interrupted.")
@click.option(
    "--eager", is_flag=True, help="Download and unpack every layer first (the baseline), then bind-mount."
)
@click.option(
    "--no-background-fetch",
    is_flag=True,
    help="Fetch only what is read; don't fill layers in the background.",
)
@DOCKER_CONFIG_OPTION
@click.option("--status-fd", type=int, hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def mount(
    reference: str,
    mountpoint: str,
    root: str,
    plain_http: bool,
    foreground: bool,
    eager: bool,
    no_background_fetch: bool,
    docker_config: str | None,
    status_fd: int | None,
    verbose: bool,
) -> None:
    """Mount image REFERENCE at MOUNTPOINT; file bytes are fetched when something reads them."""
    from snapshotter.mount.command import check_mountpoint, spawn_daemon

    _configure_logging(verbose)
    check_mountpoint(mountpoint)
    if eager:
        from snapshotter.mount.eager import run_eager_mount

        sys.exit(
            run_eager_mount(
                reference, mountpoint, root, plain_http=plain_http, docker_config_path=docker_config
            )
        )
    from snapshotter.mount.daemon import MountOptions, run_mount_daemon

    options = MountOptions(
        reference=reference,
        mountpoint=os.path.realpath(mountpoint),
        root=root,
        plain_http=plain_http,
        background_fetch=not no_background_fetch,
        docker_config_path=docker_config,
    )
    if foreground or status_fd is not None:
        sys.exit(run_mount_daemon(options, status_fd))
    code = spawn_daemon(options)
    # The daemon carries on alone and this process holds nothing to clean up: skipping the
    # interpreter's teardown of all that the daemon needed (trio, httpx, pyfuse3: ~35 ms)
    # returns the command that much sooner.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@cli.command()
@click.argument("mountpoint", type=click.Path())
@ROOT_OPTION
def umount(mountpoint: str, root: str) -> None:
    """Unmount a lazysnap mount and stop its daemon."""
    from snapshotter.mount.command import umount_command

    sys.exit(umount_command(root, mountpoint))


@cli.command()
@click.argument("mountpoint", type=click.Path())
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(mountpoint: str, root: str, as_json: bool) -> None:
    """Show per-layer statistics of a running mount: how each layer is served, bytes fetched, hits."""
    from rich.console import Console

    from snapshotter.mount.command import stats_command

    sys.exit(stats_command(root, mountpoint, as_json, Console()))


@cli.group("index")
def index_group() -> None:
    """Layer indexes: build them once and publish them next to the image."""


@index_group.command("push")
@click.argument("reference")
@ROOT_OPTION
@PLAIN_HTTP_OPTION
@DOCKER_CONFIG_OPTION
@click.option(
    "--spacing",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(min=64 << 10),
    help="Uncompressed bytes between gzip seek points: smaller means less fetched per cold read, a bigger index.",
)
def index_push(reference: str, root: str, plain_http: bool, docker_config: str | None, spacing: int) -> None:
    """Index every layer of REFERENCE and push the indexes to its registry, so mounts are lazy everywhere."""
    import trio

    from snapshotter.layers.index_push import push_image_indexes

    pushed = trio.run(
        lambda: push_image_indexes(
            reference, root, plain_http=plain_http, docker_config_path=docker_config, gzip_spacing=spacing
        )
    )
    for digest in pushed.published:
        click.echo(f"indexed {digest}")
    for digest, why in pushed.skipped.items():
        click.echo(f"skipped {digest}: {why}")
    click.echo(f"published {pushed.artifact_digest} as tag {pushed.tag}")


@cli.command()
@click.argument("references", nargs=-1, required=True)
@click.option("--plain-http", is_flag=True, help="Plain HTTP to the registry (the relay always is).")
@click.option(
    "--workload", help="Command run in the image (default: python3 -c 'import json', else sh -c true)."
)
@click.option(
    "--rate", help="Link rate to the registry, tc units (e.g. 100mbit); shaped with tbf in a netns."
)
@click.option("--rtt", help="Round-trip time to the registry (e.g. 20ms), added by a userspace relay.")
@click.option("--repeat", default=3, show_default=True, type=int, help="Runs per image and mode.")
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(
        [
            "eager",
            "lazy",
            "lazy+no-background-fetch",
            "lazy+stored-index",
            "containerd-overlayfs",
            "containerd-lazysnap",
        ]
    ),
    help="Modes to run (repeatable; default: all but lazy+stored-index; containerd-* where available).",
)
@click.option("--out", default="bench-results", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--workdir", type=click.Path(file_okay=False), help="Scratch space (default: a new dir in /var/tmp)."
)
def bench(
    references: tuple[str, ...],
    plain_http: bool,
    workload: str | None,
    rate: str | None,
    rtt: str | None,
    repeat: int,
    modes: tuple[str, ...],
    out: str,
    workdir: str | None,
) -> None:
    """Measure time to ready (pull + first workload run) of images, lazy against eager, on an emulated link."""
    from pathlib import Path

    from rich.console import Console

    from snapshotter.devtools.bench import BenchOptions, run_bench
    from snapshotter.devtools.bench.runner import DEFAULT_MODES

    options = BenchOptions(
        references=references,
        modes=modes or DEFAULT_MODES,
        out=Path(out),
        repeat=repeat,
        rate=rate,
        rtt=rtt,
        workload=workload,
        plain_http=plain_http,
        workdir=Path(workdir) if workdir else None,
    )
    # Logs and pipes get 80 columns by default, which truncates the tables; a terminal keeps its width.
    sys.exit(run_bench(options, Console() if sys.stdout.isatty() else Console(width=130)))


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request drowns what matters; -v brings it back.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main() -> None:
    """Run the CLI; a LazysnapError becomes one line on stderr and exit code 1."""
    try:
        cli(standalone_mode=True)
    except LazysnapError as error:
        click.echo(f"lazysnap: {error}", err=True)
        sys.exit(EXIT_USAGE if isinstance(error, UsageError) else 1)


if __name__ == "__main__":
    main()
