"""The ``lazysnap`` command line: each subcommand parses flags and calls one module."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

import click

from index.errors import LazysnapError
from snapshotter.errors import UsageError

if TYPE_CHECKING:
    from snapshotter.config import Config

EXIT_USAGE = 2

# Set by --verbose (on the group or any command): debug logs, and tracebacks for errors.
_verbose = False


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _verbose
    _verbose = _verbose or value


VERBOSE_OPTION = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_verbose,
    help="Log debug messages; show a traceback with an error.",
)
CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML config file (see docs/config.md); flags override it.",
)
ROOT_OPTION = click.option(
    "--root",
    type=click.Path(file_okay=False),
    help="State directory: blob cache, stored indexes, mount records; default: the config's, else /var/lib/lazysnap.",
)
PLAIN_HTTP_OPTION = click.option(
    "--plain-http", is_flag=True, help="Use plain HTTP for this registry (automatic for localhost)."
)
DOCKER_CONFIG_OPTION = click.option(
    "--docker-config",
    type=click.Path(dir_okay=False),
    help="Credentials file (default ~/.docker/config.json).",
)


def _load(config_path: str | None, **flags: Any) -> Config:
    """The config file with the flags applied; raises ConfigError."""
    from snapshotter.config import command_line_overrides, load_config

    return load_config(config_path, **command_line_overrides(verbose=_verbose, **flags))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lazysnap")
@VERBOSE_OPTION
def cli() -> None:
    """lazysnap: a lazy-loading container snapshotter for containerd."""


@cli.command()
@VERBOSE_OPTION
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
@CONFIG_OPTION
@VERBOSE_OPTION
def serve(root: str | None, address: str | None, config_path: str | None) -> None:
    """Serve containerd's snapshot API as a proxy plugin on a unix socket."""
    from snapshotter.config import check_socket_path, prepare_root
    from snapshotter.service.daemon import serve_forever
    from snapshotter.service.remote_layers import fuse_remote_layers

    config = _load(config_path, root=root, address=address)
    check_socket_path(config.address, "address")
    prepare_root(config)
    sys.exit(serve_forever(config, remote_layers=fuse_remote_layers))


@cli.command()
@click.argument("reference")
@click.argument("mountpoint", type=click.Path())
@ROOT_OPTION
@CONFIG_OPTION
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
@VERBOSE_OPTION
def mount(
    reference: str,
    mountpoint: str,
    root: str | None,
    config_path: str | None,
    plain_http: bool,
    foreground: bool,
    eager: bool,
    no_background_fetch: bool,
    docker_config: str | None,
    status_fd: int | None,
) -> None:
    """Mount image REFERENCE at MOUNTPOINT; file bytes are fetched when something reads them."""
    from snapshotter.config import prepare_root
    from snapshotter.mount.command import (
        build_mount_options,
        check_mountpoint,
        check_root_for_mount,
        spawn_daemon,
    )
    from snapshotter.remote.reference import parse_reference

    config = _load(
        config_path,
        root=root,
        plain_http=plain_http,
        docker_config=docker_config,
        no_background_fetch=no_background_fetch,
    )
    _configure_logging(config.log_level)
    parse_reference(reference)  # a bad reference is refused here, before anything is started
    check_mountpoint(mountpoint)
    prepare_root(config)
    check_root_for_mount(config, mountpoint)
    if eager:
        from snapshotter.mount.eager import run_eager_mount

        sys.exit(run_eager_mount(reference, mountpoint, config))
    from snapshotter.mount.daemon import run_mount_daemon

    options = build_mount_options(reference, mountpoint, config, config_path, plain_http=plain_http)
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
@CONFIG_OPTION
@VERBOSE_OPTION
def umount(mountpoint: str, root: str | None, config_path: str | None) -> None:
    """Unmount a lazysnap mount and stop its daemon."""
    from snapshotter.mount.command import umount_command

    sys.exit(umount_command(_load(config_path, root=root).root, mountpoint))


@cli.command()
@click.argument("mountpoint", type=click.Path())
@ROOT_OPTION
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@VERBOSE_OPTION
def stats(mountpoint: str, root: str | None, config_path: str | None, as_json: bool) -> None:
    """Show per-layer statistics of a running mount: how each layer is served, bytes fetched, hits."""
    from rich.console import Console

    from snapshotter.mount.command import stats_command

    sys.exit(stats_command(_load(config_path, root=root).root, mountpoint, as_json, Console()))


@cli.group("index")
@VERBOSE_OPTION
def index_group() -> None:
    """Layer indexes: build them once and publish them next to the image."""


@index_group.command("push")
@click.argument("reference")
@ROOT_OPTION
@CONFIG_OPTION
@PLAIN_HTTP_OPTION
@DOCKER_CONFIG_OPTION
@click.option(
    "--spacing",
    type=click.IntRange(min=64 << 10),
    help="Uncompressed bytes between gzip seek points: smaller means less fetched per cold read, "
    "a bigger index; default: the config's layers.gzip_spacing_bytes, else 1 MiB.",
)
@VERBOSE_OPTION
def index_push(
    reference: str,
    root: str | None,
    config_path: str | None,
    plain_http: bool,
    docker_config: str | None,
    spacing: int | None,
) -> None:
    """Index every layer of REFERENCE and push the indexes to its registry, so mounts are lazy everywhere."""
    import trio

    from snapshotter.config import prepare_root
    from snapshotter.layers.index_push import push_image_indexes
    from snapshotter.remote.reference import parse_reference

    config = _load(
        config_path, root=root, plain_http=plain_http, docker_config=docker_config, gzip_spacing=spacing
    )
    _configure_logging(config.log_level)
    parse_reference(reference)
    prepare_root(config)
    pushed = trio.run(push_image_indexes, reference, config)
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
@VERBOSE_OPTION
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


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request drowns what matters; --verbose brings it back.
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def _describe(error: BaseException) -> str:
    """One line naming the cause of ``error``."""
    if isinstance(error, LazysnapError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return f"{type(error).__name__}: {error} (a bug? --verbose shows the traceback)"


def main() -> None:
    """Run the CLI; an error becomes one line on stderr (a traceback too with --verbose) and exit code 1 or 2."""
    try:
        cli(standalone_mode=True)
    except Exception as error:
        if _verbose:
            traceback.print_exc()
        click.echo(f"lazysnap: {_describe(error)}", err=True)
        sys.exit(EXIT_USAGE if isinstance(error, UsageError) else 1)


if __name__ == "__main__":
    main()
