"""``bench --plot DIR``: the run's figures as PNG charts.

Drawn with matplotlib's Agg backend on figures of their own (no pyplot, no display, nothing
global). Each chart is one function of the report, named by its file in ``CHARTS``; what it
draws comes from the report's lists (``BenchReport.throughputs``, ``latency_curves``,
``get_distributions``, the soak's samples), so a new phase shows in a chart by being added to
one of them, and a new chart is one function and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from worker.bench.report import MB, QUANTILES, BenchReport, Latency

_DPI: Final = 120
_KIND_COLORS: Final = {"ceiling": "#9e9e9e", "alternative": "#e08a2c", "worker": "#2f6db5"}
_KIND_NAMES: Final = {
    "ceiling": "ceiling (RabbitMQ alone, no database)",
    "alternative": "what one could run instead",
    "worker": "plugin-state-worker",
}
_SERIES_COLORS: Final = ("#2f6db5", "#e08a2c", "#3c9a4f", "#b5412f", "#7b55b5")
# The percentiles of a latency curve: the median solid, the tail dashed.
_PERCENTILES: Final[tuple[tuple[str, str, Callable[[Latency], float]], ...]] = (
    ("p50", "o-", lambda latency: latency.p50_ms),
    ("p99", "s--", lambda latency: latency.p99_ms),
)


def _figure(height: float = 5.0) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _throughput(report: BenchReport) -> Figure:
    bars = report.throughputs()
    figure, axes = _figure(2.2 + 0.45 * len(bars))
    values = [bar.rate.per_second for bar in bars]
    drawn = axes.barh(
        [bar.label for bar in bars], values, color=[_KIND_COLORS[bar.kind] for bar in bars]
    )
    axes.bar_label(drawn, labels=[f" {value:,.0f}" for value in values], fontsize=9)
    axes.invert_yaxis()  # the table's order, top to bottom
    ceiling = report.ceiling_consume.per_second
    axes.axvline(ceiling, color="black", linestyle="--", linewidth=1)
    axes.set_xlim(0, max(values) * 1.18)
    axes.set_title("Write throughput against the ceiling (one run, one machine)")
    axes.set_xlabel("writes per second (messages per second for the ceiling)")
    kinds = dict.fromkeys(bar.kind for bar in bars)
    axes.legend(
        handles=[
            *(Patch(color=_KIND_COLORS[kind], label=_KIND_NAMES[kind]) for kind in kinds),
            Line2D(
                [], [], color="black", linestyle="--", label=f"ceiling: consume, {ceiling:,.0f}/s"
            ),
        ],
        # Below the chart: inside, it would hide the bars' ends.
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncols=2,
        fontsize=9,
    )
    axes.grid(axis="x", alpha=0.3)
    return figure


def _write_latency(report: BenchReport) -> Figure:
    figure, axes = _figure()
    curves = report.latency_curves()
    for curve, color in zip(curves, _SERIES_COLORS, strict=False):
        rates = [point.rate for point in curve.points]
        for name, style, percentile in _PERCENTILES:
            axes.plot(
                rates,
                [percentile(point.latency) for point in curve.points],
                style,
                color=color,
                label=f"{curve.label}: {name}",
            )
        for point in curve.points:
            axes.annotate(
                f"{point.rate / curve.maximum.per_second:.0%} of max",
                (point.rate, point.latency.p50_ms),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
                color=color,
            )
    axes.set_yscale("log")
    # Room on the right for the last point's label.
    fastest = max((point.rate for curve in curves for point in curve.points), default=1.0)
    axes.set_xlim(0, fastest * 1.15)
    axes.set_title("Publish-to-commit latency against offered load (paced writes)")
    axes.set_xlabel("offered load (writes per second)")
    axes.set_ylabel("publish-to-commit (ms, log scale)")
    axes.legend(fontsize=9)
    axes.grid(alpha=0.3, which="both")
    return figure


def _get_latency(report: BenchReport) -> Figure:
    figure, axes = _figure()
    percents = [fraction * 100 for fraction in QUANTILES]
    for (label, latency), color in zip(
        report.get_distributions().items(), _SERIES_COLORS, strict=False
    ):
        if latency.quantiles_ms:
            axes.plot(
                latency.quantiles_ms,
                percents,
                color=color,
                label=f"{label}: p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms, "
                f"{latency.count:,} calls",
            )
    for percent in (50, 99):
        axes.axhline(percent, color="black", linewidth=0.6, alpha=0.4)
    axes.set_xscale("log")
    axes.set_ylim(0, 100)
    axes.set_title("get latency distribution (RPC over RabbitMQ, reply on direct reply-to)")
    axes.set_xlabel("latency of one call (ms, log scale)")
    axes.set_ylabel("calls answered within it (%)")
    axes.legend(fontsize=9, loc="lower right")
    axes.grid(alpha=0.3, which="both")
    return figure


def _soak_rss(report: BenchReport) -> Figure:
    memory = report.memory
    figure, axes = _figure()
    axes.plot(
        [seconds for seconds, _ in memory.rss_samples],
        [rss / MB for _, rss in memory.rss_samples],
        "o-",
        markersize=3,
        color=_KIND_COLORS["worker"],
        label="VmRSS of its processes together, sampled through the soak",
    )
    axes.axhline(
        memory.peak_rss / MB,
        color="black",
        linestyle="--",
        label="peak over the run (each process's VmHWM, summed)",
    )
    axes.axhline(
        memory.started_rss / MB, color="gray", linestyle=":", label="at the first deliveries"
    )
    axes.set_ylim(0, memory.peak_rss / MB * 1.15)
    axes.set_title(
        f"Worker resident memory through the soak ({memory.soak_writes:,} writes and "
        f"{report.sizes['soak_read_concurrency']} callers reading, {memory.soak_seconds:.0f} s)"
    )
    axes.set_xlabel("time into the soak (s)")
    axes.set_ylabel("resident memory (MB)")
    axes.legend(fontsize=9, loc="lower right")
    axes.grid(alpha=0.3)
    return figure


CHARTS: Final[dict[str, Callable[[BenchReport], Figure]]] = {
    "throughput.png": _throughput,
    "write-latency.png": _write_latency,
    "get-latency.png": _get_latency,
    "soak-rss.png": _soak_rss,
}


def draw(report: BenchReport, directory: Path) -> list[Path]:
    """Write every chart of ``CHARTS`` into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, chart in CHARTS.items():
        path = directory / name
        chart(report).savefig(path, dpi=_DPI)
        paths.append(path)
    return paths
