"""The read path against the real services: every op, every error, both encodings,
read-your-writes across workers, expiry, and list paging under concurrent writes."""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import pytest

from schemas.codec import JSON, MSGPACK
from worker.config import Settings
from worker.topology import Names, declare

from .conftest import StartWorker
from .helpers import delete_cmd, publish, queue_messages, set_cmd, uuid7, wait_until
from .helpers import get_request as get
from .processes import spawn_worker
from .rpc import RawRpc

ENCODINGS = [JSON, MSGPACK]


@pytest.fixture
async def rpc(settings: Settings) -> AsyncIterator[RawRpc]:
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:
        yield caller


async def write_and_wait(
    amqp: aio_pika.abc.AbstractChannel,
    prefix: str,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
    *commands: dict[str, Any],
) -> None:
    for command in commands:
        await publish(amqp, prefix, plugin_id, command)
    # Each entry's last write: batches may commit in any order.
    last = {
        (c.get("scope_kind"), c.get("scope_id"), c["key"]): uuid.UUID(c["id"]) for c in commands
    }

    async def applied() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1 AND version=ANY($2)",
            plugin_id,
            list(last.values()),
        )
        return bool(count == len(last))

    await wait_until(applied, what="the writes to be applied")


@pytest.mark.parametrize("content_type", ENCODINGS)
async def test_get_tells_a_missing_entry_from_a_stored_null(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    content_type: str,
) -> None:
    await start_worker()
    null_write = set_cmd(plugin_id, "null", None)
    value_write = set_cmd(plugin_id, "value", {"page": 3, "tags": ["a", "b"]})
    await write_and_wait(amqp, prefix, plugin_id, db, null_write, value_write)

    missing = await rpc.call(plugin_id, get(plugin_id, "nothing"), content_type=content_type)
    assert missing == {"type": "value", "found": False}
    null = await rpc.call(plugin_id, get(plugin_id, "null"), content_type=content_type)
    assert null["found"] is True and null["value"] is None
    assert null["version"] == null_write["id"]
    value = await rpc.call(plugin_id, get(plugin_id, "value"), content_type=content_type)
    assert value["value"] == {"page": 3, "tags": ["a", "b"]}
    assert value["version"] == value_write["id"]
    assert datetime.fromisoformat(value["updated_at"]).tzinfo is not None


@pytest.mark.parametrize("content_type", ENCODINGS)
async def test_get_many_answers_one_value_per_entry_in_order(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    content_type: str,
) -> None:
    await start_worker()
    await write_and_wait(
        amqp,
        prefix,
        plugin_id,
        db,
        set_cmd(plugin_id, "a", 1),
        set_cmd(plugin_id, "token", "t", scope_kind="instance", scope_id=None),
    )
    reply = await rpc.call(
        plugin_id,
        {
            "op": "get_many",
            "plugin_id": str(plugin_id),
            "entries": [
                {"scope_kind": "instance", "key": "token"},
                {"scope_kind": "issue", "scope_id": "ISS-1", "key": "missing"},
                {"scope_kind": "issue", "scope_id": "ISS-1", "key": "a"},
            ],
        },
        content_type=content_type,
    )
    assert reply["type"] == "values"
    assert [(i["found"], i.get("value")) for i in reply["items"]] == [
        (True, "t"),
        (False, None),
        (True, 1),
    ]


@pytest.mark.parametrize("content_type", ENCODINGS)
async def test_list_pages_in_scope_order_with_filters_and_a_cursor(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
    content_type: str,
) -> None:
    await start_worker()
    commands = [set_cmd(plugin_id, f"k{n}", n, scope_id=f"S{n % 3}") for n in range(10)]
    commands += [
        set_cmd(plugin_id, "tok", "x", scope_kind="instance", scope_id=None),
        set_cmd(plugin_id, "other", 0, namespace="ns2"),
    ]
    await write_and_wait(amqp, prefix, plugin_id, db, *commands)

    async def all_pages(**filters: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = await rpc.call(
                plugin_id,
                {
                    "op": "list",
                    "plugin_id": str(plugin_id),
                    "limit": 4,
                    "cursor": cursor,
                    **filters,
                },
                content_type=content_type,
            )
            assert page["type"] == "page" and len(page["items"]) <= 4
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items

    everything = await all_pages()
    order = [(i["scope_kind"], i["scope_id"] or "", i["namespace"], i["key"]) for i in everything]
    assert order == sorted(order) and len(order) == 12
    assert everything[0]["scope_kind"] == "instance" and everything[0]["scope_id"] is None
    assert {"value", "version", "updated_at"} <= set(everything[0])
    issue_s1 = await all_pages(scope_kind="issue", scope_id="S1")
    assert sorted(i["key"] for i in issue_s1) == ["k1", "k4", "k7"]
    assert [i["key"] for i in await all_pages(namespace="ns2")] == ["other"]
    assert {i["key"] for i in await all_pages(prefix="k")} == {f"k{n}" for n in range(10)}
    last = await rpc.call(
        plugin_id,
        {"op": "list", "plugin_id": str(plugin_id), "limit": 1000},
        content_type=content_type,
    )
    assert len(last["items"]) == 12 and last["next_cursor"] is None


@pytest.mark.parametrize("content_type", ENCODINGS)
@pytest.mark.parametrize(
    ("request_body", "code"),
    [
        (b"\xc1 not a body", "invalid_message"),
        ({"op": "set"}, "invalid_message"),
        (
            {"op": "get", "plugin_id": None, "scope_kind": "issue", "scope_id": "X", "key": "k"},
            "invalid_request",
        ),
        (
            {
                "op": "get",
                "plugin_id": "not-a-uuid",
                "scope_kind": "issue",
                "scope_id": "X",
                "key": "k",
            },
            "invalid_request",
        ),
        ({"op": "get", "scope_kind": "issue", "key": "k"}, "invalid_request"),
        ({"op": "get", "scope_kind": "galaxy", "scope_id": "X", "key": "k"}, "invalid_request"),
        (
            {"op": "get", "scope_kind": "issue", "scope_id": "X", "key": "constructor"},
            "invalid_request",
        ),
        (
            {
                "op": "get_many",
                "entries": [{"scope_kind": "instance", "scope_id": "x", "key": "k"}],
            },
            "invalid_request",
        ),
        ({"op": "list", "limit": 1001}, "invalid_request"),
        ({"op": "list", "limit": 0}, "invalid_request"),
        ({"op": "list", "cursor": "not-a-cursor"}, "invalid_request"),
        (
            {"op": "get", "scope_kind": "issue", "scope_id": "X", "key": "k", "after": "nope"},
            "invalid_request",
        ),
    ],
)
async def test_invalid_requests_get_an_error_reply_with_their_code(
    start_worker: StartWorker,
    rpc: RawRpc,
    plugin_id: uuid.UUID,
    content_type: str,
    request_body: dict[str, Any] | bytes,
    code: str,
) -> None:
    await start_worker()
    body = request_body
    if isinstance(body, dict):
        body = {"plugin_id": str(plugin_id), **body}  # a case's own plugin_id wins
    reply = await rpc.call(plugin_id, body, content_type=content_type)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]


async def test_reads_of_an_unknown_plugin_are_refused(
    start_worker: StartWorker, rpc: RawRpc
) -> None:
    await start_worker()
    stranger = uuid.uuid4()
    for body in (get(stranger, "k"), {"op": "list", "plugin_id": str(stranger)}):
        reply = await rpc.call(stranger, body)
        assert reply["code"] == "unknown_plugin"


async def test_unsupported_content_type_is_answered_in_json(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    reply = await rpc.call(plugin_id, get(plugin_id, "k"), content_type="text/csv")
    assert reply["code"] == "invalid_message"


async def test_a_request_without_reply_to_is_dead_lettered_as_invalid_request(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    await rpc.send(plugin_id, get(plugin_id, "k"), reply=False)
    dead_name = Names(prefix).dead

    async def dead() -> bool:
        queue = await amqp.declare_queue(dead_name, passive=True)
        return bool(queue.declaration_result.message_count)

    await wait_until(dead, what="the request to be dead-lettered")
    [message] = await queue_messages(amqp, dead_name)
    assert (message.headers or {})["x-reject-code"] == "invalid_request"
    assert (message.headers or {})["x-original-routing-key"] == f"rpc.{plugin_id}"


async def test_get_after_a_write_held_back_answers_write_pending_at_the_deadline(
    start_worker: StartWorker,
    rpc: RawRpc,
    plugin_id: uuid.UUID,
) -> None:
    # Only reads are served: the write named by `after` is never applied.
    worker = await start_worker(roles=frozenset({"reads"}))
    started = time.monotonic()
    reply = await rpc.call(plugin_id, get(plugin_id, "k", after=str(uuid7())), expiration=1.0)
    waited = time.monotonic() - started
    assert reply["type"] == "error" and reply["code"] == "write_pending"
    assert 0.9 <= waited < 4, waited
    assert worker.metrics.value("plugin_state_rpc_waiting") == 0


async def test_a_request_that_expired_before_it_was_taken_is_never_answered(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    settings: Settings,
) -> None:
    await declare(amqp, settings)
    expired = await rpc.send(plugin_id, get(plugin_id, "k"), expiration=0.05)
    await asyncio.sleep(0.2)  # let it expire while no worker serves reads
    await start_worker()
    fresh = await rpc.call(plugin_id, get(plugin_id, "k"))
    assert fresh == {"type": "value", "found": False}
    await asyncio.sleep(0.3)
    assert not expired.done()


async def test_get_after_waits_for_the_write_and_sees_it(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker(batch_wait_ms=300)  # the write sits in a filling batch for a while
    write = set_cmd(plugin_id, "k", "fresh")
    await publish(amqp, prefix, plugin_id, write)
    reply = await rpc.call(plugin_id, get(plugin_id, "k", after=write["id"]))
    assert reply["found"] is True and reply["value"] == "fresh"
    deleted = delete_cmd(plugin_id, "k")
    await publish(amqp, prefix, plugin_id, deleted)
    reply = await rpc.call(plugin_id, get(plugin_id, "k", after=deleted["id"]))
    assert reply == {"type": "value", "found": False}


async def test_read_your_writes_when_one_process_applies_and_another_serves_the_read(
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    writer = spawn_worker(settings, roles="writes", batch_wait_ms="50")
    reader = spawn_worker(settings, roles="reads")
    try:
        assert (await rpc.call(plugin_id, get(plugin_id, "warm-up"), timeout=30))["type"] == "value"
        for n in range(20):
            write = set_cmd(plugin_id, "counter", n)
            await publish(amqp, prefix, plugin_id, write)
            reply = await rpc.call(plugin_id, get(plugin_id, "counter", after=write["id"]))
            assert reply["found"] and reply["value"] == n, reply
    finally:
        for process in (writer, reader):
            process.send_signal(signal.SIGTERM)
        for process in (writer, reader):
            assert await asyncio.to_thread(process.wait, 30) == 0


async def test_list_paging_under_concurrent_writes_returns_each_stable_entry_exactly_once(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    stable = [set_cmd(plugin_id, f"stable-{n:03d}", n, scope_id=f"S{n % 5}") for n in range(150)]
    churn = [set_cmd(plugin_id, f"churn-{n:03d}", n, scope_id=f"S{n % 5}") for n in range(150)]
    await write_and_wait(amqp, prefix, plugin_id, db, *stable, *churn)
    rng = random.Random(7)

    async def keep_writing(stop: asyncio.Event) -> None:
        n = 1000
        while not stop.is_set():
            victim = rng.choice(churn)
            await publish(
                amqp,
                prefix,
                plugin_id,
                delete_cmd(plugin_id, victim["key"], scope_id=victim["scope_id"]),
            )
            await publish(
                amqp, prefix, plugin_id, set_cmd(plugin_id, f"new-{n}", n, scope_id=f"S{n % 5}")
            )
            n += 1
            await asyncio.sleep(0.002)

    stop = asyncio.Event()
    writing = asyncio.create_task(keep_writing(stop))
    seen: list[tuple[str, str]] = []
    cursor = None
    try:
        while True:
            page = await rpc.call(
                plugin_id, {"op": "list", "plugin_id": str(plugin_id), "limit": 7, "cursor": cursor}
            )
            seen += [(i["scope_id"], i["key"]) for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        await writing
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    listed_stable = [key for _, key in seen if key.startswith("stable-")]
    assert sorted(listed_stable) == sorted(c["key"] for c in stable)
