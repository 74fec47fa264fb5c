"""Chaos with three worker processes and tens of thousands of writes: kill one, cut their
Postgres backends, close their broker connections. After each, the state equals the model
(the last write per entry), nothing is dead-lettered, and every worker is ready again."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import aiohttp
import asyncpg
import pytest

from worker.config import Settings
from worker.store import APPLICATION_NAME
from worker.topology import Names, declare

from .broker import close_connections, require_rabbitmqctl
from .helpers import free_port, wait_until
from .processes import kill_tree, spawn_worker, tree, wait_exit
from .streams import Stream

WRITES = 20_000
WORKERS = 3


@dataclass
class Fleet:
    settings: Settings
    processes: list[subprocess.Popen[bytes]]
    ports: list[int]

    def start(self, index: int) -> None:
        self.processes[index] = spawn_worker(self.settings, http_port=str(self.ports[index]))

    async def readiness(self, index: int) -> dict[str, bool] | None:
        url = f"http://127.0.0.1:{self.ports[index]}/readyz"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                body: dict[str, bool] = json.loads(await response.text())
                return body
        except aiohttp.ClientError:
            return None

    async def all_ready(self) -> bool:
        states = await asyncio.gather(*(self.readiness(i) for i in range(len(self.ports))))
        return all(state is not None and state.get("ready") for state in states)


@pytest.fixture
async def fleet(settings: Settings, amqp: aio_pika.abc.AbstractChannel) -> AsyncIterator[Fleet]:
    await declare(amqp, settings)
    fleet = Fleet(settings, [], [free_port() for _ in range(WORKERS)])
    for index in range(WORKERS):
        fleet.processes.append(spawn_worker(settings, http_port=str(fleet.ports[index])))
    try:
        await wait_until(fleet.all_ready, timeout=60, what="three ready workers")
        yield fleet
    finally:
        for process in fleet.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = [await wait_exit(process) for process in fleet.processes]
        assert all(code == 0 for code in codes), f"workers exited with {codes}"


async def settle(
    fleet: Fleet,
    stream: Stream,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    started: float,
    what: str,
) -> None:
    await wait_until(lambda: stream.matches(db), timeout=120, what="the final state")
    await wait_until(fleet.all_ready, timeout=60, what="every worker ready again")
    names = Names(fleet.settings.prefix)
    dead = await amqp.declare_queue(names.dead, passive=True)
    commands = await amqp.declare_queue(names.commands_queue, passive=True)
    assert dead.declaration_result.message_count == 0, "something was dead-lettered"
    assert commands.declaration_result.message_count == 0
    print(
        f"{what}: {len(stream.commands)} writes over {stream.entries} entries settled in "
        f"{time.monotonic() - started:.1f}s; state equals the model, no dead letters, "
        f"{WORKERS} workers ready"
    )


async def test_sigkill_one_of_three_workers_and_restart_it(
    fleet: Fleet,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    stream = Stream(plugin_id, count=WRITES, entries=500, seed=11)
    started = time.monotonic()
    publishing = asyncio.create_task(stream.publish(amqp, prefix))
    await asyncio.sleep(1.0)  # chaos lands mid-stream, whatever the machine's speed
    kill_tree(fleet.processes[0])  # the supervisor and its processes: none drains
    assert await wait_exit(fleet.processes[0]) == -signal.SIGKILL
    fleet.start(0)
    await publishing
    await settle(fleet, stream, db, amqp, started, "SIGKILL of worker 1 and restart")


async def test_terminating_the_workers_postgres_backends_mid_stream(
    fleet: Fleet,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    stream = Stream(plugin_id, count=WRITES, entries=500, seed=12)
    started = time.monotonic()
    publishing = asyncio.create_task(stream.publish(amqp, prefix))
    terminated = 0
    for _ in range(3):
        await asyncio.sleep(0.5)
        terminated += await db.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE $1 || '%') t",
            APPLICATION_NAME,
        )
    await publishing
    assert terminated > 0
    await settle(fleet, stream, db, amqp, started, f"{terminated} worker backends terminated")


async def test_closing_the_workers_broker_connections_mid_stream(
    fleet: Fleet,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    require_rabbitmqctl()
    stream = Stream(plugin_id, count=WRITES, entries=500, seed=13)
    started = time.monotonic()
    publishing = asyncio.create_task(stream.publish(amqp, prefix))
    await asyncio.sleep(1.0)
    closed = 0
    for process in fleet.processes:
        for pid in tree(process.pid):  # the connections of each process of the worker
            closed += await close_connections(f":{pid}:")
    await publishing
    assert closed == 2 * WORKERS  # each worker's write path's and read path's
    await settle(fleet, stream, db, amqp, started, f"{closed} broker connections closed")
