#!/usr/bin/env python3
"""Fuzz the tar parser, the eStargz TOC parser and the stored index loader: 10,000 generated hostile inputs each.

Each input must be refused with a LazysnapError or give entries within Linux's limits
(tests/hostile/fuzz_inputs.py holds the inputs and the property; the default suite runs a few
hundred of the same). Prints, per parser, how many inputs were accepted and refused with which
error, and the time taken; writes the counts as JSON with --out. Exits 1 on the first input
that breaks the property, after Hypothesis has shrunk it and printed it.

Usage: .venv/bin/python scripts/fuzz_parsers.py [--examples 10000] [--only tar|toc|index] [--out fuzz.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.fuzz_inputs import (
    outcome,
    run_load_index,
    run_tar,
    run_toc,
    stored_index_inputs,
    tar_inputs,
    toc_inputs,
)

PARSERS: dict[str, tuple[Callable[[], st.SearchStrategy[Any]], Callable[[Any], Any]]] = {
    "tar": (tar_inputs, run_tar),
    "toc": (toc_inputs, run_toc),
    "index": (stored_index_inputs, run_load_index),
}


def fuzz(name: str, examples: int) -> tuple[collections.Counter[str], float]:
    """Run ``examples`` generated inputs through parser ``name``; return the outcome counts and the seconds taken."""
    strategy, run = PARSERS[name]
    counts: collections.Counter[str] = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy())
    def check(value: Any) -> None:
        counts[outcome(run, value)] += 1

    start = time.perf_counter()
    check()
    return counts, time.perf_counter() - start


def main() -> int:
    """Fuzz the parsers asked for and print a summary; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="generated inputs per parser")
    parser.add_argument("--only", choices=sorted(PARSERS), action="append", help="fuzz only this parser")
    parser.add_argument("--out", help="write the counts as JSON here")
    args = parser.parse_args()
    print(
        f"fuzzing {', '.join(args.only or PARSERS)}: {args.examples} examples each (python {sys.version.split()[0]})"
    )
    results: dict[str, Any] = {}
    for name in args.only or PARSERS:
        try:
            counts, seconds = fuzz(name, args.examples)
        except Exception as error:  # the property broke: show the shrunk inputs Hypothesis found
            traceback.print_exception(error)
            print(f"{name}: FAILED: {type(error).__name__}: {error}")
            return 1
        results[name] = {"counts": dict(counts), "seconds": round(seconds, 1)}
        print(f"\n{name}: {sum(counts.values())} inputs in {seconds:.1f} s, no exception but LazysnapError")
        for kind, count in counts.most_common():
            print(f"  {kind:<24} {count:>7}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
