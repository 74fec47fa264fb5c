"""``plugin-state-worker doctor``: one line per check, exit 0 only when every one passes;
healthy, then with each check broken in turn."""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from worker.config import Settings
from worker.migrate import load_migrations

from .broker import rabbitmqctl, require_rabbitmqctl
from .cli import Ran, clean_env, cli, refused_port
from .conftest import StartWorker, database_url_for, drop_database, unique
from .services import ServiceUrls

NAMES = ["postgres", "plugins", "rabbitmq", "topology", "permissions", "http"]

MIGRATIONS = len(load_migrations())


async def doctor(settings: Settings, **variables: str) -> Ran:
    given = {
        "database_url": settings.database_url,
        "amqp_url": settings.amqp_url,
        "prefix": settings.prefix,
        **variables,
    }
    env = clean_env(**{f"PLUGIN_STATE_{name.upper()}": value for name, value in given.items()})
    return await cli("doctor", env=env)


def lines(ran: Ran) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail), in the order printed."""
    found = {}
    for line in ran.stdout.splitlines():
        status, name, detail = line.split(maxsplit=2)
        found[name] = (status, detail)
    assert list(found) == NAMES, ran.stdout
    return found


async def test_a_healthy_setup_passes_every_check(
    start_worker: StartWorker, settings: Settings
) -> None:
    await start_worker()
    ran = await doctor(settings)
    assert ran.code == 0, ran.stdout
    checks = lines(ran)
    assert all(status == "ok" for status, _ in checks.values()), ran.stdout
    assert checks["postgres"][1].endswith(f", migrated to {load_migrations()[-1].file_name}")
    assert "RabbitMQ validates user_id" in checks["permissions"][1]


async def test_postgres_refused(settings: Settings) -> None:
    port = refused_port()
    ran = await doctor(settings, database_url=f"postgresql://postgres@127.0.0.1:{port}/x")
    assert ran.code == 1
    checks = lines(ran)
    assert checks["postgres"] == (
        "FAIL",
        f"cannot reach Postgres at postgresql://postgres@127.0.0.1:{port}/x (connection "
        "refused): start Postgres there, or point --database-url (PLUGIN_STATE_DATABASE_URL) at it",
    )
    assert checks["plugins"] == ("skip", "needs Postgres")


@pytest.fixture
async def empty_database(services: ServiceUrls) -> AsyncIterator[str]:
    name = unique("db")
    admin = await asyncpg.connect(services.admin_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield database_url_for(services.admin_database_url, name)
    await drop_database(services.admin_database_url, name)


async def test_postgres_not_migrated(settings: Settings, empty_database: str) -> None:
    ran = await doctor(settings, database_url=empty_database)
    assert ran.code == 1
    status, detail = lines(ran)["postgres"]
    assert status == "FAIL"
    assert detail.endswith(
        f"at {empty_database} lacks {MIGRATIONS} of {MIGRATIONS} migrations "
        "(first 001_plugins_and_state.sql): "
        "run `plugin-state-worker migrate`"
    )


async def test_rabbitmq_login_refused(settings: Settings) -> None:
    parts = urlsplit(settings.amqp_url)
    netloc = f"{parts.username}:wrong@{parts.hostname}:{parts.port}"
    ran = await doctor(settings, amqp_url=urlunsplit(parts._replace(netloc=netloc)))
    assert ran.code == 1
    checks = lines(ran)
    assert checks["rabbitmq"] == (
        "FAIL",
        f"RabbitMQ at {parts.scheme}://{parts.username}:***@{parts.hostname}:{parts.port}"
        f"{parts.path} refused the login: fix the user or password in --amqp-url "
        "(PLUGIN_STATE_AMQP_URL)",
    )
    assert checks["topology"][0] == checks["permissions"][0] == "skip"


async def test_topology_missing(settings: Settings) -> None:
    ran = await doctor(settings)  # no worker declared this test's prefix
    assert ran.code == 1
    checks = lines(ran)
    prefix = settings.prefix
    assert checks["topology"] == (
        "FAIL",
        f"missing exchange {prefix}, exchange {prefix}.dead, queue {prefix}.commands, queue "
        f"{prefix}.rpc, queue {prefix}.dead, exchange {prefix}.changes: start a worker with "
        "this prefix (it declares the topology), or check --prefix (PLUGIN_STATE_PREFIX)",
    )
    assert checks["permissions"] == ("skip", "needs the topology")


async def test_topology_with_other_arguments(start_worker: StartWorker, settings: Settings) -> None:
    await start_worker()
    ran = await doctor(settings, delivery_limit="7")
    assert ran.code == 1
    status, detail = lines(ran)["topology"]
    assert status == "FAIL"
    assert detail.startswith(
        f"queue {settings.prefix}.commands differs from what these settings declare "
    )
    assert "x-delivery-limit" in detail


async def test_a_user_that_may_not_consume_nor_trust_user_id(
    start_worker: StartWorker, settings: Settings
) -> None:
    require_rabbitmqctl()
    await start_worker()
    base = urlsplit(settings.amqp_url)
    name, password = unique("user_doctor"), secrets.token_hex(12)
    await rabbitmqctl("add_user", name, password)
    try:
        prefix = settings.prefix
        await rabbitmqctl("set_permissions", name, f"^{prefix}.*", f"^{prefix}$", "^$")
        await rabbitmqctl("set_user_tags", name, "impersonator")
        url = urlunsplit(base._replace(netloc=f"{name}:{password}@{base.hostname}:{base.port}"))
        ran = await doctor(settings, amqp_url=url)
    finally:
        await rabbitmqctl("delete_user", name)
    assert ran.code == 1
    status, detail = lines(ran)["permissions"]
    assert status == "FAIL"
    assert detail.startswith(f"user {name!r}: may not consume from {prefix}.commands (")
    assert f"may not consume from {prefix}.rpc (" in detail
    assert detail.endswith(
        f"RabbitMQ took a message whose user_id is not {name!r}: the user may impersonate "
        "(the impersonator tag), so user_id proves nothing; remove the tag"
    )


async def test_a_chosen_http_port_held_by_another_process(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = await doctor(settings, http_port=str(port))
    assert ran.code == 1
    assert lines(ran)["http"] == (
        "FAIL",
        f"port {port} (PLUGIN_STATE_HTTP_PORT) is taken by a process that is not a worker: "
        "choose a free one, or leave it unset",
    )
