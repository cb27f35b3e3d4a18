"""Soak ``lazysnap serve``: prepare, read and remove remote chains for N cycles; watch RSS and descriptors.

Starts a local docker-registry with a handful of small images (gzip, zstd, eStargz; two layers
each, one shared base), starts ``lazysnap serve`` on a private socket, and drives its gRPC
snapshot API directly (no containerd, so a cycle costs milliseconds of our own code): for each
image, ``Prepare`` every layer with containerd's remote-snapshot labels (ALREADY_EXISTS means it
is served lazily), ``View`` the top chain, read every file through the FUSE directory the view
mounts and compare it with the original, then ``Remove`` the view and the chain. After every
cycle through all images it samples the serve process's VmRSS and open descriptors and prints the
growth from the first cycle to the last as a ratio; ``--out DIR`` gets ``soak_serve.json``.

``--tracemalloc`` runs serve under ``tracemalloc`` (started by a wrapper, not by lazysnap's code):
SIGUSR1 makes it dump a snapshot, taken after the first cycle and after the last; the
allocation sites that grew most between the two go to ``tracemalloc.txt`` in ``--out``.
``--referrers NAME,...`` also writes, with each snapshot, how many objects of those classes are
alive and what refers to the last few (``serve.tracemalloc.N.referrers.txt``).

    .venv/bin/python scripts/soak_serve.py --cycles 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapshotter.devtools.image_builder import Layer, TarEntry, file, make_layer, push_image
from snapshotter.devtools.local_registry import LocalRegistry
from snapshotter.layers.sources import TOC_DIGEST_ANNOTATION
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import Reference
from snapshotter.service.chain_ids import chain_ids
from tests.support.estargz_writer import build_estargz
from tests.support.lazysnap_cli import index_push

REPOSITORY = Path(__file__).resolve().parent.parent
REF_LABEL = "containerd.io/snapshot.ref"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYER_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
SERVE_START_TIMEOUT = 30.0
TRACEMALLOC_FRAMES = 12
# Runs the CLI with tracemalloc on; SIGUSR1 dumps a snapshot to $LAZYSNAP_SOAK_SNAPSHOT.N.
TRACEMALLOC_WRAPPER = """
import itertools, os, signal, sys, tracemalloc
tracemalloc.start(FRAMES)
counter = itertools.count()
def describe(obj):
    text = type(obj).__qualname__
    if isinstance(obj, dict):
        text += " keys=" + repr(list(obj)[:4])[:160] + " len=" + str(len(obj))
    elif isinstance(obj, (list, tuple, set)):
        text += " len=" + str(len(obj))
    elif type(obj).__name__ == "frame":
        text += " " + obj.f_code.co_filename + ":" + str(obj.f_lineno)
    return text
def referrers(names):
    import gc
    gc.collect()
    lines = []
    objects = gc.get_objects()
    for name in names:
        found = [o for o in objects if type(o).__name__ == name]
        lines.append(name + ": " + str(len(found)) + " live")
        for obj in found[-3:]:
            lines.append("  " + repr(obj)[:200])
            for ref in gc.get_referrers(obj):
                if ref is found or ref is objects:
                    continue
                lines.append("    <- " + describe(ref))
                for ref2 in gc.get_referrers(ref)[:6]:
                    if ref2 is found or ref2 is objects:
                        continue
                    lines.append("        <- " + describe(ref2))
    del objects
    return "\\n".join(lines) + "\\n"
def dump(signum, frame):
    path = os.environ["LAZYSNAP_SOAK_SNAPSHOT"] + "." + str(next(counter))
    names = [n for n in os.environ.get("LAZYSNAP_SOAK_REFERRERS", "").split(",") if n]
    if names:
        with open(path + ".referrers.txt", "w") as report:
            report.write(referrers(names))
    tracemalloc.take_snapshot().dump(path + ".partial")
    os.replace(path + ".partial", path)
signal.signal(signal.SIGUSR1, dump)
from snapshotter.cli import main
sys.argv[0] = "lazysnap"
main()
""".replace("FRAMES", str(TRACEMALLOC_FRAMES))


@dataclass(frozen=True)
class SoakImage:
    """A pushed image: reference, manifest digest, layer digests, chain IDs and file contents."""

    reference: str
    manifest_digest: str
    layer_digests: list[str]
    chains: list[str]
    files: dict[str, bytes]


def own_entries(seed: int) -> list[TarEntry]:
    """The files of one image's own layer (deterministic in ``seed``)."""
    rng = random.Random(seed)
    entries = [file(f"app{seed}/data{i}.bin", rng.randbytes(40_000)) for i in range(4)]
    return [*entries, file(f"app{seed}/config.txt", f"seed = {seed}\n")]


def layers_for(fmt: str, seed: int, base: Layer) -> list[Layer]:
    """A shared base layer and one of the image's own, in ``fmt``."""
    entries = own_entries(seed)
    if fmt == "estargz":
        written = build_estargz(entries)
        own = Layer(
            written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest}
        )
    else:
        own = make_layer(entries, fmt, frame_size=64 << 10 if fmt == "zstd" else None)  # type: ignore[arg-type]
    return [base, own]


async def push_images(registry: LocalRegistry, count: int) -> list[SoakImage]:
    """Push ``count`` images over formats gzip, zstd, eStargz."""
    base_entries = [
        file("base/os-release", "ID=soak\n"),
        file("base/lib.bin", random.Random(0).randbytes(100_000)),
    ]
    written = build_estargz(base_entries)
    base = Layer(written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest})
    images = []
    async with RegistryClient(docker_config_path="/nonexistent/config.json") as client:
        for number in range(count):
            fmt = ("gzip", "zstd", "estargz")[number % 3]
            layers = layers_for(fmt, number + 1, base)
            ref = Reference(registry.host, f"soak/{fmt}-{number}", "latest", None)
            pushed = await push_image(client, ref, layers)
            files = {e.path: e.content for e in [*base_entries, *own_entries(number + 1)]}
            images.append(
                SoakImage(
                    str(ref),
                    pushed.manifest_digest,
                    [d.digest for d in pushed.layers],
                    chain_ids(pushed.diff_ids),
                    files,
                )
            )
    return images


def sample(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open descriptors) of process ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def cycle_image(stub: Any, image: SoakImage, cycle: int) -> int:
    """Prepare the image's remote chain, read every file through FUSE, remove it all; return bytes read."""
    for number, chain in enumerate(image.chains):
        labels = {
            REF_LABEL: chain,
            IMAGE_REF_LABEL: image.reference,
            LAYER_LABEL: image.layer_digests[number],
            MANIFEST_LABEL: image.manifest_digest,
        }
        request = pb.PrepareSnapshotRequest(
            snapshotter="proxy",
            key=f"extract-{cycle}-{number} {chain}",
            parent=image.chains[number - 1] if number else "",
            labels=labels,
        )
        try:
            stub.Prepare(request)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise
        else:
            raise SystemExit(f"layer {number} of {image.reference} was not served remotely")
    view_key = f"view-{cycle}-{image.manifest_digest[7:19]}"
    mounts = stub.View(
        pb.ViewSnapshotRequest(snapshotter="proxy", key=view_key, parent=image.chains[-1])
    ).mounts
    lowers = [
        lower
        for mount in mounts
        for option in mount.options
        if option.startswith("lowerdir=")
        for lower in option.removeprefix("lowerdir=").split(":")
    ] or [mounts[0].source]
    read = 0
    for path, content in image.files.items():
        found = [Path(lower, path) for lower in lowers if Path(lower, path).exists()]
        data = found[0].read_bytes() if found else b""
        if data != content:
            raise SystemExit(f"cycle {cycle}: {image.reference} {path}: wrong bytes through FUSE")
        read += len(data)
    stub.Remove(pb.RemoveSnapshotRequest(snapshotter="proxy", key=view_key))
    for chain in reversed(image.chains):
        stub.Remove(pb.RemoveSnapshotRequest(snapshotter="proxy", key=chain))
    return read


def wait_for_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``lazysnap serve`` listens on ``path``."""
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"lazysnap serve did not start (exit {process.poll()})")
        time.sleep(0.1)


def take_snapshot(pid: int, base: Path, number: int) -> Path:
    """Make the traced serve process dump its snapshot ``number`` and wait for the file."""
    path = Path(f"{base}.{number}")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no tracemalloc snapshot {path}")
        time.sleep(0.2)
    return path


def compare_snapshots(first: Path, last: Path, out: Path) -> None:
    """Write the allocation sites that grew most from ``first`` to ``last`` (by line, and by traceback)."""
    import tracemalloc

    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ]
    old = tracemalloc.Snapshot.load(str(first)).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(last)).filter_traces(ignore)
    lines = [
        f"traced: first {sum(s.size for s in old.statistics('filename')) / 1024:.0f} KiB, "
        f"last {sum(s.size for s in new.statistics('filename')) / 1024:.0f} KiB",
        "",
        "top 25 by line:",
    ]
    lines += [str(stat) for stat in new.compare_to(old, "lineno")[:25]]
    lines += ["", "top 8 by traceback:"]
    for stat in new.compare_to(old, "traceback")[:8]:
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks")
        lines += ["    " + line for line in stat.traceback.format()]
    (out / "tracemalloc.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tracemalloc", action="store_true", help="trace serve's allocations (slower)")
    parser.add_argument(
        "--referrers", default="", help="with --tracemalloc: class names whose live objects to explain"
    )
    options = parser.parse_args()
    out: Path = options.out or Path(tempfile.mkdtemp(prefix="lazysnap-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazysnap-soak-work-"))
    print(f"soak: {options.cycles} cycles over {options.images} images (2 layers each); results in {out}")
    with LocalRegistry(work / "registry") as registry:
        images = trio.run(push_images, registry, options.images)
        for image in images:  # gzip and zstd layers are served remotely from published indexes
            index_push(image.reference, work / "index-root", cwd=REPOSITORY)
        config = work / "config.toml"
        config.write_text(
            f'[registry]\nplain_http = ["{registry.host}"]\n\n[background_fetch]\nenabled = false\n'
        )
        socket_path = work / "lazysnap.sock"
        log_file = (out / "serve.log").open("wb")
        snapshot_base = out / "serve.tracemalloc"
        launcher = ["-c", TRACEMALLOC_WRAPPER] if options.tracemalloc else ["-m", "snapshotter.cli"]
        process = subprocess.Popen(
            [
                sys.executable,
                *launcher,
                "serve",
                "--root",
                str(work / "root"),
                "--address",
                str(socket_path),
                "--config",
                str(config),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
            env=os.environ
            | {"LAZYSNAP_SOAK_SNAPSHOT": str(snapshot_base), "LAZYSNAP_SOAK_REFERRERS": options.referrers},
        )
        snapshots: list[Path] = []
        samples: list[dict[str, float]] = []
        try:
            wait_for_socket(socket_path, process)
            channel = grpc.insecure_channel(f"unix://{socket_path}")
            stub = pb_grpc.SnapshotsStub(channel)
            started = time.monotonic()
            for cycle in range(options.cycles):
                read = sum(cycle_image(stub, image, cycle) for image in images)
                rss, fds = sample(process.pid)
                samples.append(
                    {
                        "cycle": cycle,
                        "rss_kib": rss,
                        "fds": fds,
                        "bytes_read": read,
                        "seconds": time.monotonic() - started,
                    }
                )
                if options.tracemalloc and cycle in (0, options.cycles - 1):
                    snapshots.append(take_snapshot(process.pid, snapshot_base, len(snapshots)))
                if cycle % max(1, options.cycles // 10) == 0 or cycle == options.cycles - 1:
                    print(f"  cycle {cycle:5d}: rss {rss / 1024:7.1f} MiB  fds {fds:4d}")
            channel.close()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log_file.close()
    first, last = samples[0], samples[-1]
    result = {
        "cycles": options.cycles,
        "images": options.images,
        "first": first,
        "last": last,
        "rss_ratio": last["rss_kib"] / first["rss_kib"],
        "fds_ratio": last["fds"] / first["fds"],
        "samples": samples,
    }
    (out / "soak_serve.json").write_text(json.dumps(result, indent=1))
    if len(snapshots) == 2:
        compare_snapshots(*snapshots, out)
    print(
        f"rss  first {first['rss_kib'] / 1024:.1f} MiB  last {last['rss_kib'] / 1024:.1f} MiB  ratio {result['rss_ratio']:.3f}"
    )
    print(f"fds  first {first['fds']}  last {last['fds']}  ratio {result['fds_ratio']:.3f}")
    print(f"wrote {out / 'soak_serve.json'}")


if __name__ == "__main__":
    main()
