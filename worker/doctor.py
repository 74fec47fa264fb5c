"""``plugin-state-worker doctor``: every check an operator would run by hand before (or
while) running workers, in one go, one line each.

Postgres reachable and migrated; the plugins table; RabbitMQ reachable; the topology
declared with the arguments these settings expect; the configured user's permissions
(publish, consume) and whether the broker validates ``user_id`` (the worker's authorization
rests on it); the HTTP port. A check that cannot run because an earlier one failed says
``skip``. Nothing is created or changed: the topology is compared by re-declaring what
exists (which RabbitMQ refuses when the arguments differ), never by declaring what does
not; the consume check subscribes and cancels at once (a delivery it was sent meanwhile is
requeued, as after any lost connection).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

import aio_pika
import aiohttp
import aiormq
import asyncpg
from aio_pika.abc import AbstractConnection

from schemas import topology
from worker import diagnosis
from worker.broker import BROKER_FAILURES
from worker.config import DEFAULT_HTTP_PORT, Settings, redact_url
from worker.migrate import MigrationError, check_server_version, load_migrations
from worker.store import APPLICATION_NAME, DATABASE_FAILURES, QUERIES
from worker.topology import Names, partition_arguments, rpc_queue_name

Status = Literal["ok", "FAIL", "skip"]

_TIMEOUT: Final = 5.0
_REFUSALS: Final = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelNotFoundEntity,
)
_PROBE_KEY: Final = "doctor.probe"
"""A routing key no binding of the protocol matches (cmd.*, rpc.*): a probe goes nowhere."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    @property
    def line(self) -> str:
        return f"{self.status:<4} {self.name:<11} {self.detail}"


async def examine(settings: Settings) -> list[Check]:
    """Every check, in order; each one line."""
    return [*await _postgres(settings), *await _rabbitmq(settings), await _http(settings)]


# ------------------------------------------------------------------------------ Postgres


async def _postgres(settings: Settings) -> list[Check]:
    url = settings.database_url
    try:
        conn = await asyncpg.connect(
            url,
            timeout=_TIMEOUT,
            server_settings={"application_name": f"{APPLICATION_NAME} doctor"},
        )
    except DATABASE_FAILURES as exc:
        failure = diagnosis.database_failure(exc, url)
        return [
            Check("postgres", "FAIL", str(failure) if failure else repr(exc)),
            Check("plugins", "skip", "needs Postgres"),
        ]
    try:
        database = await _migrated(conn, url)
        if database.status != "ok":
            return [database, Check("plugins", "skip", "the database is not migrated")]
        census = await conn.fetchrow(QUERIES["plugin_census"])
        assert census is not None
        plugins = census["plugins"]
        detail = f"{plugins} registered, {census['mapped']} with a RabbitMQ user"
        if not plugins:
            detail += " (`plugin-state-worker plugins add --key KEY` registers one)"
        return [database, Check("plugins", "ok", detail)]
    finally:
        await conn.close()


async def _migrated(conn: asyncpg.Connection, url: str) -> Check:
    where = redact_url(url)
    version = conn.get_server_version()
    server = f"PostgreSQL {version.major}.{version.minor} at {where}"
    try:
        check_server_version(await conn.fetchval(QUERIES["server_version_num"]))
    except MigrationError as exc:
        return Check("postgres", "FAIL", f"{where}: {exc}")
    try:
        applied = {row["version"]: row for row in await conn.fetch(QUERIES["applied_migrations"])}
    except asyncpg.UndefinedTableError:
        applied = {}
    shipped = load_migrations()
    pending = [m.file_name for m in shipped if m.version not in applied]
    unknown = sorted(set(applied) - {m.version for m in shipped})
    if unknown:
        return Check(
            "postgres",
            "FAIL",
            f"{server} has migrations this worker does not know ({unknown}): it was "
            "migrated by a newer version; run that version",
        )
    if pending:
        return Check(
            "postgres",
            "FAIL",
            f"{server} lacks {len(pending)} of {len(shipped)} migrations (first "
            f"{pending[0]}): run `plugin-state-worker migrate`",
        )
    return Check("postgres", "ok", f"{server}, migrated to {shipped[-1].file_name}")


# ------------------------------------------------------------------------------ RabbitMQ


async def _rabbitmq(settings: Settings) -> list[Check]:
    url = settings.amqp_url
    try:
        connection = await aio_pika.connect(
            url,
            timeout=_TIMEOUT,
            client_properties={"connection_name": f"plugin-state-worker doctor {os.getpid()}"},
        )
    except (*BROKER_FAILURES, OSError) as exc:
        failure = diagnosis.broker_failure(exc, url)
        skipped = "RabbitMQ is not reachable"
        return [
            Check("rabbitmq", "FAIL", str(failure) if failure else repr(exc)),
            Check("topology", "skip", skipped),
            Check("permissions", "skip", skipped),
        ]
    async with connection:
        properties: dict[str, Any] = {}
        if connection.transport is not None:
            properties = dict(connection.transport.connection.server_properties)
        product = f"{properties.get('product', 'RabbitMQ')} {properties.get('version', '?')}"
        reachable = Check("rabbitmq", "ok", f"{product} at {redact_url(url)}")
        declared = await _topology(connection, settings)
        if declared.status != "ok":
            return [reachable, declared, Check("permissions", "skip", "needs the topology")]
        return [reachable, declared, await _permissions(connection, settings)]


def _expected(settings: Settings) -> list[tuple[str, str, Any]]:
    """(kind, name, how): the exchanges by type and the queues by arguments."""
    names = Names(settings.prefix)
    expected: list[tuple[str, str, Any]] = [
        ("exchange", names.exchange, aio_pika.ExchangeType.TOPIC),
        ("exchange", names.dead, aio_pika.ExchangeType.FANOUT),
        *(
            ("queue", name, partition_arguments(settings, balanced=settings.command_partitions > 1))
            for name in _command_queues(settings)
        ),
        (
            "queue",
            rpc_queue_name(settings),
            None
            if rpc_queue_name(settings) == names.rpc_queue
            else topology.quorum_arguments(settings.quorum_group_size, balanced=True),
        ),
        ("queue", names.dead, topology.quorum_arguments(settings.quorum_group_size)),
    ]
    if settings.changes:
        expected.append(("exchange", names.changes, aio_pika.ExchangeType.TOPIC))
    return expected


def _command_queues(settings: Settings) -> list[str]:
    names = Names(settings.prefix)
    if settings.command_partitions == 1:
        return [names.commands_queue]
    return [names.commands_partition(i) for i in range(settings.command_partitions)]


async def _topology(connection: AbstractConnection, settings: Settings) -> Check:
    missing: list[str] = []
    problems: list[str] = []
    for kind, name, how in _expected(settings):
        problem = await _compare(connection, kind, name, how)
        if problem == _MISSING:
            missing.append(f"{kind} {name}")
        elif problem:
            problems.append(problem)
    if missing:
        problems.insert(
            0,
            f"missing {', '.join(missing)}: start a worker with this prefix (it declares "
            "the topology), or check --prefix (PLUGIN_STATE_PREFIX)",
        )
    if problems:
        return Check("topology", "FAIL", "; ".join(problems))
    declared = ", ".join(name for _, name, _ in _expected(settings))
    return Check("topology", "ok", f"{declared} declared with the expected arguments")


_MISSING: Final = "missing"


async def _compare(connection: AbstractConnection, kind: str, name: str, how: Any) -> str | None:
    """What is wrong with one exchange or queue, or None: missing (a passive declare), or
    other arguments (re-declared as expected, which RabbitMQ refuses if they differ)."""
    try:
        async with _channel(connection) as channel:
            if kind == "exchange":
                await channel.declare_exchange(name, passive=True)
            else:
                await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return _MISSING
    # A queue made before a creation-only argument (a replica count, a leader placement)
    # was declared keeps working as it was made, as the worker takes it (worker.topology):
    # compared again without those.
    attempts = [how]
    if kind == "queue" and how:
        attempts.append({k: v for k, v in how.items() if k not in topology.CREATION_ONLY_ARGUMENTS})
    for arguments in attempts:
        try:
            async with _channel(connection) as channel:
                if kind == "exchange":
                    await channel.declare_exchange(name, arguments, durable=True)
                else:
                    await channel.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            problem = f"{kind} {name} differs from what these settings declare ({_reason(exc)})"
            if not any(f"'{a}'" in str(exc) for a in topology.CREATION_ONLY_ARGUMENTS):
                return problem
        except aiormq.exceptions.ChannelAccessRefused:
            return f"{kind} {name}: the user may not declare it, so its arguments cannot be checked"
        else:
            return None
    return problem


async def _permissions(connection: AbstractConnection, settings: Settings) -> Check:
    names = Names(settings.prefix)
    user = unquote(urlsplit(settings.amqp_url).username or "guest")
    problems: list[str] = []
    probe = aio_pika.Message(b"{}", user_id=user)
    refused = await _refused(connection, lambda ch: _publish(ch, names.exchange, probe))
    if refused:
        problems.append(f"may not publish to {names.exchange} ({refused})")
    for queue in (*_command_queues(settings), rpc_queue_name(settings)):
        refused = await _refused(connection, functools.partial(_consume, name=queue))
        if refused:
            problems.append(f"may not consume from {queue} ({refused})")
    forged = aio_pika.Message(b"{}", user_id=f"doctor-forged-{uuid.uuid4().hex[:8]}")
    if await _refused(connection, lambda ch: _publish(ch, names.exchange, forged)) is None:
        problems.append(
            f"RabbitMQ took a message whose user_id is not {user!r}: the user may impersonate "
            "(the impersonator tag), so user_id proves nothing; remove the tag"
        )
    if problems:
        return Check("permissions", "FAIL", f"user {user!r}: " + "; ".join(problems))
    return Check(
        "permissions",
        "ok",
        f"user {user!r} may publish to {names.exchange} and consume from "
        f"{names.commands_queue} and {names.rpc_queue}; RabbitMQ validates user_id",
    )


async def _publish(channel: aio_pika.abc.AbstractChannel, exchange: str, message: Any) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(message, routing_key=_PROBE_KEY)


async def _consume(channel: aio_pika.abc.AbstractChannel, *, name: str) -> None:
    await channel.set_qos(prefetch_count=1)
    queue = await channel.get_queue(name, ensure=False)
    tag = await queue.consume(_leave, no_ack=False)
    await queue.cancel(tag)


async def _leave(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A delivery that reaches the consume check goes back to its queue."""
    await message.nack(requeue=True)


async def _refused(
    connection: AbstractConnection,
    action: Callable[[aio_pika.abc.AbstractChannel], Awaitable[None]],
) -> str | None:
    """Run ``action`` on a channel of its own (publisher confirms, so a refusal arrives
    before it returns): None when the broker allowed it, else its reason."""
    try:
        async with _channel(connection) as channel:
            await action(channel)
    except _REFUSALS as exc:
        return _reason(exc)
    return None


@contextlib.asynccontextmanager
async def _channel(connection: AbstractConnection) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    channel = await connection.channel(publisher_confirms=True)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*BROKER_FAILURES):
                await channel.close()


def _reason(exc: BaseException) -> str:
    """The broker's words, e.g. ``ACCESS_REFUSED - write access to exchange ... refused``."""
    text = str(exc.args[0] if exc.args else exc)
    return text.partition(" - ")[2] or text


# ------------------------------------------------------------------------------ HTTP


async def _http(settings: Settings) -> Check:
    port = DEFAULT_HTTP_PORT if settings.http_port is None else settings.http_port
    if port == 0:
        return Check("http", "ok", "PLUGIN_STATE_HTTP_PORT=0: a worker takes any free port")
    with socket.socket() as probe:
        try:
            probe.bind((settings.http_host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return Check("http", "FAIL", f"cannot bind {settings.http_host}:{port}: {exc}")
        else:
            return Check("http", "ok", f"port {port} is free for a worker's /metrics, /readyz")
    if await _worker_answers(port):
        return Check("http", "ok", f"a worker serves /healthz on port {port}")
    if settings.http_port is None:
        return Check(
            "http",
            "ok",
            f"port {port} is taken by another process: a worker here moves to the next free one",
        )
    return Check(
        "http",
        "FAIL",
        f"port {port} (PLUGIN_STATE_HTTP_PORT) is taken by a process that is not a worker: "
        "choose a free one, or leave it unset",
    )


async def _worker_answers(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(url) as response,
        ):
            return response.status == 200 and (await response.json()).get("alive") is True
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
