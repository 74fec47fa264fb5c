"""Reads are served while the write path is saturated: a `get` does not wait for a backlog
of writes to be applied (docs/performance.md, "Reads beside a write flood")."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import asyncpg

from worker.config import Settings
from worker.topology import declare

from .conftest import StartWorker
from .helpers import publish, set_cmd, state_of, wait_until
from .rpc import RawRpc

BACKLOG = 10_000
"""Writes queued before the worker starts: seconds of work for it."""
GETS = 20
"""Reads made back to back while the backlog is being applied."""
_PUBLISH_WINDOW = 500


async def test_gets_are_answered_while_a_write_backlog_is_still_being_applied(
    start_worker: StartWorker,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    await publish(amqp, prefix, plugin_id, set_cmd(plugin_id, "read-me", "here"))
    backlog = [set_cmd(plugin_id, f"k{n % 500}", n) for n in range(BACKLOG - 1)]
    # Last in the queue: once it is applied, the whole backlog is.
    backlog.append(set_cmd(plugin_id, "last", True))
    for start in range(0, BACKLOG, _PUBLISH_WINDOW):
        await asyncio.gather(
            *(
                publish(amqp, prefix, plugin_id, command)
                for command in backlog[start : start + _PUBLISH_WINDOW]
            )
        )
    await start_worker()

    async def first_write_applied() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM plugin_state WHERE plugin_id = $1", plugin_id)
        )

    await wait_until(first_write_applied, what="the worker to start applying the backlog")

    get = {"op": "get", "plugin_id": str(plugin_id), "scope_kind": "issue", "scope_id": "ISS-1"}
    async with RawRpc(settings.amqp_url, prefix) as rpc:
        for _ in range(GETS):
            reply = await rpc.call(plugin_id, {**get, "key": "read-me"}, timeout=30)
            assert reply["found"] is True and reply["value"] == "here"

    state = await state_of(db, plugin_id)
    assert ("issue", "ISS-1", "default", "last") not in state, (
        "the backlog was applied before the reads were answered"
    )

    async def backlog_applied() -> bool:
        return ("issue", "ISS-1", "default", "last") in await state_of(db, plugin_id)

    await wait_until(backlog_applied, timeout=120, what="the backlog to be applied")
