"""The worker's resident memory: at start, its peak under full load, and through a soak.

Read from ``/proc/<pid>/status``: ``VmRSS`` (now) and ``VmHWM`` (the high-water mark over
the process's life), summed over the worker's processes (``Process.resident``). The soak
keeps a steady mixed load on the worker for a while (paced writes, mixed sets and deletes
over the bench's entries, at half the measured maximum rate, and a few callers reading
back to back) and samples ``VmRSS`` every second; the medians of its first and last fifths
tell whether memory stayed flat, and the report keeps every sample for the chart of
``--plot``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from worker.bench.harness import BenchEnv, Process
from worker.bench.reads import RpcClient, closed_loop
from worker.bench.report import Latency, MemoryFigures
from worker.bench.workload import DELETE_SHARE, EntryName, get_body, write_body
from worker.bench.writes import paced_count, publish_paced
from worker.client import MonotonicUuid7


async def soak(
    env: BenchEnv,
    worker: Process,
    started_rss: int,
    plugin_id: uuid.UUID,
    entries: list[EntryName],
    write_rate: float,
    read_concurrency: int,
    seconds: float,
    bar: Callable[..., Any],
) -> MemoryFigures:
    """Steady mixed load for ``seconds``, sampling the worker's RSS about every second."""
    rng = random.Random(6)
    new_id = MonotonicUuid7()
    routing_key = env.names.command_key(plugin_id)
    count = paced_count(write_rate, seconds)
    interval = min(1.0, seconds / 20)
    samples: list[tuple[float, int]] = []

    async def write(n: int) -> None:
        op = "delete" if rng.random() < DELETE_SHARE else "set"
        body = write_body(plugin_id, op, new_id(), rng.choice(entries), rng, n)
        await env.exchange.publish(env.message(body), routing_key)

    async def sample(done: asyncio.Event) -> None:
        began = time.monotonic()
        while not done.is_set():
            worker.check_alive()
            samples.append((time.monotonic() - began, worker.resident().rss))
            try:
                async with asyncio.timeout(interval):
                    await done.wait()
            except TimeoutError:
                pass

    gets = [get_body(plugin_id, entry) for entry in entries]
    done = asyncio.Event()
    async with RpcClient(env) as client, asyncio.TaskGroup() as group:
        group.create_task(sample(done))
        reads = group.create_task(
            closed_loop(client, env.names.rpc_key(plugin_id), gets, read_concurrency, seconds)
        )
        with bar(f"soak {seconds:.0f}s at {write_rate:,.0f} writes/s", total=count) as progress:
            await publish_paced(write_rate, count, write, progress)
        await reads
        done.set()
    fifth = max(1, len(samples) // 5)
    rss = [resident for _, resident in samples]
    now = worker.resident()
    return MemoryFigures(
        started_rss=started_rss,
        peak_rss=now.peak,
        peaks=tuple((name, peak) for name, _, peak in now.processes),
        soak_start_rss=int(statistics.median(rss[:fifth])),
        soak_end_rss=int(statistics.median(rss[-fifth:])),
        soak_seconds=seconds,
        soak_writes=count,
        soak_reads=Latency.of(reads.result().latencies),
        rss_samples=tuple(samples),
    )
