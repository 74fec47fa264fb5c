"""The worker's peers: what a user would run instead of it, over the start of its own write
stream (the same sets and deletes of the same entries, for a plugin of their own), into the
same table, with the naive baseline's last-writer-wins statements (``baseline.NAIVE_UPSERT``,
``NAIVE_DELETE``: no tombstones, so unlike the worker they let an older set resurrect a
deleted entry).

**FastStream** (``subscriber.py``, a process of its own, like the worker). The stream is
pre-filled into a quorum queue with the commands queue's arguments, then the subscriber
starts, handles it and exits. It times itself, from its first handler to its last commit,
and reports its own CPU time over that window. Then, for each paced rate (a fraction of that
throughput), a fresh subscriber handles sets published at that rate, each to an entry of its
own, exactly as the worker's latency phase publishes them: a write's latency is its commit
(when its handler's autocommitted statement returned, in the subscriber) minus when the bench
published it.

**Direct** (in the bench's own process, which plays the plugin). No queue: ``DIRECT_TASKS``
tasks take the stream's writes in order, as a host application's handlers writing through
its own store would, each running one ``INSERT ... ON CONFLICT`` per set or one ``DELETE``
per delete, autocommitted, on an asyncpg pool with a connection per task (so a statement
never waits for a connection). Timed from the first statement to the last; its latency is
each statement's round trip; its CPU is the bench process's over the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg

from worker.bench.baseline import NAIVE_DELETE, NAIVE_UPSERT
from worker.bench.ceiling import prefill
from worker.bench.harness import APPLICATION_NAME, BenchEnv, BenchError, Process, wait_for
from worker.bench.report import Latency, PeerFigures, Rate, WriteLatency
from worker.bench.workload import WriteStream
from worker.bench.writes import paced_count, publish_latency_writes, publish_to_commit

DIRECT_TASKS: Final = 32
"""Writers at once without a queue, each with a connection of its own."""

_QUEUE: Final = "faststream"
_ROUTING_KEY: Final = "faststream.x"


async def measure_faststream(
    env: BenchEnv,
    stream: WriteStream,
    fractions: Sequence[float],
    latency_seconds: float,
    bar: Callable[..., Any],
) -> PeerFigures:
    """The FastStream subscriber's throughput over the pre-filled ``stream``, then its
    publish-to-commit latency at each of ``fractions`` of that throughput."""
    total = len(stream.bodies)
    await prefill(env, _QUEUE, _ROUTING_KEY, stream.bodies, bar)
    subscriber, report_path = await _start_subscriber(env, "faststream", total)
    with bar("faststream: apply", total=total) as progress:
        run = await _finished(env, subscriber, report_path, total, progress)
    writes = Rate(total, max(run["commits"].values()) - run["first"])
    latency = [
        await _latency(env, fraction, writes.per_second * fraction, latency_seconds, bar)
        for fraction in fractions
    ]
    settings = run["settings"]
    return PeerFigures(
        title=(
            f"FastStream {settings['faststream']} subscriber "
            f"(prefetch {settings['prefetch']}, pool of {settings['pool_size']})"
        ),
        settings=settings,
        writes=writes,
        cpu_per_write=run["cpu_seconds"] / total,
        write_latency=tuple(latency),
    )


async def _latency(
    env: BenchEnv, fraction: float, rate: float, seconds: float, bar: Callable[..., Any]
) -> WriteLatency:
    """Publish-to-commit of ``rate`` sets per second for ``seconds`` through a fresh
    subscriber, which is consuming before the first is published."""
    plugin_id = await env.add_plugin(f"faststream-latency-{fraction}")
    count = paced_count(rate, seconds)
    subscriber, report_path = await _start_subscriber(env, f"faststream-latency-{fraction}", count)
    await env.wait_for_consumer(env.bench_queue_name(_QUEUE), subscriber)
    with bar(f"faststream: latency at {rate:,.0f}/s", total=count) as progress:
        published = await publish_latency_writes(
            env, plugin_id, _ROUTING_KEY, rate, seconds, progress
        )
        run = await _finished(env, subscriber, report_path, count)
    return publish_to_commit(rate, published, run["commits"])


async def _start_subscriber(env: BenchEnv, name: str, count: int) -> tuple[Process, Path]:
    """A subscriber process that handles ``count`` messages of the FastStream queue; where
    it will write what it measured."""
    report_path = env.log_dir / f"{name}.json"
    settings = env.settings
    process = await env.spawn(
        name,
        [
            "-m",
            "worker.bench.subscriber",
            env.amqp_url,
            env.bench_queue_name(_QUEUE),
            settings.database_url,
            str(count),
            str(report_path),
        ],
        env.worker_environment(),
    )
    return process, report_path


async def _finished(
    env: BenchEnv, subscriber: Process, report_path: Path, count: int, progress: Any = None
) -> dict[str, Any]:
    """What the subscriber measured, once it has handled its ``count`` messages and exited."""
    queue = env.bench_queue_name(_QUEUE)

    async def exited() -> bool:
        if progress is not None:
            # Delivered rather than handled, which is near enough for a progress bar.
            ready, _ = await env.queue_counts(queue)
            progress.update(count - ready - progress.n)
        return subscriber.process.returncode is not None

    await wait_for(
        exited, timeout=60 + count / 100, what=f"{subscriber.name} to handle {count} messages"
    )
    await env.stop(subscriber)
    report: dict[str, Any] = json.loads(await asyncio.to_thread(report_path.read_text))
    return report


async def measure_direct(
    env: BenchEnv, stream: WriteStream, bar: Callable[..., Any]
) -> PeerFigures:
    """Writes per second of ``DIRECT_TASKS`` tasks upserting ``stream`` straight into
    Postgres, and each statement's round trip."""
    # The plugin holds its writes as objects: decoding the bench's bodies is not its work.
    writes = iter([json.loads(body) for body in stream.bodies])
    latencies: list[float] = []
    try:
        pool = await asyncpg.create_pool(
            env.settings.database_url,
            min_size=DIRECT_TASKS,
            max_size=DIRECT_TASKS,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except asyncpg.TooManyConnectionsError as exc:
        raise BenchError(f"direct upserts need {DIRECT_TASKS} more connections: {exc}") from exc

    async def writer(progress: Any) -> None:
        # One iterator shared by every task: each takes the next write of the stream.
        for write in writes:
            key = (
                write["plugin_id"],
                write["scope_kind"],
                write["scope_id"],
                write["namespace"],
                write["key"],
            )
            arguments: tuple[Any, ...]
            if write["op"] == "set":
                statement, arguments = NAIVE_UPSERT, (*key, json.dumps(write["value"]), write["id"])
            else:
                statement, arguments = NAIVE_DELETE, (*key, write["id"])
            started = time.perf_counter()
            await pool.execute(statement, *arguments)
            latencies.append(time.perf_counter() - started)
            progress.update(1)

    try:
        with bar("direct: upsert", total=len(stream.bodies)) as progress:
            cpu_before = time.process_time()
            began = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(DIRECT_TASKS):
                    group.create_task(writer(progress))
            elapsed = time.perf_counter() - began
            cpu = time.process_time() - cpu_before
    finally:
        await pool.close()
    return PeerFigures(
        title=f"direct upserts, no queue ({DIRECT_TASKS} tasks, pool of {DIRECT_TASKS})",
        settings={"tasks": DIRECT_TASKS, "pool_size": DIRECT_TASKS},
        writes=Rate(len(latencies), elapsed),
        cpu_per_write=cpu / len(latencies),
        statement_latency=Latency.of(latencies),
    )
