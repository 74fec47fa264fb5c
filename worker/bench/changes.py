"""The change log's figures: a near-cached ``get``, commit-to-watcher latency, and what the
wake-up path the worker did not choose (``NOTIFY``) would cost (``worker.bench.notify``).

Both run against the bench's worker (which must be running) through the project's client:

- **cached get**: a ``StateClient(cache=...)`` reads each entry once (filling the cache),
  then reads them back to back for ``seconds``; the latency of one call, answered from
  memory while the cache follows the log. The ratio is to the worker's ``get`` round trip.
- **commit to watcher**: a ``watch`` follows the plugin's log while another client writes,
  one write at a time at a steady pace; for each change, the time from its commit to the
  watcher's receiving it. The commit is taken as the latency phase takes it
  (``worker.bench.writes``): the first commit notice at or after the change's transaction
  began (``updated_at``); the database's clock and this machine's are the same machine's.
  That counts the wake-up of the long poll, the read of the log and the reply.
"""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import aio_pika

from worker.bench.harness import BenchEnv, BenchError
from worker.bench.notify import measure_notify
from worker.bench.report import ChangeFigures, Latency
from worker.bench.workload import EntryName
from worker.client import Change, Scope, StateClient
from worker.wakeups import commits_exchange

_WATCH_PACE: Final = 0.02
"""Seconds between the watched writes: one at a time, so each is timed alone."""
_CACHED_ENTRIES: Final = 1000


async def measure_changes(
    env: BenchEnv,
    plugin_id: uuid.UUID,
    entries: list[EntryName],
    seconds: float,
    notify_connections: int,
    bar: Callable[..., Any],
) -> ChangeFigures:
    cached, hit_rate = await _cached_gets(env, plugin_id, entries, seconds, bar)
    watch = await _commit_to_watcher(env, await env.add_plugin("watched"), seconds, bar)
    plain, notifying = await measure_notify(env, notify_connections, seconds, bar)
    return ChangeFigures(cached, hit_rate, watch, plain, notifying)


async def _cached_gets(
    env: BenchEnv,
    plugin_id: uuid.UUID,
    entries: list[EntryName],
    seconds: float,
    bar: Callable[..., Any],
) -> tuple[Latency, float]:
    """The latency of ``get`` with a near cache, once every entry was read; its hit rate."""
    url, prefix = env.amqp_url, env.settings.prefix
    names = [(Scope(e.scope_kind, e.scope_id), e.key) for e in entries[:_CACHED_ENTRIES]]  # type: ignore[arg-type]
    async with StateClient(url, plugin_id, prefix=prefix, cache=True, remember=0) as cached:
        await _until_live(cached)
        for scope, key in names:
            await cached.get(scope, key)
        latencies = []
        with bar("changes: cached get", unit="call") as progress:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for scope, key in names:
                    began = time.perf_counter()
                    await cached.get(scope, key)
                    latencies.append(time.perf_counter() - began)
                progress.update(len(names))
        stats = cached.cache_stats()
        assert stats is not None
    return Latency.of(latencies), stats.hit_rate


async def _commit_to_watcher(
    env: BenchEnv, plugin_id: uuid.UUID, seconds: float, bar: Callable[..., Any]
) -> Latency:
    """Commit-to-watcher latency of paced writes to ``plugin_id`` (see the module)."""
    url, prefix = env.amqp_url, env.settings.prefix
    commits: list[float] = []
    listener = await env.connection.channel()
    notices = await listener.declare_exchange(
        commits_exchange(prefix), aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await listener.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(notices)

    async def on_notice(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
        commits.append(time.time())

    await queue.consume(on_notice, no_ack=True)
    count = max(10, int(seconds / _WATCH_PACE))
    told: list[tuple[float, float]] = []
    """(the change's transaction began, the watcher received it)"""
    synced, all_told = asyncio.Event(), asyncio.Event()
    async with (
        StateClient(url, plugin_id, prefix=prefix) as watching,
        StateClient(url, plugin_id, prefix=prefix, remember=0) as writer,
    ):

        async def follow() -> None:
            async for event in watching.watch(initial=False):
                received = time.time()
                if isinstance(event, Change):
                    told.append((event.updated_at.timestamp(), received))
                    if len(told) >= count:
                        all_told.set()
                else:
                    synced.set()

        following = asyncio.create_task(follow())
        await asyncio.wait_for(synced.wait(), 30)
        scope = Scope.issue("WATCHED")
        with bar("changes: commit to watcher", total=count, unit="change") as progress:
            for n in range(count):
                await writer.set(scope, f"k{n % 100}", n)
                await asyncio.sleep(_WATCH_PACE)
                progress.update(1)
            await asyncio.wait_for(all_told.wait(), 30)
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    await asyncio.sleep(0.1)  # the last notice may still be on its way
    await listener.close()
    lags = []
    for began, received in told:
        at = bisect.bisect_left(commits, began)
        if at == len(commits):
            raise BenchError("a watched change committed without a commit notice")
        lags.append(max(0.0, received - commits[at]))
    return Latency.of(lags)


async def _until_live(state: StateClient) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = state.cache_stats()
        if stats is not None and stats.live:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the near cache never followed the log")
