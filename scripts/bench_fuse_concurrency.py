#!/usr/bin/env python3
"""Benchmark how far concurrent FUSE reads overlap when the layer source is slow (a registry round trip).

Mounts N one-block files over a source that takes --delay seconds per read, then reads them
(1) one after another from one thread: the baseline, about N x delay, and (2) from N threads at
once. Prints the setup and both times with their ratio (ideal 1/N: every handler waits on the
source at the same time; 1.0 means the handlers are serialized) and writes
bench_fuse_concurrency.json to the --out directory. tests/fusefs/test_operations.py checks the
same property without a clock (all N reads reach the source together); this measures what it buys.

Usage: sudo .venv/bin/python scripts/bench_fuse_concurrency.py [--files 8] [--delay 0.2] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusefs.merged_tree import MergedTree
from fusefs.operations import ReadOnlyOperations
from index.model import Entry, EntryType
from scripts.bench_output import add_out_argument, out_dir, write_json
from tests.fusefs.fuse_harness import MemorySource, serve

CONTENT = b"0123456789"


def read_sequentially(paths: list[Path]) -> float:
    """Read every file in turn from this thread; return the seconds taken."""
    start = time.perf_counter()
    for path in paths:
        assert path.read_bytes() == CONTENT
    return time.perf_counter() - start


def read_concurrently(paths: list[Path]) -> float:
    """Read every file from its own thread, all started together; return the seconds until the last ends."""
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda p=p: results.append(p.read_bytes())) for p in paths]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    assert results == [CONTENT] * len(paths)
    return elapsed


def measure(files: int, delay: float, scratch: Path) -> tuple[float, float]:
    """One round on a fresh mount (cold page cache): the sequential and the concurrent time."""
    names = [f"f{i}" for i in range(2 * files)]
    tree = MergedTree.build([[Entry(name, EntryType.FILE, size=len(CONTENT)) for name in names]])
    source = MemorySource({(0, name): CONTENT for name in names}, delay=delay)
    mountpoint = Path(tempfile.mkdtemp(dir=scratch))
    try:
        with serve(ReadOnlyOperations(tree, source), mountpoint):
            # Different files for the two runs, so neither finds the other's bytes in the page cache.
            sequential = read_sequentially([mountpoint / n for n in names[:files]])
            concurrent = read_concurrently([mountpoint / n for n in names[files:]])
    finally:
        os.rmdir(mountpoint)
    return sequential, concurrent


def main() -> int:
    """Run the rounds, print the table and write the JSON; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="files read, and threads in the concurrent run")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the source takes per read")
    parser.add_argument("--rounds", type=int, default=3, help="rounds on fresh mounts (best is kept)")
    add_out_argument(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_fuse_concurrency: run as root (FUSE mounts)", file=sys.stderr)
        return 2
    out = out_dir(args.out, "bench_fuse_concurrency")
    print(
        f"{args.files} files, source delay {args.delay * 1000:.0f} ms per read, best of {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-fuse-") as scratch:
        rounds = [measure(args.files, args.delay, Path(scratch)) for _ in range(args.rounds)]
    sequential = min(r[0] for r in rounds)
    concurrent = min(r[1] for r in rounds)
    result = {
        "files": args.files,
        "delay_s": args.delay,
        "rounds": [{"sequential_s": s, "concurrent_s": c} for s, c in rounds],
        "sequential_s": sequential,
        "concurrent_s": concurrent,
        "concurrent_vs_sequential": concurrent / sequential,
        "ideal_ratio": 1 / args.files,
    }
    print(f"{'measure':<40}{'seconds':>10}")
    print(f"{'sequential reads, one thread (baseline)':<40}{sequential:>10.3f}")
    print(f"{f'concurrent reads, {args.files} threads':<40}{concurrent:>10.3f}")
    print(f"{'concurrent / sequential':<40}{concurrent / sequential:>9.2f}x  (ideal {1 / args.files:.2f}x)")
    print(f"wrote {write_json(out, 'bench_fuse_concurrency.json', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
