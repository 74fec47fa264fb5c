"""Reads are served while the write path is saturated: a `get` does not wait for a backlog
of writes to be applied (docs/performance.md, "Reads beside a write flood")."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import asyncpg

from worker.config import Settings
from worker.priority import ReadsFirst
from worker.topology import declare

from .conftest import StartWorker
from .helpers import get_request, publish, set_cmd, state_of, wait_until
from .rpc import RawRpc

BACKLOG = 10_000
"""Writes queued before the worker starts: seconds of work for it."""
GETS = 20
"""Reads made back to back while the backlog is being applied."""
_PUBLISH_WINDOW = 500
_KEYS = 500


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
    backlog = [set_cmd(plugin_id, f"k{n % _KEYS}", n) for n in range(BACKLOG)]
    # Batches of one plugin may commit in any order (last writer wins by write id): the
    # backlog is applied when every key holds its last write, not when the last one is in.
    final: dict[tuple[str, ...], Any] = {
        ("issue", "ISS-1", "default", f"k{n % _KEYS}"): n for n in range(BACKLOG)
    }
    final[("issue", "ISS-1", "default", "read-me")] = "here"
    for start in range(0, BACKLOG, _PUBLISH_WINDOW):
        await asyncio.gather(
            *(
                publish(amqp, prefix, plugin_id, command)
                for command in backlog[start : start + _PUBLISH_WINDOW]
            )
        )
    await start_worker()

    async def read_me_applied() -> bool:
        # Not any first row: the batch holding "read-me" may commit after later ones.
        return ("issue", "ISS-1", "default", "read-me") in await state_of(db, plugin_id)

    await wait_until(read_me_applied, what="the worker to start applying the backlog")

    async with RawRpc(settings.amqp_url, prefix) as rpc:
        for _ in range(GETS):
            reply = await rpc.call(plugin_id, get_request(plugin_id, "read-me"), timeout=30)
            assert reply["found"] is True and reply["value"] == "here"

    assert await state_of(db, plugin_id) != final, (
        "the backlog was applied before the reads were answered"
    )

    async def backlog_applied() -> bool:
        return await state_of(db, plugin_id) == final

    await wait_until(backlog_applied, timeout=120, what="the backlog to be applied")


async def test_the_write_path_waits_while_reads_are_held() -> None:
    priority = ReadsFirst(most_wait=60)
    priority.arrived(2)
    turn = asyncio.ensure_future(priority.writes_turn())
    priority.served()
    await asyncio.sleep(0)
    assert not turn.done()
    priority.served()
    await turn


async def test_the_write_path_never_waits_for_reads_longer_than_its_bound() -> None:
    priority = ReadsFirst(most_wait=0.01)
    priority.arrived()
    # A read that is never served: the write path goes on all the same.
    await priority.writes_turn()
    await priority.writes_turn()
