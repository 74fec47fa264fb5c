"""`plugin-state-worker bench --small` end to end: it completes, reports every figure, draws
every chart, and leaves nothing behind. The figures' values are the machine's business, not
the test's."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import click
import click.testing
import pytest
from click.testing import CliRunner

from worker.bench import plots
from worker.bench.command import register
from worker.bench.harness import NAME_PREFIX
from worker.config import Settings

from .cluster import RabbitCluster
from .services import ServiceUrls

EVERY_RATIO = (
    "write throughput / ceiling",
    "write throughput / naive baseline",
    "write throughput / FastStream subscriber",
    "write throughput / direct upserts",
    "write throughput, 20 % conditional / unconditional",
    "write throughput, change log on / off",
    "coalesced writes from one client / ceiling",
    "cached get p50 / get p50",
    "commit-to-watcher p50 / get p50",
    "commits with NOTIFY / without",
    "get p50 / raw RPC round trip p50",
    "get p99 beside a write flood / idle get p99",
    "get throughput / RPC ceiling",
    "peak RSS (MB)",
    "soak RSS drift (MB)",
)


SMALL_RUN = ("bench", "--small", "--workers", "2", "--partitions", "3")


def console() -> click.Group:
    """A console command of the test's own, with `bench` registered as in main."""
    group = click.Group("plugin-state-worker")
    register(group)
    return group


def numbers(tree: Any, path: str = "") -> dict[str, float]:
    """Every number in a JSON tree, by its path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}.{key}").items()}
    if isinstance(tree, bool):
        return {}
    if isinstance(tree, int | float):
        return {path: float(tree)}
    return {}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the header of a PNG file, which it must be."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def check_memory(memory: dict[str, Any]) -> None:
    assert memory["peak_rss"] > 0
    assert len(memory["rss_samples"]) > 0
    # The worker's memory is its processes', each named, summed (worker.supervisor).
    assert set(memory["peaks"]) == {"supervisor", "writes+relay", "reads"}
    assert memory["peak_rss"] == sum(memory["peaks"].values())


def check_partitions(partitions: dict[str, Any], output: str) -> None:
    """1 and 3 partitions side by side; on a broker without the consistent-hash exchange
    the partitioned run says so instead. Per-node figures, or why there are none."""
    print(f"partitions: {partitions}")
    assert partitions["single"]["count"] > 0
    if partitions["partitioned"] is None:
        assert "consistent-hash" in partitions["skipped"]
        assert "3 partitions" in output and "skipped" in output
    else:
        assert partitions["partitioned"]["count"] > 0
    if partitions["nodes_skipped"] is not None:
        assert "management" in partitions["nodes_skipped"]
        assert "per-node figures" in output
        return
    for run in ("single", "partitioned"):
        shares = partitions[f"{run}_nodes"]
        if partitions[run] is None:
            continue
        assert shares, f"per-node figures of the {run} run"
        assert sum(share["writes"] for share in shares) == partitions[run]["count"]
        for share in shares:
            assert share["node"] in output


async def bench_databases(admin_url: str) -> list[str]:
    conn = await asyncpg.connect(admin_url)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", NAME_PREFIX
        )
    finally:
        await conn.close()
    return [row["datname"] for row in rows]


async def run_small_bench(settings: Settings, *flags: str) -> tuple[click.testing.Result, Any]:
    """``bench --small --workers 2 --partitions 3 --json FILE FLAGS``: its output and JSON."""
    with tempfile.TemporaryDirectory() as directory:
        report_path = Path(directory) / "bench.json"
        result = await asyncio.to_thread(
            CliRunner().invoke,
            console(),
            [*SMALL_RUN, "--json", str(report_path), *flags],
            obj=settings,
        )
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        return result, json.loads(report_path.read_text())


@pytest.mark.timeout(900)  # about a minute; more when the machine is shared
async def test_small_bench_reports_every_figure_draws_every_chart_and_cleans_up(
    services: ServiceUrls, tmp_path: Path
) -> None:
    settings = Settings(database_url=services.admin_database_url, amqp_url=services.amqp_url)
    charts = tmp_path / "charts"

    result, report = await run_small_bench(settings, "--plot", str(charts))

    for ratio in EVERY_RATIO:
        assert ratio in result.output
    for section in ("WRITES", "READS", "CHANGES", "MEMORY", "RATIOS"):
        assert section in result.output
    assert set(report["ratios"]) == set(EVERY_RATIO)
    assert set(report["reads"]) == {"rpc_ceiling", "raw_select", "worker_get", "worker_get_many"}
    flood = report["get_beside_flood"]
    assert flood["latency"]["count"] > 0 and flood["flood_writes"] > 0
    assert len(flood["latency"]["quantiles_ms"]) == len(report["quantiles"])
    assert report["worker_writes_many"] is not None
    check_partitions(report["partitions"], result.output)
    figures = numbers({k: v for k, v in report.items() if k != "sizes"})
    assert len(figures) > 50
    assert all(math.isfinite(value) for value in figures.values()), figures
    check_memory(report["memory"])
    assert report["write_latency"]
    for point in report["write_latency"]:
        assert point["count"] > 0
        assert len(point["quantiles_ms"]) == len(report["quantiles"])
    assert set(report["peers"]) == {"faststream", "direct"}
    for peer in report["peers"].values():
        assert peer["writes"]["count"] > 0
        assert peer["title"] in result.output
    # The FastStream subscriber is paced at the same fractions of its maximum as the worker.
    subscriber_latency = report["peers"]["faststream"]["write_latency"]
    assert len(subscriber_latency) == len(report["write_latency"])
    assert all(point["count"] > 0 for point in subscriber_latency)
    assert report["peers"]["direct"]["statement_latency"]["count"] > 0
    assert report["changes"]["cached_get"]["count"] > 0
    assert report["changes"]["cache_hit_rate"] > 0.99
    assert report["changes"]["watch"]["count"] > 0
    for server in report["reads"].values():
        assert server["latency"]["count"] > 0
        assert server["throughput"]["count"] > 0

    # Every chart is drawn, as a picture of a readable size.
    assert {path.name for path in charts.iterdir()} == set(plots.CHARTS)
    for path in charts.iterdir():
        width, height = png_size(path)
        assert width >= 600 and height >= 300, (path.name, width, height)

    # Its own database and topology are gone.
    assert report["name"].startswith(NAME_PREFIX)
    assert report["name"] not in await bench_databases(services.admin_database_url)
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(f"{report['name']}.commands", passive=True)
        except aio_pika.exceptions.ChannelClosed:
            pass
        else:
            raise AssertionError("the bench left its commands queue behind")


@pytest.mark.cluster
@pytest.mark.timeout(600)
async def test_bench_on_the_test_cluster_reports_each_nodes_part(
    services: ServiceUrls, rabbit_cluster: RabbitCluster
) -> None:
    """On the test-owned 3-node cluster, the workers given every node: each partition is led
    by a node of its own, and the per-node figures say so."""
    settings = Settings(
        database_url=services.admin_database_url, amqp_url=",".join(rabbit_cluster.urls)
    )
    management = rabbit_cluster.management_url(rabbit_cluster.nodes[0])
    result, report = await run_small_bench(settings, "--management-url", management)
    print(result.output)
    partitions = report["partitions"]
    check_partitions(partitions, result.output)
    assert partitions["nodes_skipped"] is None
    shares = partitions["partitioned_nodes"]
    assert sorted(share["node"] for share in shares) == sorted(rabbit_cluster.nodes)
    led = [name for share in shares for name in share["led"] if name[-1].isdigit()]
    assert len(led) == 3, "every partition is led by one node"
    assert sum(1 for share in shares if share["led"]) >= 2, "leaders spread over the nodes"
    assert sum(share["worker_connections"] for share in shares) >= 2
