"""Conditional writes and expiring entries through running workers (protocol §7): a claim
that exactly one client wins, a counter that eight processes increment without losing one,
batches that apply all or nothing, expiry that reads as missing at once and is swept into
tombstones, even by a worker killed halfway."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest

from worker.client import Conflict, Scope, StateClient, op_delete, op_set
from worker.config import Settings
from worker.topology import declare

from .conftest import StartWorker
from .helpers import wait_until
from .processes import kill_tree, spawn_worker, wait_exit

ISSUE = Scope.issue("ISS-7")
COUNTERS = 8
INCREMENTS = int(os.environ.get("PLUGIN_STATE_COUNTER_INCREMENTS", "200"))

ClientFactory = Callable[..., AbstractAsyncContextManager[StateClient]]


@pytest.fixture
def connect(settings: Settings, plugin_id: uuid.UUID) -> ClientFactory:
    def factory(**options: Any) -> StateClient:
        return StateClient(
            settings.amqp_url, plugin_id, prefix=settings.prefix, timeout=10, **options
        )

    return factory


@pytest.fixture
async def client(connect: ClientFactory) -> AsyncIterator[StateClient]:
    async with connect() as state:
        yield state


async def test_of_twenty_clients_racing_for_a_claim_exactly_one_wins(
    start_worker: StartWorker, connect: ClientFactory
) -> None:
    await start_worker()
    await start_worker()

    async def claim(n: int) -> bool:
        async with connect() as state:
            try:
                await state.set(ISSUE, "leader", {"client": n}, if_absent=True)
            except Conflict:
                return False
            return True

    won = await asyncio.gather(*(claim(n) for n in range(20)))
    assert sum(won) == 1


async def test_eight_processes_incrementing_one_counter_lose_no_increment(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    client: StateClient,
) -> None:
    await declare(amqp, settings)
    workers = [spawn_worker(settings), spawn_worker(settings)]
    try:
        started = time.monotonic()
        counters = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.clients.counter",
                settings.amqp_url,
                str(plugin_id),
                settings.prefix,
                str(INCREMENTS),
            )
            for _ in range(COUNTERS)
        ]
        codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in counters)), 600)
        took = time.monotonic() - started
        assert codes == [0] * COUNTERS
        entry = await client.get(Scope.instance(), "counter")
        assert entry is not None and entry.value == COUNTERS * INCREMENTS
        print(f"counter: {COUNTERS} processes x {INCREMENTS} increments in {took:.1f}s")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            assert await wait_exit(worker) == 0


async def test_update_reads_modifies_and_writes_only_over_what_it_read(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker()
    assert await client.update(ISSUE, "list", lambda e: [*(e.value if e else []), 1]) == [1]
    assert await client.update(ISSUE, "list", lambda e: [*(e.value if e else []), 2]) == [1, 2]
    entry = await client.get(ISSUE, "list")
    assert entry is not None and entry.value == [1, 2]


async def test_if_version_applies_over_its_version_only_and_a_conflict_changes_nothing(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker()
    first = await client.set(ISSUE, "k", 1, wait=True)
    second = await client.set(ISSUE, "k", 2, if_version=first)
    with pytest.raises(Conflict):
        await client.set(ISSUE, "k", 3, if_version=first)  # first is no longer the version
    entry = await client.get(ISSUE, "k")
    assert entry is not None and entry.value == 2 and entry.version == second
    with pytest.raises(Conflict):
        await client.delete(ISSUE, "k", if_version=first)
    await client.delete(ISSUE, "k", if_version=second)
    assert await client.get(ISSUE, "k") is None
    with pytest.raises(Conflict):
        await client.set(ISSUE, "k", 4, if_version=second)  # no value: use if_absent


async def test_a_batch_with_a_failing_condition_applies_nothing_and_names_the_op(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker()
    await client.set(ISSUE, "taken", "yes", wait=True)
    with pytest.raises(Conflict) as raised:
        await client.batch(
            [
                op_set(ISSUE, "a", 1),
                op_set(ISSUE, "taken", "mine", if_absent=True),
                op_delete(ISSUE, "b"),
            ]
        )
    assert raised.value.failed_op == 1
    assert await client.get(ISSUE, "a") is None
    taken = await client.get(ISSUE, "taken")
    assert taken is not None and taken.value == "yes"


async def test_a_conflict_is_counted_and_answered_not_dead_lettered(
    start_worker: StartWorker, client: StateClient, amqp: aio_pika.abc.AbstractChannel, prefix: str
) -> None:
    worker = await start_worker()
    await client.set(ISSUE, "k", 1, if_absent=True)
    with pytest.raises(Conflict):
        await client.set(ISSUE, "k", 1, if_absent=True)
    assert worker.metrics.value("plugin_state_writes_total", outcome="conflict") == 1
    dead = await amqp.declare_queue(f"{prefix}.dead", passive=True)
    assert dead.declaration_result.message_count == 0


# -------------------------------------------------------------------------- expiry


async def test_an_expired_entry_reads_as_missing_at_once_everywhere(
    start_worker: StartWorker, client: StateClient
) -> None:
    # The sweeper is slow here: what hides the entry is the reads' own check.
    await start_worker(expiry_interval_seconds=3600)
    await client.set(ISSUE, "short", "soon gone", ttl=timedelta(milliseconds=300), wait=True)
    await client.set(ISSUE, "long", "stays", ttl=3600, wait=True)
    entry = await client.get(ISSUE, "short")
    assert entry is not None and entry.expires_at is not None
    await asyncio.sleep(0.5)
    assert await client.get(ISSUE, "short") is None
    assert [e is None for e in await client.get_many([(ISSUE, "short"), (ISSUE, "long")])] == [
        True,
        False,
    ]
    assert [e.key async for e in client.list(ISSUE)] == ["long"]
    # Absent for a condition too, and a set without ttl makes it permanent.
    await client.set(ISSUE, "short", "back", if_absent=True)
    entry = await client.get(ISSUE, "short")
    assert entry is not None and entry.value == "back" and entry.expires_at is None


async def test_the_sweeper_turns_expired_rows_into_tombstones_at_their_version(
    start_worker: StartWorker, client: StateClient, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    worker = await start_worker(expiry_interval_seconds=0.2)
    version = await client.set(ISSUE, "k", 1, ttl=0.2, wait=True)

    async def swept() -> bool:
        rows = await db.fetchval("SELECT count(*) FROM plugin_state WHERE plugin_id=$1", plugin_id)
        return bool(rows == 0)

    await wait_until(swept, what="the expired row to go")
    tombstone = await db.fetchrow(
        "SELECT version, deleted, expired FROM plugin_state_versions WHERE plugin_id=$1", plugin_id
    )
    assert tombstone is not None and tuple(tombstone) == (version, True, True)
    counters = await db.fetchrow(
        "SELECT entries, bytes, tombstones FROM plugin_counters WHERE plugin_id=$1", plugin_id
    )
    assert counters is not None and tuple(counters) == (0, 0, 1)
    assert worker.metrics.value("plugin_state_expired_total") == 1


async def test_a_worker_killed_while_sweeping_loses_nothing(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    count = 20_000
    await db.execute(
        """
        WITH rows AS (
            SELECT 'k' || n AS key, ('01' || lpad(to_hex(n), 6, '0'))::text AS n
            FROM generate_series(1, $2) n
        ), state AS (
            INSERT INTO plugin_state (plugin_id, scope_kind, scope_id, namespace, state_key,
                                      value_json, version, value_bytes, expires_at)
            SELECT $1, 'issue', 'SWEEP', 'default', key, '1', $3, 1, now() - interval '1 s'
            FROM rows
        )
        INSERT INTO plugin_state_versions (plugin_id, scope_kind, scope_id, namespace,
                                           state_key, version, deleted, value_bytes, expires_at)
        SELECT $1, 'issue', 'SWEEP', 'default', key, $3, false, 1, now() - interval '1 s'
        FROM rows
        """,
        plugin_id,
        count,
        uuid.UUID("01000000-0000-7000-8000-000000000000"),
    )
    await db.execute(
        "UPDATE plugin_counters SET entries = $2, bytes = $2 WHERE plugin_id = $1", plugin_id, count
    )
    await declare(amqp, settings)
    remaining = "SELECT count(*) FROM plugin_state WHERE plugin_id = $1"
    worker = spawn_worker(settings, expiry_interval_seconds="0.05")

    async def sweeping() -> bool:
        return bool(await db.fetchval(remaining, plugin_id) < count)

    await wait_until(sweeping, what="the sweep to start")
    kill_tree(worker)  # the supervisor and its processes: none drains
    assert await wait_exit(worker) == -signal.SIGKILL
    left = await db.fetchval(remaining, plugin_id)
    print(f"killed while sweeping with {left} of {count} expired rows left")
    worker = spawn_worker(settings, expiry_interval_seconds="0.05")
    try:

        async def all_swept() -> bool:
            return bool(await db.fetchval(remaining, plugin_id) == 0)

        await wait_until(all_swept, timeout=60, what="every expired row swept")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert await wait_exit(worker) == 0
    tombstones = await db.fetchval(
        "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1 AND deleted AND expired",
        plugin_id,
    )
    counters = await db.fetchrow(
        "SELECT entries, bytes, tombstones FROM plugin_counters WHERE plugin_id=$1", plugin_id
    )
    assert tombstones == count
    assert counters is not None and tuple(counters) == (0, 0, count)
