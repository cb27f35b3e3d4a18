#!/usr/bin/env python3
"""Read every file of a lazy mount while the registry misbehaves, then again once it is healthy.

Two images on a local docker-registry, each one layer of the same files:

- ``estargz``: an eStargz blob written by ``tests/support/estargz_writer.py``, with its
  ``toc.digest`` annotation (served from its TOC);
- ``gzip``: a plain gzip layer whose index is published next to it by ``lazysnap index push``
  (served from that stored index).

Both are mounted with ``lazysnap mount --no-background-fetch`` (the CLI, as a user runs it; an
empty ``--root`` per scenario) through ``tests/support/tampering_proxy.py``, healthy while
mounting. Then, per scenario, the proxy's fault is switched on for every blob GET and every file
is read cold, in 128 KiB ``pread`` calls, each timed: a read that fails is retried by nobody
but the kernel, and whatever the kernel does for it (e.g. its retry of a failed readahead) is
inside that one call. A file's outcome is ``correct`` (its exact bytes), ``EIO``, ``wrong``
(any other bytes, a short file included: a bug) or another errno. Then the proxy is switched
back to healthy and every file is read again on the same mount, page cache dropped for the file
first (``POSIX_FADV_DONTNEED``), and must be ``correct``.

Scenarios (``--scenario`` to pick; default all): ``healthy``, ``hang`` (accept, never answer),
``503`` (every blob GET answered 503), ``full200`` (Range ignored: 200 and the whole blob),
``truncate`` (half the announced body, then close), ``trickle`` (20 KB/s), ``flip`` (every byte
of a 206 answer inverted), ``reset`` (TCP RST), ``down`` (nothing listens: connection refused).

Prints a table (scenario x image: correct / EIO / wrong / other / max seconds of one read call /
correct after recovery) and writes ``fault_runs.json`` to ``--out DIR`` (default: a new
directory under the system temp dir). Exit status 1 if any read returned wrong bytes, a read
took longer than ``--limit`` (60 s, the default ``fuse.read_timeout_seconds``), or a file read
wrong after recovery.

    .venv/bin/python scripts/fault_runs.py --out /tmp/faults
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_output import add_out_argument, out_dir, write_json
from snapshotter.devtools.image_builder import Layer, TarEntry, directory, file, make_layer, symlink
from snapshotter.devtools.local_registry import LocalRegistry
from snapshotter.layers.sources import TOC_DIGEST_ANNOTATION
from snapshotter.mount.state import pid_alive
from snapshotter.remote.reference import Reference
from tests.support.estargz_writer import build_estargz
from tests.support.lazysnap_cli import LAZYSNAP, CliSession, push
from tests.support.tampering_proxy import FaultKind, TamperingProxy

SCENARIOS: tuple[FaultKind, ...] = (
    "none",
    "hang",
    "503",
    "full200",
    "truncate",
    "trickle",
    "flip",
    "reset",
    "down",
)
SCENARIO_NAMES = {"none": "healthy"}
READ_SIZE = 128 << 10
ESTARGZ_CHUNK = 256 << 10
STUCK_AFTER = 300.0  # seconds: a read call still running then is recorded as stuck
REPOSITORY = Path(__file__).resolve().parent.parent


def scenario_name(kind: FaultKind) -> str:
    """What the table calls a fault kind."""
    return SCENARIO_NAMES.get(kind, kind)


def entries() -> list[TarEntry]:
    """The files of both images: small configs side by side, an executable, a mid-size and a large file."""
    rng = random.Random(7)
    return [
        directory("etc"),
        file("etc/app.conf", "key = value\n"),
        file("etc/other.conf", "other = 1\n" * 50),
        file("etc/motd", "hello\n"),
        directory("bin"),
        file("bin/tool", rng.randbytes(200_000), mode=0o755),
        symlink("bin/tool-link", "tool"),
        directory("data"),
        file("data/mid.bin", rng.randbytes(600_000)),
        file("data/big.bin", rng.randbytes(1 << 20)),
        file("data/text.txt", "".join(f"line {i}\n" for i in range(20_000))),
    ]


def contents() -> dict[str, bytes]:
    """Path to content of every regular file."""
    return {entry.path: entry.content for entry in entries() if entry.kind == "file"}


@dataclass
class Image:
    """A pushed image: its name in the table, reference on the registry (not through the proxy)."""

    name: str
    repository: str
    tag: str
    how: str = ""


@dataclass
class FileOutcome:
    """What reading one file gave: outcome, per-call seconds, and bytes read before it ended."""

    path: str
    outcome: str  # correct | EIO | wrong | stuck | <errno name>
    calls: list[float] = field(default_factory=list)
    bytes_read: int = 0
    detail: str = ""

    @property
    def max_seconds(self) -> float:
        return max(self.calls, default=0.0)


def push_images(registry: LocalRegistry, index_root: Path) -> list[Image]:
    """Push the eStargz image and the gzip image, and publish the gzip image's index."""
    written = build_estargz(entries(), chunk_size=ESTARGZ_CHUNK)
    estargz = Layer(
        written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest}
    )
    push(Reference(registry.host, "faults/estargz", "v1", None), [estargz])
    push(Reference(registry.host, "faults/gzip", "v1", None), [make_layer(entries(), "gzip")])
    subprocess.run(
        [
            *LAZYSNAP,
            "index",
            "push",
            "--root",
            str(index_root),
            "--docker-config",
            "/nonexistent/config.json",
            f"{registry.host}/faults/gzip:v1",
        ],
        check=True,
        capture_output=True,
        cwd=REPOSITORY,
    )
    return [Image("estargz", "faults/estargz", "v1"), Image("gzip", "faults/gzip", "v1")]


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))


def read_file(path: Path, expected: bytes, outcome: FileOutcome) -> None:
    """Read ``path`` in READ_SIZE preads (page cache dropped first), recording into ``outcome``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        outcome.outcome = "EIO" if error.errno == errno.EIO else errno_name(error.errno or 0)
        outcome.detail = f"open: {error}"
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        data = bytearray()
        while True:
            started = time.monotonic()
            try:
                piece = os.pread(fd, READ_SIZE, len(data))
            except OSError as error:
                outcome.calls.append(time.monotonic() - started)
                outcome.outcome = "EIO" if error.errno == errno.EIO else errno_name(error.errno or 0)
                outcome.detail = f"pread at {len(data)}: {error}"
                outcome.bytes_read = len(data)
                return
            outcome.calls.append(time.monotonic() - started)
            if not piece:
                break
            data += piece
            if bytes(data) != expected[: len(data)]:
                break
        outcome.bytes_read = len(data)
        if bytes(data) == expected:
            outcome.outcome = "correct"
        else:
            outcome.outcome = "wrong"
            first = next((i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b), None)
            outcome.detail = f"{len(data)} bytes read of {len(expected)}; first difference at {first}"
    finally:
        os.close(fd)


def read_all(mountpoint: Path, files: dict[str, bytes]) -> list[FileOutcome]:
    """Read every file in turn, each in a thread so that a read stuck past STUCK_AFTER is recorded, not waited for."""
    outcomes = []
    for path, content in files.items():
        outcome = FileOutcome(path, "stuck")
        worker = threading.Thread(target=read_file, args=(mountpoint / path, content, outcome), daemon=True)
        worker.start()
        worker.join(STUCK_AFTER)
        if worker.is_alive():
            outcome.detail = f"a read call still running after {STUCK_AFTER:.0f} s"
            outcomes.append(outcome)
            break  # the mount is wedged: reading on would only stack up stuck threads
        outcomes.append(outcome)
    return outcomes


def summarize(outcomes: list[FileOutcome]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
    return {
        "correct": counts.get("correct", 0),
        "EIO": counts.get("EIO", 0),
        "wrong": counts.get("wrong", 0),
        "other": sum(v for k, v in counts.items() if k not in ("correct", "EIO", "wrong")),
        "max_seconds": max((o.max_seconds for o in outcomes), default=0.0),
    }


def run_scenario(
    kind: FaultKind,
    images: list[Image],
    proxy: TamperingProxy,
    work: Path,
    files: dict[str, bytes],
    logs: Path,
) -> dict[str, Any]:
    """Mount both images healthy, read under ``kind``, heal, read again; the results per image (daemon logs to ``logs``)."""
    session = CliSession(work / f"root-{scenario_name(kind)}")
    mounts: dict[str, Path] = {}
    result: dict[str, Any] = {"scenario": scenario_name(kind), "images": {}}
    try:
        proxy.set_fault("none")
        for image in images:
            mountpoint = work / f"mnt-{scenario_name(kind)}-{image.name}"
            mountpoint.mkdir()
            mounted = session.mount(
                f"{proxy.host}/{image.repository}:{image.tag}", mountpoint, "--no-background-fetch"
            )
            if mounted.returncode != 0:
                raise SystemExit(f"mount of {image.name} failed:\n{mounted.stdout}{mounted.stderr}")
            image.how = session.stats(mountpoint)["layers"][0]["how"]
            mounts[image.name] = mountpoint
        before = proxy.blob_requests
        proxy.set_fault(kind)
        faulty: dict[str, list[FileOutcome]] = {}
        threads = [
            threading.Thread(
                target=lambda name=name, mnt=mnt: faulty.__setitem__(name, read_all(mnt, files)), daemon=True
            )
            for name, mnt in mounts.items()
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        faulty_seconds = time.monotonic() - started
        tampered = proxy.tampered
        blob_requests = proxy.blob_requests - before
        proxy.set_fault("none")
        for image in images:
            mountpoint = mounts[image.name]
            pid = session.daemon_pid(mountpoint)
            alive = pid is not None and pid_alive(pid)
            recovered = read_all(mountpoint, files) if alive else []
            stats = session.stats(mountpoint)["layers"][0] if alive else {}
            result["images"][image.name] = {
                "how": image.how,
                "faulty": summarize(faulty[image.name]),
                "faulty_files": [asdict(o) for o in faulty[image.name]],
                "daemon_alive_after_fault": alive,
                "recovered": summarize(recovered),
                "recovered_files": [asdict(o) for o in recovered],
                "stats_after": stats,
            }
        result |= {"faulty_seconds": faulty_seconds, "blob_requests": blob_requests, "tampered": tampered}
    finally:
        proxy.set_fault("none")
        (logs / f"{scenario_name(kind)}.log").write_text(session.daemon_log())
        session.cleanup()
    return result


def table(results: list[dict[str, Any]], limit: float) -> tuple[str, bool]:
    """The table, and whether everything was within the rules."""
    header = f"{'scenario':9} {'image':8} {'correct':>7} {'EIO':>4} {'wrong':>5} {'other':>5} {'max s':>6}  {'after recovery'}"
    lines = [header, "-" * len(header)]
    ok = True
    for result in results:
        for name, image in result["images"].items():
            faulty, recovered = image["faulty"], image["recovered"]
            total = sum(recovered[k] for k in ("correct", "EIO", "wrong", "other"))
            after = f"{recovered['correct']}/{len(contents())}"
            flags = []
            if faulty["wrong"] or recovered["wrong"]:
                flags.append("WRONG BYTES")
            if faulty["max_seconds"] > limit:
                flags.append(f"read > {limit:.0f} s")
            if not image["daemon_alive_after_fault"]:
                flags.append("daemon died")
            if recovered["correct"] != len(contents()) or total != len(contents()):
                flags.append("not recovered")
            if faulty["other"]:
                flags.append("other errno")
            ok = ok and not flags
            lines.append(
                f"{result['scenario']:9} {name:8} {faulty['correct']:7d} {faulty['EIO']:4d} {faulty['wrong']:5d} "
                f"{faulty['other']:5d} {faulty['max_seconds']:6.1f}  {after}  {' '.join(flags)}"
            )
    return "\n".join(lines), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=[scenario_name(k) for k in SCENARIOS])
    parser.add_argument("--limit", type=float, default=60.0, help="seconds one read call may take")
    add_out_argument(parser)
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("fault_runs: run as root (FUSE mounts)", file=sys.stderr)
        return 2
    out = out_dir(options.out, "fault_runs")
    kinds = [k for k in SCENARIOS if options.scenario is None or scenario_name(k) in options.scenario]
    work = Path(tempfile.mkdtemp(prefix="lazysnap-faults-"))
    files = contents()
    logs = out / "daemon-logs"
    logs.mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []
    with LocalRegistry(work / "registry") as registry, TamperingProxy("127.0.0.1", registry.port) as proxy:
        images = push_images(registry, work / "index-root")
        for kind in kinds:
            started = time.monotonic()
            result = run_scenario(kind, images, proxy, work, files, logs)
            result["seconds"] = time.monotonic() - started
            results.append(result)
            write_json(
                out, "fault_runs.json", {"files": sorted(files), "limit": options.limit, "results": results}
            )
            text, _ = table([result], options.limit)
            print(
                f"{text.splitlines()[-2]}\n{text.splitlines()[-1]}  ({result['seconds']:.0f} s)", flush=True
            )
    text, ok = table(results, options.limit)
    print()
    print(text)
    (out / "fault_runs.txt").write_text(text + "\n")
    print(f"wrote {out / 'fault_runs.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
