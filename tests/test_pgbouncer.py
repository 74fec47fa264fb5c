"""A worker behind PgBouncer in transaction pooling (cluster issue, Postgres at scale).

Many workers multiply Postgres connections; a transaction pooler shares a few among them.
There, a session is not a connection: a statement prepared in one transaction is gone in
the next, and nothing session-scoped may be relied on. The worker keeps every piece of
state a job needs inside one transaction (its advisory locks are transaction-scoped), wakes
its waiters through the broker rather than ``LISTEN``, and with
``PLUGIN_STATE_DB_STATEMENT_CACHE=0`` prepares nothing that outlives a statement. Here two
workers of six connections each share two server connections, and every path runs:
batched writes, reads that wait for their write, conditional writes, the change log's long
polls, the relay and the expiry sweeper.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest

from worker.client import Change, Conflict, Scope, StateClient, Synced
from worker.config import Settings

from .conftest import StartWorker
from .helpers import state_of, wait_until
from .pgbouncer import Bouncer, pgbouncer
from .streams import Stream

SERVER_CONNECTIONS = 2
NOTES = Scope.issue("ISS-PGB")


@pytest.fixture
async def bouncer(settings: Settings) -> AsyncIterator[Bouncer]:
    async with pgbouncer(settings.database_url, SERVER_CONNECTIONS) as running:
        yield running


async def test_workers_behind_pgbouncer_in_transaction_mode_serve_every_path(
    start_worker: StartWorker,
    bouncer: Bouncer,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    pooled = {
        "database_url": bouncer.url(settings.database_url),
        "db_statement_cache": 0,
        "expiry_interval_seconds": 0.2,
    }
    workers = [await start_worker(**pooled), await start_worker(**pooled)]
    stream = Stream(plugin_id, count=2000, seed=3)
    async with StateClient(settings.amqp_url, plugin_id, prefix=prefix, timeout=15) as state:
        watching = asyncio.create_task(_first_changes(state, count=3))
        await stream.publish(amqp, prefix)

        await state.set(NOTES, "note", {"v": 1})
        entry = await state.get(NOTES, "note")  # waits for its write, on another connection
        assert entry is not None and entry.value == {"v": 1}
        await state.update(NOTES, "counter", lambda e: (e.value if e else 0) + 1)
        await state.update(NOTES, "counter", lambda e: (e.value if e else 0) + 1)
        with pytest.raises(Conflict):
            await state.set(NOTES, "note", {"v": 2}, if_absent=True)
        await state.set(NOTES, "lease", "mine", ttl=0.3, wait=True)

        changes = await asyncio.wait_for(watching, timeout=15)
        assert [(c.key, c.kind) for c in changes] == [
            ("note", "set"),
            ("counter", "set"),
            ("counter", "set"),
        ]
        counter = await state.get(NOTES, "counter")
        assert counter is not None and counter.value == 2

    async def stream_applied() -> bool:
        state = await state_of(db, plugin_id)
        return {k: v for k, v in state.items() if k[1] != NOTES.id} == stream.expected()

    await wait_until(stream_applied, timeout=60, what="the stream's final state")

    async def swept() -> bool:
        rows = await db.fetchval(
            "SELECT count(*) FROM plugin_state WHERE plugin_id = $1 AND state_key = 'lease'",
            plugin_id,
        )
        return bool(rows == 0)

    await wait_until(swept, what="the expired lease's row to be swept")
    for worker in workers:
        assert worker.metrics.value("plugin_state_writes_total", outcome="rejected") == 0
        assert worker.metrics.value("plugin_state_consumer_paused") == 0


async def _first_changes(state: StateClient, count: int) -> list[Change]:
    """The first ``count`` changes of the ``NOTES`` scope after the watch caught up."""
    seen: list[Change] = []
    async for event in state.watch(NOTES, initial=True):
        if isinstance(event, Change):
            seen.append(event)
        elif isinstance(event, Synced):
            seen.clear()  # the listing of an empty scope: nothing before now counts
        if len(seen) == count:
            return seen
    raise AssertionError("the watch ended")
