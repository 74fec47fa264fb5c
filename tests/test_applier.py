"""Last-writer-wins, tombstones and culprit isolation, applied to the real Postgres."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from schemas.codec import codec_for
from schemas.errors import Stale, UnknownPlugin
from worker.applier import Applier, Result
from worker.config import Settings
from worker.model import Write
from worker.retention import purge_once
from worker.store import LOCK_CLASS, RETENTION_LOCK, Store
from worker.validate import Rules, validate_write

from .helpers import (
    delete_cmd,
    set_cmd,
    state_of,
    trusted_caller,
    trusting_authorizer,
    uuid7,
)

RULES = Rules(value_max_bytes=1 << 20, retention_ms=7 * 86_400_000, future_skew_ms=300_000)


def write(command: dict[str, Any], now_ms: int | None = None) -> Write:
    decoded = codec_for(None).decode_write(msgspec.json.encode(command))
    caller = trusted_caller(uuid.UUID(command["plugin_id"]))
    return validate_write(decoded, now_ms or int(time.time() * 1000), RULES, caller)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    yield Store(pool)
    await pool.close()


async def apply(store: Store, *commands: dict[str, Any]) -> list[Result]:
    return await Applier(store, trusting_authorizer()).apply([write(c) for c in commands])


KEY = ("issue", "ISS-1", "default", "k")


async def test_older_set_cannot_resurrect_deleted_entry(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    old, new = uuid7(), uuid7()
    assert await apply(store, delete_cmd(plugin_id, "k", write_id=new)) == ["applied"]
    assert await apply(store, set_cmd(plugin_id, "k", 1, write_id=old)) == ["superseded"]
    assert await state_of(db, plugin_id) == {}


async def test_newer_set_after_delete_brings_the_entry_back(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await apply(store, delete_cmd(plugin_id, "k"))
    await apply(store, set_cmd(plugin_id, "k", "back"))
    assert await state_of(db, plugin_id) == {KEY: "back"}


async def test_redelivered_write_is_superseded_and_changes_nothing(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    command = set_cmd(plugin_id, "k", {"a": 1})
    assert await apply(store, command, command) == ["applied", "superseded"]
    before = await db.fetchrow(
        "SELECT value_json, updated_at FROM plugin_state WHERE plugin_id=$1", plugin_id
    )
    assert await apply(store, command) == ["superseded"]
    after = await db.fetchrow(
        "SELECT value_json, updated_at FROM plugin_state WHERE plugin_id=$1", plugin_id
    )
    assert before == after


async def test_later_op_of_one_batch_wins_on_the_same_entry(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    batch = {
        "op": "batch",
        "id": str(uuid7()),
        "plugin_id": str(plugin_id),
        "ops": [
            {"op": "set", "scope_kind": "issue", "scope_id": "ISS-1", "key": "k", "value": 1},
            {"op": "delete", "scope_kind": "issue", "scope_id": "ISS-1", "key": "k"},
            {"op": "set", "scope_kind": "issue", "scope_id": "ISS-1", "key": "k", "value": 3},
            {"op": "set", "scope_kind": "instance", "key": "k", "value": "inst"},
        ],
    }
    assert await apply(store, batch) == ["applied"]
    assert await state_of(db, plugin_id) == {KEY: 3, ("instance", None, "default", "k"): "inst"}


async def test_stored_null_is_a_value_and_the_row_records_its_version(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    write_id = uuid7()
    await apply(store, set_cmd(plugin_id, "k", None, write_id=write_id))
    row = await db.fetchrow(
        "SELECT value_json, version FROM plugin_state WHERE plugin_id=$1", plugin_id
    )
    assert row is not None and row["value_json"] == "null" and row["version"] == write_id


class _StaleCatalog(Store):
    """Believes every plugin exists, like a worker whose check raced a plugin removal."""

    async def plugin_owners(self, ids: Any) -> dict[uuid.UUID, str | None]:
        return dict.fromkeys(ids)


async def test_a_write_postgres_refuses_is_isolated_and_its_batch_mates_applied(
    database_url: str, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    store = _StaleCatalog(pool)
    try:
        gone = uuid.uuid4()
        commands = [set_cmd(plugin_id, f"k{n}", n) for n in range(5)]
        commands.insert(3, set_cmd(gone, "k", "orphan"))
        results = await apply(store, *commands)
    finally:
        await store.close()
    assert isinstance(results[3], UnknownPlugin)
    assert [r for i, r in enumerate(results) if i != 3] == ["applied"] * 5
    assert len(await state_of(db, plugin_id)) == 5


async def test_retention_purges_old_tombstones_and_older_writes_are_then_stale(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID, settings: Settings
) -> None:
    deleted_at = int(time.time() * 1000)
    delete_id = uuid7(deleted_at)
    await apply(store, delete_cmd(plugin_id, "k", write_id=delete_id))
    tombstones = "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1 AND deleted"
    assert await db.fetchval(tombstones, plugin_id) == 1
    # Not yet past the retention: kept.
    await purge_once(store, settings, time.time())
    assert await db.fetchval(tombstones, plugin_id) == 1
    later = (deleted_at / 1000) + settings.retention_seconds + settings.future_skew_seconds + 1
    assert (await purge_once(store, settings, later) or 0) >= 1
    assert await db.fetchval(tombstones, plugin_id) == 0
    # Any write old enough to lose against the purged tombstone is now refused as stale.
    with pytest.raises(Stale):
        write(set_cmd(plugin_id, "k", 1, write_id=uuid7(deleted_at - 1)), int(later * 1000))


async def test_only_one_worker_at_a_time_purges(
    store: Store, database_url: str, settings: Settings
) -> None:
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1::int, $2::int)", LOCK_CLASS, RETENTION_LOCK
            )
            assert await purge_once(store, settings, time.time()) is None
    finally:
        await holder.close()
