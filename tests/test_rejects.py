"""Bad input is dead-lettered with its code and reason; the good messages around it are
applied, and callers that asked for a reply get one after commit."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import msgspec

from schemas.codec import JSON, MSGPACK
from worker.config import Settings
from worker.topology import Names

from . import helpers
from .broker import rabbitmqctl, require_rabbitmqctl
from .conftest import StartWorker
from .helpers import queue_messages, set_cmd, state_of, uuid7, wait_until

DAY_MS = 86_400_000
UNKNOWN_PLUGIN = uuid.uuid4()
OTHER_PLUGIN = uuid.uuid4()


async def publish_labelled(
    channel: aio_pika.abc.AbstractChannel,
    prefix: str,
    routing_plugin: uuid.UUID,
    label: str,
    body: bytes,
    content_type: str | None = JSON,
    reply_to: str | None = None,
) -> None:
    exchange = await channel.get_exchange(prefix, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body,
            content_type=content_type,
            correlation_id=label,
            reply_to=reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=helpers.PUBLISHER,
        ),
        routing_key=f"cmd.{routing_plugin}",
    )


def bad_inputs(plugin_id: uuid.UUID) -> list[tuple[str, bytes, str | None, str]]:
    """(label, body, content_type, expected code)."""
    now = int(time.time() * 1000)
    good = set_cmd(plugin_id, "k", 1)

    def js(**changes: Any) -> bytes:
        return msgspec.json.encode({**good, "id": str(uuid7()), **changes})

    def mp(**changes: Any) -> bytes:
        return msgspec.msgpack.encode({**good, "id": str(uuid7()), **changes})

    return [
        ("garbage", b"\x00\xff not json at all", JSON, "invalid_message"),
        ("not-object", b"[1, 2, 3]", JSON, "invalid_message"),
        ("unknown-op", js(op="upsert"), JSON, "invalid_message"),
        ("read-op-on-write-path", js(op="get"), JSON, "invalid_message"),
        ("content-type", js(), "text/plain", "invalid_message"),
        (
            "missing-key",
            msgspec.json.encode({k: v for k, v in good.items() if k != "key"}),
            JSON,
            "invalid_request",
        ),
        ("reserved-key", js(key="__proto__"), JSON, "invalid_request"),
        ("not-v7", js(id=str(uuid.uuid4())), JSON, "invalid_request"),
        ("future-id", js(id=str(uuid7(now + 3_600_000))), JSON, "invalid_request"),
        ("stale-id", js(id=str(uuid7(now - 8 * DAY_MS))), JSON, "stale"),
        ("nul-in-value", js(value={"a": "x\u0000y"}), JSON, "unsupported_value"),
        ("nan-msgpack", mp(value=[float("nan")]), MSGPACK, "unsupported_value"),
        ("infinity-msgpack", mp(value={"x": float("-inf")}), MSGPACK, "unsupported_value"),
        # msgspec, like most strict parsers, refuses an unpaired surrogate escape.
        (
            "lone-surrogate",
            js(value=None).replace(b'"value":null', b'"value":"\\ud800"'),
            JSON,
            "invalid_message",
        ),
        ("too-large", js(value="x" * 2000), JSON, "value_too_large"),
        ("unknown-plugin", js(plugin_id=str(UNKNOWN_PLUGIN)), JSON, "unknown_plugin"),
        ("routed-to-another-plugin", js(plugin_id=str(OTHER_PLUGIN)), JSON, "forbidden"),
        (
            "invalid-batch",
            msgspec.json.encode(
                {
                    "op": "batch",
                    "id": str(uuid7()),
                    "plugin_id": str(plugin_id),
                    "ops": [
                        {
                            "op": "set",
                            "scope_kind": "issue",
                            "scope_id": "ISS-1",
                            "key": "b1",
                            "value": 1,
                        },
                        {
                            "op": "set",
                            "scope_kind": "issue",
                            "scope_id": None,
                            "key": "b2",
                            "value": 2,
                        },
                    ],
                }
            ),
            JSON,
            "invalid_request",
        ),
        (
            "empty-batch",
            msgspec.json.encode(
                {"op": "batch", "id": str(uuid7()), "plugin_id": str(plugin_id), "ops": []}
            ),
            JSON,
            "invalid_request",
        ),
    ]


async def test_each_bad_input_is_dead_lettered_with_its_code_and_the_rest_applied(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    # A long batch wait puts the good and the bad messages into the same batches.
    worker = await start_worker(value_max_bytes=1000, batch_wait_ms=200)
    cases = bad_inputs(plugin_id)
    expected: dict[tuple[Any, ...], Any] = {}
    for n, (label, body, content_type, _) in enumerate(cases):
        good = set_cmd(plugin_id, f"good{n}", {"n": n})
        expected[("issue", "ISS-1", "default", f"good{n}")] = {"n": n}
        await publish_labelled(amqp, prefix, plugin_id, f"good{n}", msgspec.json.encode(good))
        # The unknown plugin's command is routed to its own id; every other to the test's.
        route = UNKNOWN_PLUGIN if label == "unknown-plugin" else plugin_id
        await publish_labelled(amqp, prefix, route, label, body, content_type)
    await publish_labelled(
        amqp,
        prefix,
        plugin_id,
        "good-msgpack",
        msgspec.msgpack.encode(set_cmd(plugin_id, "mp", [1, "two", None])),
        MSGPACK,
    )
    expected[("issue", "ISS-1", "default", "mp")] = [1, "two", None]

    async def all_applied() -> bool:
        return await state_of(db, plugin_id) == expected

    await wait_until(all_applied, what="every good message to be applied")
    dead_name = Names(prefix).dead

    async def all_dead() -> bool:
        queue = await amqp.declare_queue(dead_name, passive=True)
        return queue.declaration_result.message_count == len(cases)

    await wait_until(all_dead, what="every bad message to be dead-lettered")
    dead = {m.correlation_id: m for m in await queue_messages(amqp, dead_name)}
    for label, body, content_type, code in cases:
        message = dead[label]
        headers = message.headers or {}
        assert headers["x-reject-code"] == code, (label, headers)
        assert headers["x-reject-reason"], label
        assert str(headers["x-original-routing-key"]).startswith("cmd.")
        assert message.body == body, "the dead letter keeps the original body"
        assert message.content_type == content_type
    assert worker.metrics.value("plugin_state_writes_total", outcome="rejected") == len(cases)
    assert worker.metrics.value("plugin_state_writes_total", outcome="applied") == len(cases) + 1


async def test_writes_with_reply_to_get_applied_superseded_or_error_after_commit(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    # A reply queue of the caller's own, named as protocol §3 requires.
    own = Names(prefix).reply_queue_prefix(plugin_id) + "replies"
    replies = await amqp.declare_queue(own, exclusive=True)
    newer, older = uuid7(), None
    first = set_cmd(plugin_id, "k", "new", write_id=newer)
    older_id = uuid7(int(time.time() * 1000) - 60_000)
    older = set_cmd(plugin_id, "k", "old", write_id=older_id)
    got: dict[str, Any] = {}

    async def send(*labelled: tuple[str, dict[str, Any], str]) -> None:
        for label, command, content_type in labelled:
            encode = msgspec.msgpack.encode if content_type == MSGPACK else msgspec.json.encode
            body = encode(command)
            await publish_labelled(amqp, prefix, plugin_id, label, body, content_type, replies.name)
        async with replies.iterator(timeout=30) as messages:
            async for message in messages:
                async with message.process():
                    decode = (
                        msgspec.msgpack.decode
                        if message.content_type == MSGPACK
                        else msgspec.json.decode
                    )
                    got[message.correlation_id or ""] = decode(message.body)
                if all(label in got for label, *_ in labelled):
                    break

    await send(("first", first, JSON), ("duplicate", first, JSON))
    # Only once the newer write is in: one plugin's batches may commit in any order, and an
    # older write committed first is applied (then superseded), not superseded on arrival.
    await send(("older", older, MSGPACK), ("bad", {**first, "scope_kind": "galaxy"}, JSON))
    # The two copies of one write may land in two batches applied at once (the consumer
    # applies up to PLUGIN_STATE_APPLY_CONCURRENCY): whichever commits first is applied.
    copies = [got["first"], got["duplicate"]]
    assert {(c["type"], c["id"]) for c in copies} == {("applied", str(newer))}
    assert sorted(c["outcome"] for c in copies) == ["applied", "superseded"]
    assert got["older"] == {"type": "applied", "id": str(older_id), "outcome": "superseded"}
    assert got["bad"]["type"] == "error" and got["bad"]["code"] == "invalid_request"
    assert await state_of(db, plugin_id) == {("issue", "ISS-1", "default", "k"): "new"}


async def test_a_reject_whose_dead_letter_fails_is_not_lost_to_the_next_batchs_ack(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    require_rabbitmqctl()
    worker = await start_worker()
    names = Names(prefix)
    # The dead-letter exchange goes away: every dead letter's publish now fails.
    await amqp.exchange_delete(names.dead)
    bad = {**set_cmd(plugin_id, "bad", 1), "scope_kind": "galaxy"}
    await publish_labelled(amqp, prefix, plugin_id, "bad", msgspec.json.encode(bad), JSON, None)
    for n in range(20):  # later batches, whose multiple acks once covered the reject
        await helpers.publish(amqp, prefix, plugin_id, set_cmd(plugin_id, f"good-{n}", n))

    async def good_applied() -> bool:
        return len(await state_of(db, plugin_id)) == 20

    await wait_until(good_applied, what="the good writes")
    # Back: the reject comes round again and now reaches the dead-letter queue. Not while
    # the exchange is back but its queue not yet bound to it: a dead letter published then
    # would be routed nowhere. So the worker takes no deliveries meanwhile, and the reject
    # waits in the queue, held by nobody.
    assert worker.consumer is not None
    await worker.consumer.subscription.hold("test")

    async def reject_waiting() -> bool:
        listing = await rabbitmqctl(
            "list_queues", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged"
        )
        return f"{names.commands_queue}\t1\t0" in listing.splitlines()

    await wait_until(reject_waiting, what="the reject back in the queue, unheld")
    dead_exchange = await amqp.declare_exchange(
        names.dead, aio_pika.ExchangeType.FANOUT, durable=True
    )
    # The queue is still there (only its exchange went): bound again, as a worker would.
    dead = await amqp.declare_queue(names.dead, passive=True)
    await dead.bind(dead_exchange)
    await worker.consumer.subscription.release("test")

    async def dead_lettered() -> bool:
        queue = await amqp.declare_queue(names.dead, passive=True)
        return bool(queue.declaration_result.message_count == 1)

    await wait_until(dead_lettered, what="the reject in the dead-letter queue")
    (letter,) = await queue_messages(amqp, names.dead)
    assert letter.correlation_id == "bad"
    assert (letter.headers or {})["x-reject-code"] == "invalid_request"
