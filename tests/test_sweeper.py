"""The expiry sweeper at the store: one worker's sweeper at a time (the others find its lock
taken and do nothing), each transaction bounded to ``SWEEP_CHUNK`` entries, every expired
row turned into a tombstone at its version."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from worker.applier import Applier
from worker.store import EXPIRY_LOCK, LOCK_CLASS, Store
from worker.sweeper import SWEEP_CHUNK, sweep_chunk, sweep_once

from .helpers import set_cmd, uuid7
from .test_applier import RULES, write

EXPIRED = SWEEP_CHUNK + 500


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    yield Store(pool)
    await pool.close()


async def rows(db: asyncpg.Pool, plugin_id: uuid.UUID) -> int:
    return int(await db.fetchval("SELECT count(*) FROM plugin_state WHERE plugin_id=$1", plugin_id))


async def test_one_sweeper_at_a_time_in_transactions_of_a_bounded_size(
    store: Store, db: asyncpg.Pool, database_url: str, plugin_id: uuid.UUID
) -> None:
    made = int(time.time() * 1000) - 10_000  # written 10 s ago, for 1 ms
    await Applier(store, RULES.retention_ms).apply(
        [
            write({**set_cmd(plugin_id, f"k{n}", n, write_id=uuid7(made + n % 1000)), "ttl_ms": 1})
            for n in range(EXPIRED)
        ]
    )
    assert await rows(db, plugin_id) == EXPIRED  # expired, read as missing, not yet swept

    other_worker = await asyncpg.connect(database_url)
    try:
        async with other_worker.transaction():  # another worker's sweeper is at work
            await other_worker.execute(
                "SELECT pg_advisory_xact_lock($1::int, $2::int)", LOCK_CLASS, EXPIRY_LOCK
            )
            assert await sweep_once(store) is None
            assert await rows(db, plugin_id) == EXPIRED
    finally:
        await other_worker.close()

    swept = await sweep_chunk(store, feed=True)
    assert swept is not None and len(swept) == SWEEP_CHUNK
    assert await rows(db, plugin_id) == EXPIRED - SWEEP_CHUNK
    assert await sweep_once(store) == EXPIRED - SWEEP_CHUNK
    assert await rows(db, plugin_id) == 0
    tombstones = await db.fetchval(
        "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1 AND deleted AND expired",
        plugin_id,
    )
    assert tombstones == EXPIRED
