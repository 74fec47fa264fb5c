"""``plugin-state-worker bench``: flags, presets, the table on stdout, optionally JSON."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from worker.bench.harness import BenchError, new_progress
from worker.bench.report import BenchReport
from worker.bench.run import SMALL, Sizes, run_bench, sizes_with
from worker.config import MAX_COMMAND_PARTITIONS, Settings
from worker.loop import run_async


@click.command()
@click.option("--small", is_flag=True, help="Every phase small: well under a minute.")
@click.option("--messages", type=click.IntRange(min=1), help="Ceiling messages [50000].")
@click.option("--writes", type=click.IntRange(min=1), help="Writes per worker run [50000].")
@click.option(
    "--baseline-writes", type=click.IntRange(min=1), help="Naive baseline writes [10000]."
)
@click.option(
    "--peer-writes",
    type=click.IntRange(min=1),
    help="Writes for the FastStream subscriber and for the direct upserts [20000].",
)
@click.option("--entries", type=click.IntRange(min=1), help="Distinct entries written [10000].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Also measure write throughput with N worker processes [1: not run].",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1, max=MAX_COMMAND_PARTITIONS),
    help="Also compare write throughput over 1 and N commands partitions [1: not run].",
)
@click.option(
    "--management-url",
    help="RabbitMQ's management API, for the per-node figures of --partitions "
    "[http://<first broker host>:15672/].",
)
@click.option("--latency-seconds", type=click.FloatRange(min=0.1), help="Latency phase [10].")
@click.option("--read-seconds", type=click.FloatRange(min=0.1), help="Each read measurement [5].")
@click.option(
    "--read-concurrency", type=click.IntRange(min=1), help="Read throughput callers [128]."
)
@click.option(
    "--get-many-keys", type=click.IntRange(min=1, max=1000), help="Entries per get_many [100]."
)
@click.option("--soak-seconds", type=click.FloatRange(min=1), help="Memory soak [180].")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write every figure to FILE as JSON.",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, writable=True, path_type=Path),
    help="Also draw the figures as PNG charts into DIR (created if missing).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr (default: when stderr is a terminal).",
)
@click.pass_obj
def bench(
    settings: Settings,
    /,
    small: bool,
    json_path: Path | None,
    plot_dir: Path | None,
    progress: bool | None,
    management_url: str | None,
    **flags: Any,
) -> None:
    """Measure the worker against raw RabbitMQ, a naive consumer, a FastStream subscriber,
    direct upserts and raw RPC servers.

    Uses a database and a topology prefix of its own (pstest_bench_<random>, on the
    configured Postgres and RabbitMQ), and removes both afterwards.
    """
    _require_extra("faststream", "the FastStream peer")
    if plot_dir is not None:
        _require_extra("matplotlib", "--plot")
    sizes = sizes_with(SMALL if small else Sizes(), **flags)
    try:
        report = run_async(
            _run_until_terminated(settings, sizes, new_progress(progress), management_url)
        )
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    except asyncio.CancelledError:
        raise click.Abort from None
    click.echo(report.table())
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if plot_dir is not None:
        from worker.bench import plots  # noqa: PLC0415 - matplotlib only when asked for

        for path in plots.draw(report, plot_dir):
            click.echo(f"chart: {path}", err=True)


def _require_extra(module: str, what: str) -> None:
    """Refuse at once, not after minutes of measuring, when the ``bench`` extra is missing."""
    if importlib.util.find_spec(module) is None:
        raise click.ClickException(
            f"{what} needs {module}: pip install 'plugin-state-worker[bench]'"
        )


async def _run_until_terminated(
    settings: Settings, sizes: Sizes, bar: Callable[..., Any], management_url: str | None
) -> BenchReport:
    """SIGTERM cancels the run as Ctrl-C does, so that it still removes its database, its
    queues and its processes on the way out."""
    task = asyncio.current_task()
    assert task is not None
    # Signal handlers exist only in the main thread (not when a test runs the command).
    with contextlib.suppress(ValueError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_bench(settings, sizes, bar, management_url)


def register(main: click.Group) -> None:
    """Add the ``bench`` command to the console command."""
    main.add_command(bench)
