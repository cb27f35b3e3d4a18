"""``lazysnap bench``: time to ready of lazy against eager pulls, on an emulated network.

- ``network``: the relay between client and registry (byte counts, RTT, tbf-shaped netns link);
- ``runner``: the modes, their cold starts and one measured run each;
- ``report``: the live table, ``results.json`` and ``results.png``;
- ``command``: the loop over images, modes and repeats behind the CLI command.
"""

from __future__ import annotations

from snapshotter.devtools.bench.command import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench"]
