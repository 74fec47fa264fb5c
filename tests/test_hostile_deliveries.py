"""Single hostile messages through a running worker (protocol §3 and §4): each one ends as a
typed error, on its own, and the worker's connection, consumers and other messages never
notice. Every case here once stopped or fooled a worker."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import asyncpg
import msgspec
import pytest

from schemas.codec import JSON, MSGPACK
from schemas.topology import Names
from worker.app import Worker

from . import frames, helpers
from .conftest import StartWorker
from .helpers import queue_messages, set_cmd, state_of, uuid7, wait_until
from .rpc import RawRpc

ENCODINGS = [JSON, MSGPACK]


async def applied(db: asyncpg.Pool, plugin_id: uuid.UUID, key: str) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM plugin_state WHERE plugin_id = $1 AND state_key = $2",
        plugin_id,
        key,
    )
    return bool(count)


async def dead_letters(
    amqp: aio_pika.abc.AbstractChannel, prefix: str, count: int
) -> dict[str, Any]:
    """The dead queue's letters by correlation id, each as its headers, once it holds
    ``count``: a reject is dead-lettered when its batch settles, which may be after a later
    batch (the sentinel's) has committed."""
    name = Names(prefix).dead

    async def arrived() -> bool:
        queue = await amqp.declare_queue(name, passive=True)
        return (queue.declaration_result.message_count or 0) >= count

    await wait_until(arrived, what=f"{count} dead letters")
    return {
        m.correlation_id or "": dict(m.headers or {})
        for m in await queue_messages(amqp, Names(prefix).dead)
    }


def still_connected_once(worker: Worker) -> bool:
    """The worker kept its first connection: nothing closed it."""
    connection = worker.connection
    return connection is not None and getattr(connection, "connection_attempt", 0) == 1


async def sentinel(
    amqp: aio_pika.abc.AbstractChannel, prefix: str, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    """A good write after the hostile ones: once applied, the worker is still serving."""
    await helpers.publish(amqp, prefix, plugin_id, set_cmd(plugin_id, "sentinel", True))
    await wait_until(lambda: applied(db, plugin_id, "sentinel"), what="the write after")


# ----------------------------------------------------------------------- write bodies

REGRESSION_VALUES = {
    # A MessagePack timestamp extension (-1) of 3 bytes: no valid timestamp has that size.
    "msgpack timestamp of a bad size": (
        MSGPACK,
        bytes.fromhex("c703ff000000"),
        "unsupported_value",
    ),
    # A map whose key is a map.
    "msgpack map key that is a map": (MSGPACK, b"\x81\x81\xa1a\x01\x01", "unsupported_value"),
    # An escaped NUL (so the value is walked) beside a byte that is not UTF-8.
    "json nul escape and bad utf-8": (JSON, b'"\\u0000\xff"', "invalid_message"),
}


@pytest.mark.parametrize(
    ("content_type", "raw", "code"), REGRESSION_VALUES.values(), ids=REGRESSION_VALUES.keys()
)
async def test_values_that_once_stopped_every_worker_are_dead_lettered_with_their_code(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    content_type: str,
    raw: bytes,
    code: str,
) -> None:
    worker = await start_worker()
    body = set_cmd(plugin_id, "k", "RAW")
    encode = msgspec.msgpack.encode if content_type == MSGPACK else msgspec.json.encode
    hostile = encode(body).replace(encode("RAW"), raw)
    await frames.publish_raw(
        amqp, prefix, f"cmd.{plugin_id}", hostile, content_type=content_type, correlation_id="x"
    )
    await sentinel(amqp, prefix, db, plugin_id)
    letters = await dead_letters(amqp, prefix, 1)
    assert letters["x"]["x-reject-code"] == code
    assert still_connected_once(worker)


# ------------------------------------------------------------------ AMQP properties

HOSTILE_PROPERTIES: dict[str, tuple[dict[str, Any], str | None]] = {
    # The value pamqp read as milliseconds and could not turn into a date (aiormq #186).
    "timestamp past the year 9999": ({"timestamp": frames.timestamp(2**63 - 1)}, None),
    "timestamp of a java client's negative time": (
        {"timestamp": frames.timestamp(2**64 - 5)},
        None,
    ),
    "content type that is not utf-8": (
        {"content_type": frames.short_string(b"application/\xff\xfe")},
        "invalid_message",
    ),
    "message id that is not utf-8": ({"message_id": frames.short_string(b"\xc3\x28")}, None),
    "headers nested 5000 deep": ({"headers": frames.deep_table(5000)}, "invalid_message"),
    "header key that is not utf-8": (
        {"headers": frames.table(b"\x02\xff\xfet\x01")},
        "invalid_message",
    ),
    "header timestamp past the year 9999": (
        {"headers": frames.table(b"\x01tT" + bytes(frames.timestamp(2**62)))},
        None,
    ),
    "unknown content encoding": ({"content_encoding": "br"}, None),
    "priority 255": ({"priority": 255}, None),
}


@pytest.mark.parametrize(
    ("properties", "code"), HOSTILE_PROPERTIES.values(), ids=HOSTILE_PROPERTIES.keys()
)
@pytest.mark.parametrize("path", ["cmd", "rpc"])
async def test_hostile_properties_never_close_the_workers_connection(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    properties: dict[str, Any],
    code: str | None,
    path: str,
) -> None:
    """Each arrives (as a write: applied, or dead-lettered with its code; as a read without
    reply_to: dead-lettered), and the worker goes on with its first connection."""
    worker = await start_worker()
    properties = {"correlation_id": "hostile", **properties}
    write = set_cmd(plugin_id, "k", 1)
    body = msgspec.json.encode(write if path == "cmd" else {"op": "get", **write})
    await frames.publish_raw(amqp, prefix, f"{path}.{plugin_id}", body, **properties)
    await sentinel(amqp, prefix, db, plugin_id)
    # A message whose properties are unreadable loses them all, its correlation id too.
    dead = 0 if code is None and path == "cmd" else 1
    letters = list((await dead_letters(amqp, prefix, dead)).values())
    if path == "rpc":
        # No reply_to: it cannot be answered, whatever else is wrong.
        assert [h["x-reject-code"] for h in letters] in (["invalid_request"], ["invalid_message"])
    elif code is None:
        await wait_until(lambda: applied(db, plugin_id, "k"), what="the write to be applied")
        assert letters == []
    else:
        assert [h["x-reject-code"] for h in letters] == [code]
    assert still_connected_once(worker)
    assert worker.consumer is not None and worker.consumer.consuming
    assert worker.rpc is not None and worker.rpc.consuming


async def test_bookkeeping_headers_a_publisher_forges_never_reach_the_dead_letter(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    forged = {
        "x-original-user-id": "the-host",
        "x-original-routing-key": "cmd.someone-else",
        "x-reject-code": "internal",
        "x-death": [{"reason": "expired", "queue": "elsewhere"}],
        "kept": "yes",
    }
    bad = {**set_cmd(plugin_id, "k", 1), "scope_kind": "galaxy"}
    await frames.publish_raw(
        amqp,
        prefix,
        f"cmd.{plugin_id}",
        msgspec.json.encode(bad),
        headers=forged,
        correlation_id="forged",
    )
    await sentinel(amqp, prefix, db, plugin_id)
    headers = (await dead_letters(amqp, prefix, 1))["forged"]
    assert headers["x-reject-code"] == "invalid_request"
    assert headers["x-original-user-id"] == helpers.PUBLISHER
    assert headers["x-original-routing-key"] == f"cmd.{plugin_id}"
    assert "x-death" not in headers
    assert headers["kept"] == "yes"


# ------------------------------------------------------------------------ reply_to


@pytest.fixture
async def victim(amqp: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    """A queue the caller has no business writing to."""
    return await amqp.declare_queue(f"pstest_victim_{uuid.uuid4().hex[:8]}", exclusive=True)


@pytest.mark.parametrize("path", ["cmd", "rpc"])
async def test_a_reply_to_that_is_not_the_callers_is_refused_and_nothing_is_sent_there(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    victim: aio_pika.abc.AbstractQueue,
    path: str,
) -> None:
    await start_worker()
    other_plugin = uuid.uuid4()
    foreign = [
        victim.name,
        f"{prefix}.reply.{other_plugin}.inbox",  # another plugin's own queue
        f"{prefix}.reply.{plugin_id}.",  # no name
        "amq.rabbitmq.reply-tox",
    ]
    for n, reply_to in enumerate(foreign):
        write = set_cmd(plugin_id, f"k{n}", n)
        body = write if path == "cmd" else {"op": "get", **write}
        await helpers.publish(
            amqp,
            prefix,
            plugin_id,
            body,
            kind=path,
            reply_to=reply_to,
            correlation_id=f"foreign-{n}",
        )
    await sentinel(amqp, prefix, db, plugin_id)
    letters = await dead_letters(amqp, prefix, len(foreign))
    for n in range(len(foreign)):
        assert letters[f"foreign-{n}"]["x-reject-code"] == "invalid_request"
        assert "reply_to" in str(letters[f"foreign-{n}"]["x-reject-reason"])
    assert await state_of(db, plugin_id) == {("issue", "ISS-1", "default", "sentinel"): True}
    victim_queue = await amqp.declare_queue(victim.name, passive=True)
    assert victim_queue.declaration_result.message_count == 0


async def test_a_reply_queue_of_the_callers_own_gets_its_answers(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    own = await amqp.declare_queue(
        Names(prefix).reply_queue_prefix(plugin_id) + "inbox", exclusive=True
    )
    write = set_cmd(plugin_id, "k", 1)
    await helpers.publish(amqp, prefix, plugin_id, write, reply_to=own.name, correlation_id="w")
    get = {**write, "op": "get", "after": write["id"]}
    await helpers.publish(
        amqp, prefix, plugin_id, get, kind="rpc", reply_to=own.name, correlation_id="r"
    )
    answers: dict[str, Any] = {}

    async def both_answered() -> bool:
        message = await own.get(fail=False, no_ack=True)
        if message is not None:
            answers[message.correlation_id or ""] = msgspec.json.decode(message.body)
        return len(answers) == 2

    await wait_until(both_answered, what="both answers in the caller's own queue")
    assert answers["w"]["outcome"] == "applied"
    assert answers["r"]["value"] == 1


async def test_a_forbidden_request_is_never_answered_in_a_named_reply_queue(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Any,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    # Strict mode without trusting the test's user: it may not act for the plugin.
    await start_worker(trusted_users=frozenset())
    own = await amqp.declare_queue(
        Names(prefix).reply_queue_prefix(plugin_id) + "inbox", exclusive=True
    )
    write = set_cmd(plugin_id, "k", 1)
    await helpers.publish(
        amqp, prefix, plugin_id, write, reply_to=own.name, correlation_id="forbidden-write"
    )
    await helpers.publish(
        amqp,
        prefix,
        plugin_id,
        {**write, "op": "get"},
        kind="rpc",
        reply_to=own.name,
        correlation_id="forbidden-read",
    )

    async def both_dead() -> bool:
        queue = await amqp.declare_queue(Names(prefix).dead, passive=True)
        return queue.declaration_result.message_count == 2

    await wait_until(both_dead, what="both requests dead-lettered")
    letters = await dead_letters(amqp, prefix, 2)
    assert {letters[k]["x-reject-code"] for k in ("forbidden-write", "forbidden-read")} == {
        "forbidden"
    }
    assert (await amqp.declare_queue(own.name, passive=True)).declaration_result.message_count == 0


# ------------------------------------------------------------------- deep values


@pytest.mark.parametrize("content_type", ENCODINGS)
async def test_a_value_as_deep_as_writes_accept_is_readable_by_every_read(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    settings: Any,
    content_type: str,
) -> None:
    await start_worker()
    deepest: Any = 1
    for _ in range(settings.value_max_depth):
        deepest = [deepest]
    write = set_cmd(plugin_id, "deep", deepest, write_id=uuid7())
    await helpers.publish(amqp, prefix, plugin_id, write, content_type=content_type)
    await wait_until(lambda: applied(db, plugin_id, "deep"), what="the deep value")
    ref = {"scope_kind": "issue", "scope_id": "ISS-1", "key": "deep"}
    async with RawRpc(settings.amqp_url, prefix) as rpc:
        plugin = str(plugin_id)
        got = await rpc.call(
            plugin_id, {"op": "get", "plugin_id": plugin, **ref}, content_type=content_type
        )
        many = await rpc.call(
            plugin_id,
            {"op": "get_many", "plugin_id": plugin, "entries": [ref, ref]},
            content_type=content_type,
        )
        page = await rpc.call(
            plugin_id, {"op": "list", "plugin_id": plugin}, content_type=content_type
        )
    assert got["value"] == deepest
    assert [item["value"] for item in many["items"]] == [deepest, deepest]
    assert page["items"][0]["value"] == deepest
