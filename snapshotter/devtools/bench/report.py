"""What ``lazysnap bench`` shows and writes: a live table, ``results.json`` and ``results.png``."""

from __future__ import annotations

import importlib.util
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from snapshotter.devtools.bench.runner import RunResult
from snapshotter.errors import UsageError

BASELINE_MODE = "eager"


def image_sizes(runs: Sequence[RunResult]) -> dict[str, int]:
    """The compressed size of each image, as the lazysnap runs reported it."""
    sizes: dict[str, int] = {}
    for run in runs:
        sizes[run.image] = max(sizes.get(run.image, 0), run.image_size)
    return sizes


def summarize(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per image and mode: medians, and ratios against the eager median of the same image."""
    sizes = image_sizes(runs)
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        if not run.error:
            groups.setdefault((run.image, run.mode), []).append(run)
    baseline = {
        image: statistics.median(r.time_to_ready_s for r in group)
        for (image, mode), group in groups.items()
        if mode == BASELINE_MODE
    }
    rows = []
    for (image, mode), group in groups.items():
        median_time = statistics.median(r.time_to_ready_s for r in group)
        before = int(statistics.median(r.bytes_before_ready for r in group))
        total = int(statistics.median(r.bytes_total for r in group))
        size = sizes.get(image, 0)
        rows.append(
            {
                "image": image,
                "mode": mode,
                "runs": len(group),
                "median_time_to_ready_s": median_time,
                "min_time_to_ready_s": min(r.time_to_ready_s for r in group),
                "max_time_to_ready_s": max(r.time_to_ready_s for r in group),
                "median_mount_s": statistics.median(r.mount_s for r in group),
                "median_workload_s": statistics.median(r.workload_s for r in group),
                "median_bytes_before_ready": before,
                "median_bytes_total": total,
                "image_size": size,
                "fraction_before_ready": before / size if size else None,
                "time_vs_eager": median_time / baseline[image] if baseline.get(image) else None,
            }
        )
    return rows


def short_name(image: str) -> str:
    """``host/repo:tag`` -> ``repo:tag`` for narrow tables."""
    return image.split("/", 1)[-1]


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}"


def runs_table(runs: Sequence[RunResult]) -> Table:
    """Every run so far, one row each."""
    table = Table(title="runs", title_justify="left")
    for column in ("image", "mode", "#", "ready s", "mount s", "workload s", "MB before", "MB total"):
        table.add_column(column, justify="left" if column in ("image", "mode") else "right", no_wrap=True)
    for run in runs:
        if run.error:
            table.add_row(
                run.image, run.mode, str(run.repeat), f"[red]{run.error[:60]}[/red]", "", "", "", ""
            )
            continue
        table.add_row(
            short_name(run.image),
            run.mode,
            str(run.repeat),
            f"{run.time_to_ready_s:.2f}",
            f"{run.mount_s:.2f}",
            f"{run.workload_s:.2f}",
            _mb(run.bytes_before_ready),
            _mb(run.bytes_total),
        )
    return table


def summary_table(summary: Sequence[dict[str, Any]]) -> Table:
    """Medians per image and mode, with the ratio against eager and the share of the image fetched."""
    table = Table(title="medians (ratio: against eager in this run)", title_justify="left")
    for column in ("image", "mode", "runs", "ready s", "x eager", "MB before", "% of image", "MB total"):
        table.add_column(column, justify="left" if column in ("image", "mode") else "right", no_wrap=True)
    for row in summary:
        ratio = row["time_vs_eager"]
        fraction = row["fraction_before_ready"]
        table.add_row(
            short_name(row["image"]),
            row["mode"],
            str(row["runs"]),
            f"{row['median_time_to_ready_s']:.2f}",
            f"{ratio:.2f}x" if ratio is not None else "-",
            _mb(row["median_bytes_before_ready"]),
            f"{100 * fraction:.1f}%" if fraction is not None else "-",
            _mb(row["median_bytes_total"]),
        )
    return table


class LiveReport:
    """The terminal view while the benchmark runs: the runs table and what is running now."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.runs: list[RunResult] = []
        self.status = ""
        self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def _render(self) -> Group:
        return Group(runs_table(self.runs), Text(self.status, style="cyan"))

    def __enter__(self) -> LiveReport:
        self._live.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.status = ""
        self._live.update(self._render())
        self._live.__exit__(*exc_info)

    def set_status(self, text: str) -> None:
        """Show what is running now."""
        self.status = text
        self._live.update(self._render())

    def add(self, run: RunResult) -> None:
        """Add a finished run."""
        self.runs.append(run)
        self._live.update(self._render())


def write_json(
    path: Path, setup: dict[str, Any], runs: Sequence[RunResult], summary: list[dict[str, Any]]
) -> None:
    """Write ``results.json``: setup and versions, every run, the medians."""
    sizes = image_sizes(runs)
    document = {
        "setup": setup,
        "runs": [{**run.to_json(), "image_size": sizes.get(run.image, run.image_size)} for run in runs],
        "summary": summary,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


BENCH_EXTRA_HINT = "lazysnap bench draws its charts with matplotlib: pip install 'lazysnap[bench]'"


def require_matplotlib() -> None:
    """Check that matplotlib (the ``bench`` extra) is installed, without importing it; raises UsageError."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(BENCH_EXTRA_HINT)


def write_png(path: Path, summary: Sequence[dict[str, Any]], title: str) -> None:
    """Write ``results.png``: median time to ready (min-max whiskers) and bytes fetched, per image and mode.

    Raises:
        UsageError: matplotlib (the ``bench`` extra) is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError(BENCH_EXTRA_HINT) from None

    matplotlib.use("Agg")  # no display: render straight to a file
    import matplotlib.pyplot as plt

    images = list(dict.fromkeys(row["image"] for row in summary))
    modes = list(dict.fromkeys(row["mode"] for row in summary))
    by_key = {(row["image"], row["mode"]): row for row in summary}
    width = 0.8 / max(1, len(modes))
    figure, (times, volume) = plt.subplots(1, 2, figsize=(6 + 2.5 * len(images), 4.8))
    for number, mode in enumerate(modes):
        xs, medians, low, high, before, total = [], [], [], [], [], []
        for position, image in enumerate(images):
            row = by_key.get((image, mode))
            if row is None:
                continue
            xs.append(position + (number - (len(modes) - 1) / 2) * width)
            medians.append(row["median_time_to_ready_s"])
            low.append(row["median_time_to_ready_s"] - row["min_time_to_ready_s"])
            high.append(row["max_time_to_ready_s"] - row["median_time_to_ready_s"])
            before.append(row["median_bytes_before_ready"] / 1e6)
            total.append(row["median_bytes_total"] / 1e6)
        times.bar(xs, medians, width, yerr=[low, high], capsize=3, label=mode)
        volume.bar(xs, total, width, alpha=0.35, color=f"C{number}")
        volume.bar(xs, before, width, color=f"C{number}", label=mode)
    labels = [image.rsplit("/", 1)[-1] for image in images]
    for axes, ylabel in (
        (times, "time to ready (s, median)"),
        (volume, "MB from registry (solid: before ready)"),
    ):
        axes.set_xticks(range(len(images)), labels)
        axes.set_ylabel(ylabel)
        axes.grid(axis="y", alpha=0.3)
    handles, names = times.get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(len(modes), 5), fontsize="small")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend under the panels
    figure.savefig(path, dpi=110)
    plt.close(figure)
