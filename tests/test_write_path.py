"""Publish -> applied, through a running worker, for set, delete and batch."""

from __future__ import annotations

import uuid

import aio_pika
import asyncpg

from tests.conftest import StartWorker
from tests.helpers import delete_cmd, publish, set_cmd, state_of, wait_until


async def test_set_then_delete_through_a_running_worker(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    await publish(amqp, prefix, plugin_id, set_cmd(plugin_id, "cursor", {"page": 3}))

    async def stored() -> bool:
        return await state_of(db, plugin_id) == {
            ("issue", "ISS-1", "default", "cursor"): {"page": 3}
        }

    await wait_until(stored, what="the set to be applied")
    await publish(amqp, prefix, plugin_id, delete_cmd(plugin_id, "cursor"))

    async def deleted() -> bool:
        return await state_of(db, plugin_id) == {}

    await wait_until(deleted, what="the delete to be applied")
