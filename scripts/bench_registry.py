#!/usr/bin/env python3
"""Benchmark RegistryClient range reads against a local docker-registry, next to a whole-blob GET.

Starts docker-registry on a free 127.0.0.1 port, pushes one large random blob, then in the same run:
  * baseline: one sequential GET of the whole blob (stream_blob: 1 MiB chunks, sha256-verified);
  * N random ranges of L KiB (same offsets for every run) at concurrency 1, 8 and 32
    (a trio nursery, a semaphore, one pooled client).
Prints a table (requests/s, MB/s, latency percentiles, ratio of MB/s to the baseline, bytes the
registry sent according to its log, CPU ms per request of the client and of the registry) and
writes the same numbers as JSON (bench_registry.json) to the --out directory. Client and registry share this machine's cores.

    .venv/bin/python scripts/bench_registry.py --size-mb 192 --out /tmp/bench-results
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_output import add_out_argument, out_dir, write_json
from snapshotter.devtools.local_registry import LocalRegistry
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import Reference

MB = 1_000_000


@dataclass
class Result:
    """One measured run."""

    name: str
    concurrency: int
    requests: int
    bytes: int
    seconds: float
    registry_bytes: int
    client_cpu_s: float = 0.0  # CPU of this process (the client) during the run
    registry_cpu_s: float = 0.0  # CPU of the docker-registry process during the run
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds


def _random_blob(size: int, seed: int) -> bytes:
    # Random bytes, so nothing along the way (page cache aside) can compress or dedupe them.
    return random.Random(seed).randbytes(size)


async def _baseline(client: RegistryClient, registry: LocalRegistry, ref: Reference, digest: str) -> Result:
    mark, cpu, registry_cpu = registry.mark(), time.process_time(), registry.cpu_seconds()
    start = time.perf_counter()
    total = 0
    async for chunk in client.stream_blob(ref, digest):
        total += len(chunk)
    seconds = time.perf_counter() - start
    return Result(
        "whole-blob GET",
        1,
        1,
        total,
        seconds,
        registry.bytes_sent_since(mark, method="GET"),
        client_cpu_s=time.process_time() - cpu,
        registry_cpu_s=registry.cpu_seconds() - registry_cpu,
    )


async def _ranges(
    client: RegistryClient,
    registry: LocalRegistry,
    ref: Reference,
    digest: str,
    offsets: list[int],
    length: int,
    concurrency: int,
) -> Result:
    semaphore = trio.Semaphore(concurrency)
    latencies: list[float] = []
    received = 0

    async def one(offset: int) -> None:
        nonlocal received
        async with semaphore:
            begin = time.perf_counter()
            data = await client.read_range(ref, digest, offset, length)
            latencies.append(time.perf_counter() - begin)
            received += len(data)

    mark, cpu, registry_cpu = registry.mark(), time.process_time(), registry.cpu_seconds()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for offset in offsets:
            nursery.start_soon(one, offset)
    seconds = time.perf_counter() - start
    cpu, registry_cpu = time.process_time() - cpu, registry.cpu_seconds() - registry_cpu
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(
        f"{length // 1024} KiB ranges",
        concurrency,
        len(offsets),
        received,
        seconds,
        registry.bytes_sent_since(mark, method="GET"),
        client_cpu_s=cpu,
        registry_cpu_s=registry_cpu,
        p50_ms=quantiles[49] * 1000,
        p99_ms=quantiles[98] * 1000,
    )


async def _run(args: argparse.Namespace, registry: LocalRegistry) -> tuple[list[Result], dict[str, Any]]:
    size = args.size_mb * MB
    blob = _random_blob(size, args.seed)
    ref = Reference(registry.host, "bench/blob", "latest", None)
    async with RegistryClient(
        docker_config_path="/nonexistent/config.json", max_connections=args.max_connections
    ) as c:
        push_start = time.perf_counter()
        descriptor = await c.push_blob(ref, blob)
        push_seconds = time.perf_counter() - push_start
        del blob
        rng = random.Random(args.seed + 1)
        length = args.range_kib * 1024
        offsets = [rng.randrange(0, size - length) for _ in range(args.requests)]
        await c.read_range(ref, descriptor.digest, 0, 1)  # warm the pool and the registry's page cache path
        results = [await _baseline(c, registry, ref, descriptor.digest)]
        for concurrency in args.concurrency:
            results.append(await _ranges(c, registry, ref, descriptor.digest, offsets, length, concurrency))
    setup = {
        "blob_bytes": size,
        "blob_digest": descriptor.digest,
        "push_seconds": round(push_seconds, 3),
        "range_bytes": length,
        "requests": args.requests,
        "max_connections": args.max_connections,
        "registry": "docker-registry (distribution 2.8) on 127.0.0.1, filesystem storage, plain HTTP/1.1",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "baseline": "one GET of the whole blob via stream_blob (1 MiB chunks, sha256 verified)",
    }
    return results, setup


def _table(results: list[Result]) -> str:
    baseline = results[0].mb_per_s
    header = (
        f"{'run':<16} {'conc':>4} {'reqs':>5} {'req/s':>8} {'MB/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'vs base':>7} {'reg MB':>7} {'cli ms/req':>10} {'reg ms/req':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        p50 = f"{r.p50_ms:.2f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.2f}" if r.p99_ms is not None else "-"
        lines.append(
            f"{r.name:<16} {r.concurrency:>4} {r.requests:>5} {r.req_per_s:>8.1f} {r.mb_per_s:>7.1f} "
            f"{p50:>7} {p99:>7} {r.mb_per_s / baseline:>6.2f}x {r.registry_bytes / MB:>7.2f} "
            f"{r.client_cpu_s / r.requests * 1000:>10.2f} {r.registry_cpu_s / r.requests * 1000:>10.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    """Parse flags, run the benchmark, print the table, write JSON; returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=192, help="blob size in MB (10^6 bytes); default 192")
    parser.add_argument("--requests", type=int, default=1000, help="random ranges per concurrency level")
    parser.add_argument("--range-kib", type=int, default=64, help="range length in KiB; default 64")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-connections", type=int, default=32, help="client connection pool size")
    parser.add_argument("--seed", type=int, default=2024)
    add_out_argument(parser)
    args = parser.parse_args()
    out = out_dir(args.out, "bench_registry")

    with LocalRegistry() as registry:
        results, setup = trio.run(_run, args, registry)
    print(
        f"blob {setup['blob_bytes'] / MB:.0f} MB pushed in {setup['push_seconds']:.2f} s; "
        f"{args.requests} random {args.range_kib} KiB ranges per run; pool of {args.max_connections} connections; "
        f"{setup['cpus']} CPUs, Python {setup['python']}"
    )
    print(_table(results))
    baseline = results[0].mb_per_s
    rows = [
        {
            **asdict(r),
            "req_per_s": r.req_per_s,
            "mb_per_s": r.mb_per_s,
            "ratio_vs_baseline": r.mb_per_s / baseline,
        }
        for r in results
    ]
    print(f"JSON written to {write_json(out, 'bench_registry.json', {'setup': setup, 'results': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
