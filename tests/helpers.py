"""Small tools the tests share: waiting on effects, publishing commands, reading state."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import msgspec
import uuid_utils

from schemas.codec import JSON, MSGPACK
from worker.auth import Authorizer, Caller

PUBLISHER = "guest"
"""The RabbitMQ user the tests connect as; the session fixture sets it from the URL. Test
workers trust it, and test messages carry it as their broker-validated ``user_id``."""


def through(url: str, port: int) -> str:
    """``url`` (a Postgres URL), to 127.0.0.1:``port`` instead: through a proxy or a pooler
    of the test's own, as the same user."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def trusted_caller(plugin_id: uuid.UUID) -> Caller:
    """A caller that may write for any plugin, for tests that drive the applier directly."""
    return Caller(PUBLISHER, f"cmd.{plugin_id}")


def trusting_authorizer() -> Authorizer:
    return Authorizer(frozenset({PUBLISHER}))


def uuid7(at_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7, now or at a given Unix time in milliseconds (random bits random)."""
    if at_ms is None:
        return uuid.UUID(str(uuid_utils.uuid7()))
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (at_ms << 80) | (0x7 << 76) | (random_bits & ((1 << 76) - 1))
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float = 15.0,
    what: str = "condition",
    interval: float = 0.05,
) -> None:
    """Poll an effect until it holds, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def encode(body: dict[str, Any] | bytes, content_type: str = JSON) -> bytes:
    if isinstance(body, bytes):
        return body
    if content_type == MSGPACK:
        return msgspec.msgpack.encode(body)
    return msgspec.json.encode(body)


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    prefix: str,
    plugin_id: uuid.UUID | str,
    body: dict[str, Any] | bytes,
    *,
    content_type: str | None = JSON,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    kind: str = "cmd",
    user_id: str | None = None,
) -> None:
    exchange = await channel.get_exchange(prefix, ensure=False)
    message = aio_pika.Message(
        encode(body, content_type or JSON),
        content_type=content_type,
        reply_to=reply_to,
        correlation_id=correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        user_id=user_id or PUBLISHER,
    )
    await exchange.publish(message, routing_key=f"{kind}.{plugin_id}")


def delete_cmd(
    plugin_id: uuid.UUID,
    key: str,
    *,
    write_id: uuid.UUID | None = None,
    scope_kind: str = "issue",
    scope_id: str | None = "ISS-1",
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "op": "delete",
        "id": str(write_id or uuid7()),
        "plugin_id": str(plugin_id),
        "scope_kind": scope_kind,
        "scope_id": scope_id,
        "namespace": namespace,
        "key": key,
    }


def set_cmd(
    plugin_id: uuid.UUID,
    key: str,
    value: Any,
    *,
    write_id: uuid.UUID | None = None,
    scope_kind: str = "issue",
    scope_id: str | None = "ISS-1",
    namespace: str = "default",
) -> dict[str, Any]:
    entry = delete_cmd(
        plugin_id,
        key,
        write_id=write_id,
        scope_kind=scope_kind,
        scope_id=scope_id,
        namespace=namespace,
    )
    return {**entry, "op": "set", "value": value}


async def state_of(db: asyncpg.Pool, plugin_id: uuid.UUID) -> dict[tuple[Any, ...], Any]:
    """The plugin's stored entries: (scope_kind, scope_id, namespace, key) -> value."""
    rows = await db.fetch(
        "SELECT scope_kind, scope_id, namespace, state_key, value_json FROM plugin_state "
        "WHERE plugin_id = $1",
        plugin_id,
    )
    return {
        (r["scope_kind"], r["scope_id"], r["namespace"], r["state_key"]): msgspec.json.decode(
            r["value_json"]
        )
        for r in rows
    }


async def queue_messages(
    channel: aio_pika.abc.AbstractChannel, name: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (and ack) every message now in a queue."""
    queue = await channel.get_queue(name, ensure=False)
    taken = []
    while (message := await queue.get(fail=False, no_ack=False)) is not None:
        await message.ack()
        taken.append(message)
    return taken


def get_request(plugin_id: uuid.UUID, key: str, **fields: Any) -> dict[str, Any]:
    """A `get` request body (§3) for an entry of the issue scope ISS-1."""
    return {
        "op": "get",
        "plugin_id": str(plugin_id),
        "scope_kind": "issue",
        "scope_id": "ISS-1",
        "key": key,
        **fields,
    }
