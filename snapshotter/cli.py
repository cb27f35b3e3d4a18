"""The ``lazysnap`` command line: each subcommand parses flags and calls one module."""

from __future__ import annotations

import sys

import click

from index.errors import LazysnapError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lazysnap")
def cli() -> None:
    """lazysnap: a lazy-loading container snapshotter for containerd."""


@cli.command()
def demo() -> None:
    """Start a local registry with a sample image and show what lazysnap does with it."""
    from snapshotter.demo import run_demo

    sys.exit(run_demo())


@cli.command()
@click.option("--root", required=True, type=click.Path(file_okay=False), help="State directory (metadata, cache, mounts).")
@click.option("--address", required=True, type=click.Path(dir_okay=False), help="Unix socket to serve the Snapshots API on.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="TOML config file.")
def serve(root: str, address: str, config_path: str | None) -> None:
    """Serve containerd's snapshot API as a proxy plugin on a unix socket."""
    from snapshotter.daemon import serve_forever

    sys.exit(serve_forever(root=root, address=address, config_path=config_path))


def main() -> None:
    """Run the CLI; a LazysnapError becomes one line on stderr and exit code 1."""
    try:
        cli(standalone_mode=True)
    except LazysnapError as error:
        click.echo(f"lazysnap: {error}", err=True)
        sys.exit(1)
