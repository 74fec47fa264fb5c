"""The worker's write path: throughput over a pre-filled queue, and publish-to-commit latency.

**Throughput.** The commands queue is filled with the whole stream before any worker
starts, then ``plugin-state-worker run`` processes are started. The clock starts when the
queue's ready count first drops (the first deliveries: start-up time is not counted) and
stops when the version register holds every entry's last write, checked once the queue
has no ready message left. Both are polled, at 5 ms and 20 ms.

**Latency.** Writes, each to an entry of its own, are published at a paced rate. A write's
latency is its commit time minus the time the bench published it. Postgres records when
the batch's transaction started (``updated_at`` is ``now()``), not when it committed, so
the commit is taken from the worker's own commit signal: after every write transaction the
worker publishes a commit notice (``worker.wakeups``), and the first notice at or after a
batch's start is that batch's commit (a bound: the notice leaves just after the commit).
This is more exact than ``updated_at`` minus the UUIDv7 time, which misses the apply and
commit and has only millisecond resolution.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aio_pika

from worker.bench.harness import BenchEnv, BenchError, Process, wait_for
from worker.bench.report import Latency, Rate, WriteLatency
from worker.bench.workload import WriteStream, entry_names, json_value, set_body
from worker.client import MonotonicUuid7
from worker.wakeups import commits_exchange

# How many of a stream's final versions the register holds.
APPLIED_COUNT: Final = """
SELECT count(*) FROM plugin_state_versions v
JOIN unnest($2::uuid[]) AS f (version) ON v.version = f.version
WHERE v.plugin_id = $1
"""
STATE_COUNT: Final = "SELECT count(*) FROM plugin_state WHERE plugin_id = $1"
COMMITTED_AT: Final = "SELECT state_key, updated_at FROM plugin_state WHERE plugin_id = $1"

_START_POLL: Final = 0.005
_END_POLL: Final = 0.02
_PACE_TICK: Final = 0.002


@dataclass(frozen=True, slots=True)
class ThroughputRun:
    rate: Rate
    workers: list[Process]
    """Still running."""
    started_rss: int
    """The first worker's RSS when consumption started."""
    cpu_seconds: float
    """CPU time of all the workers from the first delivery to the last commit."""
    depths: dict[str, int]
    """Each commands queue's ready writes once the stream was published: how it was routed."""


async def measure_throughput(
    env: BenchEnv,
    stream: WriteStream,
    processes: int,
    bar: Callable[..., Any],
    *,
    queues: Sequence[str] = (),
    **settings: str,
) -> ThroughputRun:
    """Writes per second of ``processes`` fresh workers over the pre-filled ``stream``
    (``settings``: the workers' own, by lower-case name; ``queues``: the commands queues
    the stream lands in, by default the single one; over several, each write is published
    with a ``message_id``, which the partitions are chosen by)."""
    names = env.names
    queues = queues or (names.commands_queue,)
    total = len(stream.bodies)
    label = f"writes x{processes}"
    with bar(f"{label}: publish", total=total) as progress:
        await env.publish_all(
            names.command_key(stream.plugin_id),
            stream.bodies,
            progress,
            message_ids=len(queues) > 1,
        )
    depths = {queue: (await env.queue_counts(queue))[0] for queue in queues}
    workers = [
        await env.spawn_worker(f"worker-x{processes}-{n}", **settings) for n in range(processes)
    ]

    def alive() -> None:
        for worker in workers:
            worker.check_alive()

    final = list(stream.final.values())
    budget = 60.0 + total / 100
    with bar(f"{label}: apply", total=total) as progress:

        async def ready_below(limit: int) -> bool:
            ready = sum([(await env.queue_counts(queue))[0] for queue in queues])
            progress.update(total - ready - progress.n)
            return ready < limit

        started = await wait_for(
            lambda: ready_below(total),
            timeout=budget,
            what="the workers to start consuming",
            interval=_START_POLL,
            alive=alive,
        )
        started_rss = workers[0].resident().rss
        cpu_before = sum(worker.cpu_seconds() for worker in workers)
        await wait_for(
            lambda: ready_below(1), timeout=budget, what="the queue to drain", alive=alive
        )

        async def all_applied() -> bool:
            return bool(
                await env.pool.fetchval(APPLIED_COUNT, stream.plugin_id, final) == len(final)
            )

        finished = await wait_for(
            all_applied, timeout=budget, what="the last commit", interval=_END_POLL, alive=alive
        )
    cpu = sum(worker.cpu_seconds() for worker in workers) - cpu_before
    return ThroughputRun(Rate(total, finished - started), workers, started_rss, cpu, depths)


async def publish_paced(
    rate: float, count: int, publish: Callable[[int], Coroutine[Any, Any, None]], progress: Any
) -> None:
    """Call ``publish(n)`` for n in 0..count-1 at ``rate`` per second, each in a task of
    its own (confirms are awaited there), so a slow confirm never holds the pace back."""
    began = time.monotonic()
    sent = 0
    async with asyncio.TaskGroup() as group:
        while sent < count:
            due = min(count, int((time.monotonic() - began) * rate) + 1)
            for n in range(sent, due):
                group.create_task(publish(n))
            progress.update(due - sent)
            sent = due
            await asyncio.sleep(_PACE_TICK)


def paced_count(rate: float, seconds: float) -> int:
    """How many writes a latency phase of ``rate`` per second for ``seconds`` publishes."""
    return max(1, round(rate * seconds))


async def publish_latency_writes(
    env: BenchEnv,
    plugin_id: uuid.UUID,
    routing_key: str,
    rate: float,
    seconds: float,
    progress: Any,
) -> dict[str, float]:
    """Publish ``rate`` sets per second for ``seconds``, each to an entry of its own; when
    each entry's set was published (``time.time()``), by its key."""
    count = paced_count(rate, seconds)
    entries = entry_names(count, key_prefix="lat-")
    rng = random.Random(1)
    # Values are made before the clock starts: the publisher must keep the pace cheaply.
    values = [json_value(rng, n) for n in range(count)]
    new_id = MonotonicUuid7()
    published: dict[str, float] = {}

    async def publish(n: int) -> None:
        entry = entries[n]
        body = set_body(plugin_id, new_id(), entry, values[n])
        published[entry.key] = time.time()
        await env.exchange.publish(env.message(body), routing_key)

    await publish_paced(rate, count, publish, progress)
    return published


def publish_to_commit(
    rate: float, published: dict[str, float], committed: dict[str, float]
) -> WriteLatency:
    """The latency of paced writes from when each key's write was published and committed."""
    latencies = [committed[key] - at for key, at in published.items()]
    span = max(published.values()) - min(published.values())
    # n writes paced at `rate` take (n - 1) / rate seconds to publish.
    reached = (len(published) - 1) / span if span > 0 else rate
    return WriteLatency(
        rate,
        Latency.of(latencies),
        max(committed.values()) - max(published.values()),
        published_rate=reached,
    )


async def measure_latency(
    env: BenchEnv,
    worker: Process,
    plugin_id: uuid.UUID,
    rate: float,
    seconds: float,
    bar: Callable[..., Any],
) -> WriteLatency:
    """Publish-to-commit latency of ``rate`` writes per second for ``seconds``, each write
    to an entry of its own, through the one running ``worker``."""
    count = paced_count(rate, seconds)
    commits: list[float] = []
    listener = await env.connection.channel()
    try:
        notices = await listener.declare_exchange(
            commits_exchange(env.settings.prefix), aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await listener.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(notices)

        async def on_notice(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
            commits.append(time.time())

        await queue.consume(on_notice, no_ack=True)
        with bar(f"latency at {rate:,.0f}/s", total=count) as progress:
            published = await publish_latency_writes(
                env, plugin_id, env.names.command_key(plugin_id), rate, seconds, progress
            )

            async def all_committed() -> bool:
                return bool(await env.pool.fetchval(STATE_COUNT, plugin_id) == count)

            await wait_for(
                all_committed,
                timeout=60 + seconds,
                what="the latency writes to commit",
                alive=worker.check_alive,
            )
            # The last commit's notification may still be on its way to the listener.
            await asyncio.sleep(0.1)
    finally:
        await listener.close()
    committed: dict[str, float] = {}
    for row in await env.pool.fetch(COMMITTED_AT, plugin_id):
        at = bisect.bisect_left(commits, row["updated_at"].timestamp())
        if at == len(commits):
            raise BenchError("a latency write committed without a commit notification")
        committed[row["state_key"]] = commits[at]
    return publish_to_commit(rate, published, committed)
