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
from schemas.errors import Stale, UnknownPlugin, UnsupportedValue
from worker.applier import Applier, Result, TimedOut
from worker.config import Settings
from worker.model import Conflict, EntryKey, EntryWrite, Write
from worker.retention import purge_once
from worker.store import LOCK_CLASS, RETENTION_LOCK, Store
from worker.validate import Rules, validate_write

from .helpers import (
    delete_cmd,
    set_cmd,
    state_of,
    trusted_caller,
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


async def apply(store: Store, *commands: dict[str, Any] | Write) -> list[Result | TimedOut]:
    writes = [c if isinstance(c, Write) else write(c) for c in commands]
    return await Applier(store, RULES.retention_ms).apply(writes)


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


async def test_a_redelivered_conflicted_claim_stays_a_conflict_after_the_holder_is_deleted(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    """Protocol §7: redelivery stays idempotent. The claim was told `conflict`; a late,
    older delete then clears the holder's value; the claim's redelivery must not apply, or
    two clients would both hold the claim."""
    holder, late_delete, claim_id = uuid7(), uuid7(), uuid7()
    claim = {**set_cmd(plugin_id, "k", "me", write_id=claim_id), "if_absent": True}
    assert await apply(store, set_cmd(plugin_id, "k", "holder", write_id=holder)) == ["applied"]
    assert await apply(store, claim) == [Conflict()]
    assert await apply(store, delete_cmd(plugin_id, "k", write_id=late_delete)) == ["applied"]

    assert await apply(store, claim) == [Conflict()], "the redelivery is a conflict again"
    assert await apply(store, claim, claim) == [Conflict(), Conflict()]
    assert await state_of(db, plugin_id) == {}


async def test_a_redelivered_conflicted_batch_names_the_same_failing_op(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    holder = uuid7()
    batch = {
        "op": "batch",
        "id": str(uuid7()),
        "plugin_id": str(plugin_id),
        "ops": [
            {"op": "set", "scope_kind": "instance", "key": "other", "value": 1},
            {
                "op": "set",
                "scope_kind": "issue",
                "scope_id": "ISS-1",
                "key": "k",
                "value": "me",
                "if_absent": True,
            },
        ],
    }
    assert await apply(store, set_cmd(plugin_id, "k", "holder", write_id=holder)) == ["applied"]
    assert await apply(store, batch) == [Conflict(1)]
    await apply(store, delete_cmd(plugin_id, "k"))

    assert await apply(store, batch) == [Conflict(1)]
    assert await state_of(db, plugin_id) == {}


def unvalidated(plugin_id: uuid.UUID, key: str, value_json: str) -> Write:
    """A write that skipped validation, as a bug in it might let through."""
    entry = EntryKey(plugin_id, "issue", "ISS-1", "default", key)
    write_id = uuid7()
    return Write(
        write_id,
        plugin_id,
        (EntryWrite(entry, write_id, value_json, len(value_json)),),
        trusted_caller(plugin_id),
    )


async def test_a_write_postgres_refuses_is_isolated_and_its_batch_mates_applied(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    writes: list[dict[str, Any] | Write] = [set_cmd(plugin_id, f"k{n}", n) for n in range(5)]
    writes.insert(3, unvalidated(plugin_id, "broken", "{not json"))
    results = await apply(store, *writes)
    assert isinstance(results[3], UnsupportedValue)
    assert [r for i, r in enumerate(results) if i != 3] == ["applied"] * 5
    assert len(await state_of(db, plugin_id)) == 5


async def test_a_write_for_a_plugin_removed_meanwhile_is_unknown_plugin(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    gone = uuid.uuid4()
    results = await apply(store, set_cmd(plugin_id, "k", 1), set_cmd(gone, "k", "orphan"))
    assert results[0] == "applied"
    assert isinstance(results[1], UnknownPlugin)


TOMBSTONES = "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1 AND deleted"
COUNTED_TOMBSTONES = "SELECT tombstones FROM plugin_counters WHERE plugin_id=$1"


async def age_tombstones(db: asyncpg.Pool, plugin_id: uuid.UUID, seconds: float) -> None:
    """Make the plugin's tombstones look as if they were written ``seconds`` ago."""
    old_ms = int((time.time() - seconds) * 1000)
    await db.execute(
        "UPDATE plugin_state_versions SET deleted_at = now() - make_interval(secs => $2), "
        "version = $3 WHERE plugin_id = $1 AND deleted",
        plugin_id,
        seconds,
        uuid7(old_ms),
    )


async def test_retention_purges_old_tombstones_and_keeps_younger_ones(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID, settings: Settings
) -> None:
    await apply(store, delete_cmd(plugin_id, "k"))
    assert await db.fetchval(TOMBSTONES, plugin_id) == 1
    await purge_once(store, settings)
    assert await db.fetchval(TOMBSTONES, plugin_id) == 1, "purged before the retention"
    await age_tombstones(
        db, plugin_id, settings.retention_seconds + settings.future_skew_seconds + 60
    )
    assert (await purge_once(store, settings) or 0) >= 1
    assert await db.fetchval(TOMBSTONES, plugin_id) == 0
    assert await db.fetchval(COUNTED_TOMBSTONES, plugin_id) == 0


async def test_a_write_older_than_the_retention_by_the_database_clock_is_stale_when_applied(
    store: Store, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    # Validated long ago (its batch was retried through a long outage), applied now.
    then_ms = int(time.time() * 1000) - RULES.retention_ms - 60_000
    old = write(set_cmd(plugin_id, "k", 1, write_id=uuid7(then_ms + 1)), then_ms)
    (result,) = await apply(store, old)
    assert isinstance(result, Stale)
    assert await state_of(db, plugin_id) == {}


async def test_only_one_worker_at_a_time_purges(
    store: Store, database_url: str, settings: Settings
) -> None:
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1::int, $2::int)", LOCK_CLASS, RETENTION_LOCK
            )
            assert await purge_once(store, settings) is None
    finally:
        await holder.close()
