#!/usr/bin/env python3
"""Compare ``lazysnap bench``'s lazy/eager ratio between two source trees, runs interleaved.

Each tree is a checkout with its own ``.venv`` (``./scripts/setup.sh`` run in it). The script runs
``TREE/.venv/bin/lazysnap bench REF --repeat 1 --mode eager --mode lazy ...`` alternately in the
old and the new tree (old, new, old, new, ...) ``--rounds`` times, so that drift of a shared
machine hits both sides alike, and reads each run's ``results.json``: per run the time to ready
of every mode and its ratio to eager's. The two trees may need different references to the same
image (an index published by each tree's own ``lazysnap index push``, if the format changed)::

    .venv/bin/python scripts/bench_compare_trees.py --old-tree /tmp/old --old-ref HOST/python-old:indexed \\
        --new-tree . --new-ref HOST/python:indexed --rounds 3

Prints a table and the medians, and says whether the new median ratio is within ``--tolerance``
(10%) of the old one; ``--out DIR`` gets ``bench_compare.json`` and every run's bench output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_output import add_out_argument, out_dir, write_json


def run_once(tree: Path, ref: str, modes: list[str], out: Path) -> dict[str, Any]:
    """One ``lazysnap bench`` invocation in ``tree``; per mode its time to ready, bytes, and how layers were served."""
    command = [str(tree / ".venv/bin/lazysnap"), "bench", ref, "--repeat", "1", "--out", str(out)]
    command += [arg for mode in modes for arg in ("--mode", mode)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=tree, check=False)
    (out / "bench.stdout").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(
            f"bench failed in {tree} ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    document = json.loads((out / "results.json").read_text())
    runs: dict[str, Any] = {}
    for run in document["runs"]:
        if run.get("error"):
            raise SystemExit(f"bench run failed in {tree}: {run['mode']}: {run['error']}")
        runs[run["mode"]] = {
            "time_to_ready_s": run["time_to_ready_s"],
            "mount_s": run["mount_s"],
            "workload_s": run["workload_s"],
            "bytes_before_ready": run["bytes_before_ready"],
            "bytes_total": run["bytes_total"],
            "how": [layer.get("how") for layer in run.get("layers", [])],
        }
    eager = runs["eager"]["time_to_ready_s"]
    ratios = {mode: runs[mode]["time_to_ready_s"] / eager for mode in runs if mode != "eager"}
    return {"wall_s": time.monotonic() - started, "runs": runs, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--new-tree", type=Path, required=True)
    parser.add_argument("--old-ref", required=True)
    parser.add_argument("--new-ref", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", action="append", default=None, help="modes besides eager (default: lazy)")
    parser.add_argument("--tolerance", type=float, default=0.10)
    add_out_argument(parser)
    options = parser.parse_args()
    out = out_dir(options.out, "bench_compare_trees")
    modes = ["eager", *(options.mode or ["lazy"])]
    sides = {
        "old": (options.old_tree.resolve(), options.old_ref),
        "new": (options.new_tree.resolve(), options.new_ref),
    }
    results: list[dict[str, Any]] = []
    for round_number in range(1, options.rounds + 1):
        for side, (tree, ref) in sides.items():
            run_out = out / f"{side}-{round_number}"
            run_out.mkdir(parents=True, exist_ok=True)
            outcome = run_once(tree, ref, modes, run_out)
            outcome |= {"side": side, "round": round_number, "tree": str(tree), "ref": ref}
            results.append(outcome)
            times = "  ".join(f"{m} {r['time_to_ready_s']:.2f}s" for m, r in outcome["runs"].items())
            ratios = "  ".join(f"{m}/eager {v:.3f}" for m, v in outcome["ratios"].items())
            print(f"round {round_number} {side}: {times}  {ratios}", flush=True)
    summary: dict[str, Any] = {}
    for mode in modes[1:]:
        medians = {
            side: statistics.median(r["ratios"][mode] for r in results if r["side"] == side) for side in sides
        }
        change = medians["new"] / medians["old"] - 1
        summary[mode] = {
            "median_ratio_old": medians["old"],
            "median_ratio_new": medians["new"],
            "relative_change": change,
            "within_tolerance": change <= options.tolerance,
        }
        print(
            f"{mode}/eager median: old {medians['old']:.3f}  new {medians['new']:.3f}  "
            f"change {change:+.1%}  {'within' if change <= options.tolerance else 'NOT within'} {options.tolerance:.0%}"
        )
    write_json(out, "bench_compare.json", {"modes": modes, "results": results, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
