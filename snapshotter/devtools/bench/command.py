"""The loop behind ``lazysnap bench``: set up the link, run every (repeat, image, mode), report."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from snapshotter.devtools.bench.network import (
    LinkProfile,
    open_link,
    parse_duration,
    parse_rate,
    registry_host,
)
from snapshotter.devtools.bench.report import (
    LiveReport,
    require_matplotlib,
    summarize,
    summary_table,
    write_json,
    write_png,
)
from snapshotter.devtools.bench.runner import (
    BenchContext,
    BenchRunError,
    Runner,
    RunResult,
    available_modes,
    remove_tree,
)
from snapshotter.errors import UsageError


@dataclass(frozen=True)
class BenchOptions:
    """What the user asked for on the command line."""

    references: tuple[str, ...]
    modes: tuple[str, ...]
    out: Path
    repeat: int = 3
    rate: str | None = None
    rtt: str | None = None
    workload: str | None = None
    plain_http: bool = False
    workdir: Path | None = None
    keep_going: bool = True  # a failed run is recorded with its error; False: stop at the first


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (result.stdout or result.stderr).strip().splitlines()[0]
    return "unknown"


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on."""
    return {
        "lazysnap": metadata.version("lazysnap"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "containerd": _version(["containerd", "--version"]),
        "runc": _version(["runc", "--version"]),
        "docker-registry": _version(["docker-registry", "--version"]),
    }


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the same cleanup runs as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(options: BenchOptions, console: Console) -> int:
    """Run the benchmark and write its results; return the CLI exit code.

    Raises:
        UsageError: bad references, modes, rate or RTT, not running as root, no matplotlib.
    """
    require_matplotlib()  # before minutes of runs, not when their chart is drawn
    if os.geteuid() != 0:
        raise UsageError("lazysnap bench needs root: it mounts (FUSE, overlayfs), chroots and drops caches")
    if options.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    hosts = {registry_host(ref) for ref in options.references}
    if len(hosts) != 1:
        raise UsageError(f"all images must come from one registry; got {', '.join(sorted(hosts))}")
    profile = LinkProfile(
        parse_rate(options.rate) if options.rate else None,
        parse_duration(options.rtt) if options.rtt else 0.0,
    )
    modes = available_modes(options.modes, lambda text: console.print(f"[yellow]{text}[/yellow]"))
    options.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lazysnap-bench-", dir=options.workdir or "/var/tmp"))
    setup: dict[str, Any] = {
        "images": list(options.references),
        "modes": modes,
        "repeat": options.repeat,
        "network": profile.name,
        "rate_bps": profile.rate_bps,
        "rtt_s": profile.rtt_s,
        "workload": options.workload
        or "default: python3 -c 'import json' if the image has python3, else sh -c true",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "cold_start": "see snapshotter/bench/runner.py: root removed (stored-index mode keeps indexes), "
        "fresh containerd per containerd run, page cache dropped",
    }
    console.print(
        f"lazysnap bench: {len(options.references)} image(s) x {len(modes)} mode(s) x {options.repeat} "
        f"on {profile.name}; results in {options.out}"
    )
    runs: list[RunResult] = []
    try:
        with _sigterm_as_interrupt(), open_link(profile, hosts.pop()) as link:
            setup["relay"] = link.host
            context = BenchContext(link, workdir, plain_http=True, workload=options.workload)
            runner = Runner(context)
            with LiveReport(console) as live:
                for repeat in range(1, options.repeat + 1):
                    for reference in options.references:
                        for mode in modes:
                            image = link.rewrite(reference)
                            live.set_status(f"running {reference} {mode} #{repeat} ...")
                            try:
                                result = runner.run(image, mode, repeat)
                            except (BenchRunError, subprocess.SubprocessError) as error:
                                if not options.keep_going:
                                    raise
                                result = RunResult(
                                    reference, mode, repeat, "", 0.0, 0, 0, 0, error=str(error)
                                )
                            result.image = reference
                            runs.append(result)
                            live.add(result)
                            write_json(options.out / "results.json", setup, runs, summarize(runs))
    finally:
        remove_tree(workdir)
    summary = summarize(runs)
    write_json(options.out / "results.json", setup, runs, summary)
    if summary:
        write_png(options.out / "results.png", summary, f"lazysnap bench, {profile.name}")
    console.print(summary_table(summary))
    console.print(f"wrote {options.out / 'results.json'} and {options.out / 'results.png'}")
    failed = [run for run in runs if run.error]
    for run in failed:
        console.print(f"[red]failed: {run.image} {run.mode} #{run.repeat}: {run.error}[/red]", markup=True)
    return 1 if failed else 0
