"""Fixtures against the real RabbitMQ and Postgres, isolated per run and per test.

Each test session creates its own database (``pstest_<random>``), migrated from scratch and
dropped at the end; each test gets its own topology prefix and its own plugin, so runs and
tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from worker.app import Worker
from worker.config import Settings
from worker.migrate import migrate
from worker.topology import Names, command_queues

from . import helpers
from .services import ServiceUrls, service_urls

# The test-owned RabbitMQ cluster (fixture ``rabbit_cluster``): started only for the tests
# that ask for it, which are marked ``cluster``.
pytest_plugins = ["tests.cluster"]


def unique(kind: str) -> str:
    return f"pstest_{kind}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceUrls]:
    with service_urls() as urls:
        helpers.PUBLISHER = urlsplit(urls.amqp_url).username or "guest"
        yield urls


def database_url_for(admin_url: str, name: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(services: ServiceUrls) -> AsyncIterator[str]:
    """A fresh database for this test session, migrated, dropped afterwards."""
    name = unique("db")
    url = database_url_for(services.admin_database_url, name)
    await migrate(url)
    yield url
    await drop_database(services.admin_database_url, name)


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@contextlib.asynccontextmanager
async def isolated_prefix(services: ServiceUrls | str) -> AsyncIterator[str]:
    """A topology prefix of its own (on the services' broker, or the one at that URL); its
    exchanges and queues, partitions included, are deleted afterwards."""
    name = unique("ps")
    yield name
    await delete_topology(services if isinstance(services, str) else services.amqp_url, name)


async def delete_topology(amqp_url: str, prefix: str) -> None:
    names = Names(prefix)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        partitions = await command_queues(channel, Settings(prefix=prefix))
        for queue in {*partitions, names.rpc_queue, names.rpc_quorum_queue, names.dead}:
            await channel.queue_delete(queue)
        for exchange in (
            names.exchange,
            names.dead,
            names.commands_hash,
            names.commands_unhashed,
        ):
            await channel.exchange_delete(exchange)


@pytest.fixture
async def prefix(services: ServiceUrls) -> AsyncIterator[str]:
    """A topology prefix of this test's own."""
    async with isolated_prefix(services) as name:
        yield name


@pytest.fixture
def settings(services: ServiceUrls, database_url: str, prefix: str) -> Settings:
    return Settings(
        database_url=database_url,
        amqp_url=services.amqp_url,
        prefix=prefix,
        trusted_users=frozenset({helpers.PUBLISHER}),
        http_port=0,  # several workers per test run: let each pick a free port
        batch_wait_ms=5,
        retry_initial_seconds=0.05,
        retry_max_seconds=0.5,
        drain_timeout_seconds=10,
    )


@pytest.fixture
async def plugin_id(db: asyncpg.Pool) -> uuid.UUID:
    """A plugin registered for this test only."""
    plugin = uuid.uuid4()
    await db.execute(
        "INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin, unique("plugin")
    )
    return plugin


@pytest.fixture
async def amqp(services: ServiceUrls) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel for the test's own publishing and peeking."""
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        yield await connection.channel()


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[StartWorker]:
    """Start in-process workers (settings overrides as keywords); all are drained after."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> Worker:
        worker = Worker(settings.with_changes(**overrides) if overrides else settings)
        await worker.start()
        running.append((worker, asyncio.create_task(_serve(worker))))
        return worker

    yield start
    for worker, task in running:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)


async def _serve(worker: Worker) -> None:
    try:
        await worker.serve()
    finally:
        await worker.stop()
