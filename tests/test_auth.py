"""Who may do what, with real RabbitMQ users: the broker vouches for user_id, the worker
maps it to plugins, and the least-privilege recipe in deploy/rabbitmq keeps each plugin
user to its own routing keys."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import asyncpg
import msgspec
import pytest

from worker.config import Settings
from worker.topology import Names, declare

from .broker import rabbitmqctl, require_rabbitmqctl
from .conftest import StartWorker, isolated_prefix, unique
from .helpers import delete_cmd, set_cmd, state_of, uuid7
from .rpc import RawRpc
from .services import ServiceUrls
from .test_dead_letters import dead, listed, publisher, succeeded, wait_for_count

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq"


@dataclass(frozen=True)
class User:
    name: str
    url: str


@dataclass(frozen=True)
class Cast:
    """Two plugins with their own users, an intruder with broad broker permissions (as on
    a misconfigured broker) and a trusted host user."""

    plugin_a: uuid.UUID
    plugin_b: uuid.UUID
    owner_a: User
    owner_b: User
    intruder: User
    trusted: User


async def run_script(name: str, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(str(DEPLOY / name), *args)
    assert await process.wait() == 0, f"{name} failed"


@pytest.fixture(scope="module")
async def prefix(services: ServiceUrls) -> AsyncIterator[str]:
    """One prefix for the module: the users' topic permissions name its exchange, and
    rabbitmqctl is slow enough that the users are made once, not per test."""
    async with isolated_prefix(services) as name:
        yield name


@pytest.fixture(scope="module")
async def cast(services: ServiceUrls, prefix: str, db: asyncpg.Pool) -> AsyncIterator[Cast]:
    require_rabbitmqctl()
    base = urlsplit(services.amqp_url)
    users: list[User] = []
    for role in ("a", "b", "intruder", "trusted"):
        name = unique(f"user_{role}")
        password = secrets.token_hex(12)
        await rabbitmqctl("add_user", name, password)
        netloc = f"{name}:{password}@{base.hostname}:{base.port or 5672}"
        users.append(User(name, urlunsplit(base._replace(netloc=netloc))))
    owner_a, owner_b, intruder, trusted = users
    plugin_a, plugin_b = uuid.uuid4(), uuid.uuid4()
    for plugin, owner in ((plugin_a, owner_a), (plugin_b, owner_b)):
        await db.execute(
            "INSERT INTO plugins (id, plugin_key, amqp_user) VALUES ($1, $2, $3)",
            plugin,
            unique("plugin"),
            owner.name,
        )
        await run_script("grant-plugin-user.sh", owner.name, str(plugin), prefix)
    for user in (intruder, trusted):
        await rabbitmqctl("set_permissions", user.name, "^$", f"^{prefix}$", "^$")
    try:
        yield Cast(plugin_a, plugin_b, owner_a, owner_b, intruder, trusted)
    finally:
        for user in users:
            await rabbitmqctl("delete_user", user.name)


@pytest.fixture
async def worker_for(start_worker: StartWorker, cast: Cast) -> None:
    await start_worker(trusted_users=frozenset({cast.trusted.name}))


Caller = Callable[..., Awaitable[dict[str, Any]]]


def rpc_as(user: User, settings: Settings, **kwargs: Any) -> RawRpc:
    return RawRpc(user.url, settings.prefix, **kwargs)


def batch_cmd(plugin: uuid.UUID) -> dict[str, Any]:
    return {
        "op": "batch",
        "id": str(uuid7()),
        "plugin_id": str(plugin),
        "ops": [{"op": "set", "scope_kind": "instance", "key": "b", "value": 1}],
    }


def read_requests(plugin: uuid.UUID) -> dict[str, dict[str, Any]]:
    return {
        "get": {"op": "get", "plugin_id": str(plugin), "scope_kind": "instance", "key": "k"},
        "get_many": {
            "op": "get_many",
            "plugin_id": str(plugin),
            "entries": [{"scope_kind": "instance", "key": "k"}],
        },
        "list": {"op": "list", "plugin_id": str(plugin)},
        "changes": {"op": "changes", "plugin_id": str(plugin)},
    }


def write_requests(plugin: uuid.UUID) -> dict[str, dict[str, Any]]:
    return {
        "set": set_cmd(plugin, "k", "mine", scope_kind="instance", scope_id=None),
        "delete": delete_cmd(plugin, "k", scope_kind="instance", scope_id=None),
        "batch": batch_cmd(plugin),
    }


async def test_a_plugin_user_writes_and_reads_its_own_plugin(
    worker_for: None, cast: Cast, settings: Settings, db: asyncpg.Pool
) -> None:
    async with rpc_as(cast.owner_a, settings, user_id=cast.owner_a.name) as a:
        write = set_cmd(cast.plugin_a, "k", "mine", scope_kind="instance", scope_id=None)
        applied = await a.call(cast.plugin_a, write, kind="cmd")
        assert applied == {"type": "applied", "id": write["id"], "outcome": "applied"}
        for op, body in read_requests(cast.plugin_a).items():
            reply = await a.call(cast.plugin_a, body)
            assert reply["type"] != "error", (op, reply)
    assert await state_of(db, cast.plugin_a) == {("instance", None, "default", "k"): "mine"}


async def test_another_plugins_entries_are_forbidden_for_every_op(
    worker_for: None, cast: Cast, settings: Settings, db: asyncpg.Pool
) -> None:
    # The intruder may publish any routing key (a broker misconfiguration): the worker
    # still refuses, for plugin B's keys and for B's body under A's key alike.
    async with rpc_as(cast.intruder, settings, user_id=cast.intruder.name) as intruder:
        for op, body in {**write_requests(cast.plugin_b), **read_requests(cast.plugin_b)}.items():
            kind = "cmd" if op in ("set", "delete", "batch") else "rpc"
            reply = await intruder.call(cast.plugin_b, body, kind=kind)
            assert reply["type"] == "error" and reply["code"] == "forbidden", (op, reply)
    async with rpc_as(cast.owner_a, settings, user_id=cast.owner_a.name) as a:
        # Plugin A's user, with B's body published under A's routing key.
        for op, body in {**write_requests(cast.plugin_b), **read_requests(cast.plugin_b)}.items():
            kind = "cmd" if op in ("set", "delete", "batch") else "rpc"
            reply = await a.call(cast.plugin_a, body, kind=kind)
            assert reply["code"] == "forbidden", (op, reply)
    assert await state_of(db, cast.plugin_b) == {}


async def test_an_unknown_plugin_is_forbidden_not_revealed_to_a_plugin_user(
    worker_for: None, cast: Cast, settings: Settings
) -> None:
    stranger = uuid.uuid4()
    async with rpc_as(cast.intruder, settings, user_id=cast.intruder.name) as intruder:
        reply = await intruder.call(stranger, read_requests(stranger)["get"])
    assert reply["code"] == "forbidden"
    async with rpc_as(cast.trusted, settings, user_id=cast.trusted.name) as trusted:
        reply = await trusted.call(stranger, read_requests(stranger)["get"])
    assert reply["code"] == "unknown_plugin"


async def test_a_message_without_user_id_is_forbidden(
    worker_for: None, cast: Cast, settings: Settings
) -> None:
    async with rpc_as(cast.owner_a, settings, user_id=None) as anonymous:
        for op, body in {**write_requests(cast.plugin_a), **read_requests(cast.plugin_a)}.items():
            kind = "cmd" if op in ("set", "delete", "batch") else "rpc"
            reply = await anonymous.call(cast.plugin_a, body, kind=kind)
            assert reply["code"] == "forbidden", (op, reply)


async def test_a_trusted_user_may_act_for_any_plugin(
    worker_for: None, cast: Cast, settings: Settings, db: asyncpg.Pool
) -> None:
    async with rpc_as(cast.trusted, settings, user_id=cast.trusted.name) as host:
        for plugin in (cast.plugin_a, cast.plugin_b):
            for op, body in {**write_requests(plugin), **read_requests(plugin)}.items():
                kind = "cmd" if op in ("set", "delete", "batch") else "rpc"
                reply = await host.call(plugin, body, kind=kind)
                assert reply["type"] != "error", (op, reply)


async def test_a_forged_user_id_is_refused_by_the_broker_itself(
    worker_for: None, cast: Cast, settings: Settings
) -> None:
    connection = await aio_pika.connect(cast.owner_a.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.prefix, ensure=False)
        forged = set_cmd(cast.plugin_b, "k", "forged", scope_kind="instance", scope_id=None)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await exchange.publish(
                aio_pika.Message(str(forged).encode(), user_id=cast.owner_b.name),
                routing_key=f"cmd.{cast.plugin_a}",
            )


async def test_least_privilege_keeps_a_plugin_user_to_its_own_routing_keys(
    worker_for: None, cast: Cast, settings: Settings
) -> None:
    connection = await aio_pika.connect(cast.owner_a.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.prefix, ensure=False)
        message = aio_pika.Message(b"{}", user_id=cast.owner_a.name)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await exchange.publish(message, routing_key=f"cmd.{cast.plugin_b}")
    connection = await aio_pika.connect(cast.owner_a.url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue(f"{settings.prefix}.commands", passive=True)
            queue = await channel.get_queue(f"{settings.prefix}.commands", ensure=False)
            await queue.get(fail=False)


async def test_a_plugin_user_follows_its_own_feed_and_may_bind_no_other(
    worker_for: None, cast: Cast, settings: Settings
) -> None:
    own_queue = f"{settings.prefix}.reply.{cast.plugin_a}.feed"
    connection = await aio_pika.connect(cast.owner_a.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(own_queue, exclusive=True)
        await queue.bind(f"{settings.prefix}.changes", f"chg.{cast.plugin_a}")
        async with rpc_as(cast.owner_a, settings, user_id=cast.owner_a.name) as a:
            write = set_cmd(cast.plugin_a, "fed", 1, scope_kind="instance", scope_id=None)
            assert (await a.call(cast.plugin_a, write, kind="cmd"))["outcome"] == "applied"
        async with queue.iterator() as messages:
            async with asyncio.timeout(10):
                async for message in messages:
                    await message.ack()
                    if b'"fed"' in message.body:
                        break
        for key in (f"chg.{cast.plugin_b}", "chg.#", "chg.*"):
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                refused = await connection.channel()
                again = await refused.get_queue(own_queue, ensure=False)
                await again.bind(f"{settings.prefix}.changes", key)


# --------------------------------------------------------------------------- dead replay


async def publish_expiring(
    user: User, settings: Settings, routing_key: str, body: dict[str, Any], **headers: Any
) -> None:
    """Publish as ``user`` a command that expires at once: RabbitMQ dead-letters it from the
    commands queue itself, publisher's headers and all."""
    connection = await aio_pika.connect(user.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.prefix, ensure=False)
        message = aio_pika.Message(
            msgspec.json.encode(body),
            content_type="application/json",
            correlation_id=str(body["id"]),
            user_id=user.name,
            expiration=0.001,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key=routing_key)


async def test_dead_replay_never_grants_a_letter_more_authority_than_its_publisher_had(
    start_worker: StartWorker,
    cast: Cast,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
) -> None:
    """Plugin A's user writes for plugin B, with forged dead-letter headers (its only routing
    key, cmd.A), and the intruder writes for B on cmd.B: both expire, RabbitMQ dead-letters
    them, and an operator who may act for every plugin replays the dead queue."""
    operator = settings.with_changes(trusted_users=settings.trusted_users | {cast.trusted.name})
    topology = await declare(amqp, operator)
    await topology.dead.purge()  # the module's earlier tests' dead letters
    names = Names(settings.prefix)
    forged = set_cmd(cast.plugin_b, "forged", 1, scope_kind="instance", scope_id=None)
    await publish_expiring(
        cast.owner_a,
        settings,
        Names.command_key(cast.plugin_a),
        forged,
        **{
            "x-reject-code": "unknown_plugin",
            "x-reject-reason": "registered since",
            "x-original-routing-key": Names.command_key(cast.plugin_b),
            "x-original-exchange": settings.prefix,
            "x-original-user-id": cast.trusted.name,
        },
    )
    intruding = set_cmd(cast.plugin_b, "intruded", 1, scope_kind="instance", scope_id=None)
    await publish_expiring(cast.intruder, settings, Names.command_key(cast.plugin_b), intruding)
    await wait_for_count(amqp, names.dead, 2, "RabbitMQ to dead-letter both expired writes")

    letters = {letter["correlation_id"]: letter for letter in await listed(operator)}

    shown = {
        (letter["code"], letter["dead_lettered_by"], letter["routing_key"], letter["user_id"])
        for letter in letters.values()
    }
    assert shown == {
        ("expired", "rabbitmq", Names.command_key(cast.plugin_a), cast.owner_a.name),
        ("expired", "rabbitmq", Names.command_key(cast.plugin_b), cast.intruder.name),
    }, "described from x-death and the broker-validated properties, not forged headers"

    await start_worker(trusted_users=operator.trusted_users)
    for selection in ((), ("--code", "expired"), ("--routing-key", "cmd.*")):
        result = succeeded(await dead(operator, "replay", "--yes", *selection))
        assert "replayed 0 of 2" in result.stdout, result.stdout
        assert "may not act for plugin" in result.output, result.output
        await wait_for_count(amqp, names.dead, 2, "both letters to stay in the dead queue")

    # The worker is running: a write of B's own, published after the replays, is applied
    # after anything they could have republished.
    async with rpc_as(cast.owner_b, settings, user_id=cast.owner_b.name) as b:
        own = set_cmd(cast.plugin_b, "own", 1, scope_kind="instance", scope_id=None)
        assert (await b.call(cast.plugin_b, own, kind="cmd"))["outcome"] == "applied"
    keys = {key for _, _, _, key in await state_of(db, cast.plugin_b)}
    assert "own" in keys and not keys & {"forged", "intruded"}

    # Asked for by code, as forbidden letters are, the operator vouches for both; the
    # worker still refuses the one whose routing key is A's and body B's.
    forced = succeeded(
        await dead(operator, "replay", "--yes", "--code", "expired", "--code", "forbidden")
    )
    assert "replayed 2 of 2" in forced.stdout, forced.stdout
    await wait_for_count(amqp, names.dead, 1, "the worker to dead-letter A's write for B")
    [again] = await listed(operator)
    assert (again["code"], again["user_id"]) == ("forbidden", publisher(operator))
