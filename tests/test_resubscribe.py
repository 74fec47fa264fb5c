"""A consumer the broker cancels (its queue deleted and declared again, its node lost, its
leader moved) is subscribed again, with back-off, on both paths; ``/readyz`` says not ready
meanwhile.

The trial: when the node holding the classic rpc queue went down, the broker cancelled both
workers' rpc consumers and neither subscribed again. On one broker, deleting the queue a
worker consumes makes the broker send the same ``basic.cancel``; a queue of that name
declared meanwhile with other arguments keeps the worker from declaring its own, so the
test sees it not ready until the queue is its own again.
"""

from __future__ import annotations

import uuid

import aio_pika
import asyncpg

from worker.app import Worker
from worker.client import Scope, StateClient
from worker.config import Settings
from worker.topology import Names

from .conftest import StartWorker
from .helpers import state_of, wait_until


async def consumers(amqp: aio_pika.abc.AbstractChannel, queue: str) -> int | None:
    try:
        declared = await amqp.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    return declared.declaration_result.consumer_count


async def cancelled_then_back(
    worker: Worker,
    services_channel: aio_pika.abc.AbstractChannel,
    queue: str,
    check: str,
) -> None:
    """Delete ``queue`` under the worker, squat its name with other arguments until the
    worker reports not ready, then free it; wait until the worker consumes it again."""
    assert worker.readiness()[check]
    await services_channel.queue_delete(queue)
    squatter = await services_channel.declare_queue(
        queue, durable=False, auto_delete=False, arguments={"x-max-length": 7}
    )

    async def not_ready() -> bool:
        return not worker.readiness()[check]

    await wait_until(not_ready, 10, f"{check} to turn false")
    await squatter.delete(if_unused=False, if_empty=False)

    async def consuming_again() -> bool:
        return worker.readiness()[check] and await consumers(services_channel, queue) == 1

    await wait_until(consuming_again, 15, f"the worker to consume {queue} again")


async def test_a_worker_whose_queues_are_deleted_declares_them_again_and_consumes(
    settings: Settings,
    start_worker: StartWorker,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    worker = await start_worker()
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url) as connection:
        for queue, check in (
            (names.rpc_queue, "consuming_reads"),
            (names.commands_queue, "consuming_writes"),
        ):
            await cancelled_then_back(worker, await connection.channel(), queue, check)
    async with StateClient(
        settings.amqp_url, plugin_id, prefix=settings.prefix, timeout=10
    ) as state:
        await state.set(Scope.instance(), "k", "after", wait=True)  # the commands queue, bound
        entry = await state.get(Scope.instance(), "k")  # the rpc queue, bound
        assert entry is not None and entry.value == "after"
    assert (await state_of(db, plugin_id))[("instance", None, "default", "k")] == "after"
