"""Faults cut only what the test owns: a TCP proxy of its own between worker and Postgres,
the worker's own Postgres backends, the worker's own process. Nothing is lost, nothing is
dead-lettered for a failure that is not the message's fault."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from worker.config import Settings
from worker.store import APPLICATION_NAME
from worker.topology import Names, declare

from .broker import close_connections, connections_named, require_rabbitmqctl
from .conftest import StartWorker
from .helpers import through, wait_until
from .processes import kill_tree, spawn_worker, wait_exit
from .proxy import TcpProxy
from .streams import Stream


@pytest.fixture
async def pg_proxy(settings: Settings) -> AsyncIterator[TcpProxy]:
    target = urlsplit(settings.database_url)
    async with TcpProxy(target.hostname or "localhost", target.port or 5432) as proxy:
        yield proxy


async def dead_letters(amqp: aio_pika.abc.AbstractChannel, prefix: str) -> int:
    queue = await amqp.declare_queue(Names(prefix).dead, passive=True)
    return queue.declaration_result.message_count or 0


async def test_postgres_outage_pauses_then_resumes_without_loss(
    start_worker: StartWorker,
    pg_proxy: TcpProxy,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    stream = Stream(plugin_id, count=2000)
    worker = await start_worker(database_url=through(settings.database_url, pg_proxy.port))
    await stream.publish(amqp, prefix, stop=1000)

    await wait_until(lambda: stream.some_applied(db), what="the first writes")
    pg_proxy.cut()
    await stream.publish(amqp, prefix, start=1000)

    async def paused() -> bool:
        return worker.metrics.value("plugin_state_consumer_paused") == 1

    await wait_until(paused, what="the consumer to pause")
    assert await dead_letters(amqp, prefix) == 0
    print("outage: consumer paused, nothing dead-lettered")

    pg_proxy.restore()
    await wait_until(lambda: stream.matches(db), timeout=60, what="the final state")
    await wait_until(
        lambda: asyncio.sleep(0, not worker.metrics.value("plugin_state_consumer_paused")),
        what="the consumer to resume",
    )
    assert await dead_letters(amqp, prefix) == 0
    assert worker.metrics.value("plugin_state_writes_total", outcome="rejected") == 0


async def test_terminated_backends_lose_nothing(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    stream = Stream(plugin_id, count=3000, seed=1)
    await start_worker()
    publishing = asyncio.create_task(stream.publish(amqp, prefix))
    terminated = 0
    while not publishing.done() or terminated == 0:
        terminated += await db.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE $1 || ' %') t",
            APPLICATION_NAME,
        )
        await asyncio.sleep(0.05)
    await publishing
    print(f"terminated {terminated} worker backends while publishing")
    assert terminated > 0
    await wait_until(lambda: stream.matches(db), timeout=60, what="the final state")
    assert await dead_letters(amqp, prefix) == 0


async def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    stream = Stream(plugin_id, count=4000, seed=2)
    await stream.publish(amqp, prefix)
    first = spawn_worker(settings, batch_size="100")

    try:
        await wait_until(lambda: stream.some_applied(db), what="the worker to apply writes")
    finally:
        kill_tree(first)  # the supervisor and its processes: none drains
    assert await wait_exit(first) == -signal.SIGKILL
    applied_at_kill = await db.fetchval(
        "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1", plugin_id
    )
    print(f"killed with {applied_at_kill} entries written")

    second = spawn_worker(settings, batch_size="100")
    try:
        await wait_until(lambda: stream.matches(db), timeout=90, what="the final state")
    finally:
        second.send_signal(signal.SIGTERM)
    assert await wait_exit(second) == 0
    assert await dead_letters(amqp, prefix) == 0


async def test_sigterm_drains_what_it_holds_and_exits_zero(
    start_worker: StartWorker,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    stream = Stream(plugin_id, count=3000, seed=3)
    await stream.publish(amqp, prefix)
    process = spawn_worker(
        settings, stderr=subprocess.PIPE, batch_size="100", log_format="json", log_level="info"
    )

    try:
        await wait_until(lambda: stream.some_applied(db), what="the worker to apply writes")
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    log = await asyncio.to_thread(process.stderr.read)
    assert await wait_exit(process) == 0
    events = [json.loads(line) for line in log.decode().splitlines() if line.startswith("{")]
    # The write process's (its read process drains its own consumer: worker.supervisor).
    [drained] = [
        e for e in events if e["event"] == "consumer_drained" and e["process"] == "writes+relay"
    ]
    # Everything the worker had received it committed and acked before exiting.
    print(f"SIGTERM: received {drained['received']}, acked {drained['acked']}")
    assert drained["received"] == drained["acked"] > 0
    # Nothing is lost: what was still in the queue (or in flight to the worker when it
    # cancelled) is applied by the next worker, and the state is the model's.
    await start_worker()
    await wait_until(lambda: stream.matches(db), timeout=60, what="the final state")
    assert await dead_letters(amqp, prefix) == 0


async def test_the_read_path_has_a_connection_of_its_own_only_beside_another_role(
    start_worker: StartWorker,
) -> None:
    require_rabbitmqctl()
    cases = [({"writes", "reads", "relay"}, 2), ({"reads"}, 1), ({"writes", "relay"}, 1)]
    for roles, connections in cases:
        worker = await start_worker(roles=frozenset(roles))
        names = await connections_named(worker.instance)
        assert len(names) == connections, roles
        assert sum(" reads" in name for name in names) == ("reads" in roles), roles


async def test_lost_broker_connection_reconnects_and_resumes(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    require_rabbitmqctl()
    stream = Stream(plugin_id, count=3000, seed=4)
    worker = await start_worker()
    await stream.publish(amqp, prefix, stop=1500)

    await wait_until(lambda: stream.some_applied(db), what="the first writes")
    closed = await close_connections(worker.instance)
    print(f"closed {closed} broker connection(s) of the worker")
    assert closed == 2  # the write path's and the read path's
    await stream.publish(amqp, prefix, start=1500)
    await wait_until(lambda: stream.matches(db), timeout=60, what="the final state")
    assert await dead_letters(amqp, prefix) == 0


async def test_resuming_after_a_postgres_outage_survives_a_broker_hiccup(
    start_worker: StartWorker,
    pg_proxy: TcpProxy,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    require_rabbitmqctl()
    stream = Stream(plugin_id, count=1000, seed=5)
    worker = await start_worker(database_url=through(settings.database_url, pg_proxy.port))
    await stream.publish(amqp, prefix, stop=500)
    await wait_until(lambda: stream.some_applied(db), what="the first writes")
    pg_proxy.cut()
    await stream.publish(amqp, prefix, start=500)

    async def paused() -> bool:
        return worker.metrics.value("plugin_state_consumer_paused") == 1

    await wait_until(paused, what="the consumer to pause")
    # The broker goes away while the consumer is paused: its resume meets a dead channel.
    assert await close_connections(worker.instance) == 2  # the write and the read path's
    pg_proxy.restore()
    await wait_until(lambda: stream.matches(db), timeout=60, what="the final state")
    assert worker.consumer is not None
    await wait_until(
        lambda: asyncio.sleep(0, worker.consumer is not None and worker.consumer.consuming),
        what="the consumer to consume again",
    )
    assert await dead_letters(amqp, prefix) == 0


async def test_sigterm_while_the_broker_is_unreachable_exits_zero_within_the_drain(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    target = urlsplit(settings.amqp_url)
    async with TcpProxy(target.hostname or "localhost", target.port or 5672) as proxy:
        amqp_url = urlunsplit(
            target._replace(netloc=f"{target.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")
        )
        process = spawn_worker(settings.with_changes(amqp_url=amqp_url), drain_timeout_seconds="3")
        stream = Stream(plugin_id, count=200, seed=6)
        await stream.publish(amqp, prefix)
        await wait_until(lambda: stream.some_applied(db), what="the worker to apply writes")
        proxy.cut()  # the broker is gone for the worker, mid-stream
        await asyncio.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await wait_exit(process, timeout=20)
        took = time.monotonic() - started
    print(f"SIGTERM during a broker outage: exit {code} after {took:.1f}s")
    assert code == 0
    assert took < 10
