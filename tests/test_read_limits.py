"""The read path's bounds (protocol §3 and §4): replies within the reply limit, a request
that names one large entry a thousand times costs one reply's worth of memory, waiting reads
are few per plugin and wait no longer than their caller, and what can never arrive is not
waited for."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import msgspec
import pytest

from schemas.codec import JSON, MSGPACK
from worker.client import StateClient
from worker.config import Settings
from worker.reads import LIST_SCAN
from worker.topology import declare

from .conftest import StartWorker
from .helpers import get_request as get
from .helpers import set_cmd, uuid7, wait_until
from .processes import parts, peak_rss, spawn_worker
from .rpc import RawRpc

DAY_MS = 86_400_000


@pytest.fixture
async def rpc(settings: Settings) -> AsyncIterator[RawRpc]:
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:
        yield caller


async def write_all(rpc: RawRpc, plugin_id: uuid.UUID, *commands: dict[str, Any]) -> None:
    replies = await asyncio.gather(*(rpc.call(plugin_id, c, kind="cmd") for c in commands))
    assert all(r["type"] == "applied" for r in replies), replies


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
async def test_list_pages_end_early_to_stay_within_the_reply_limit(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID, content_type: str
) -> None:
    value_max = 10_000
    reply_max = 2 * value_max + 64 * 1024
    await start_worker(value_max_bytes=value_max, max_reply_bytes=reply_max)
    await write_all(
        rpc, plugin_id, *(set_cmd(plugin_id, f"k{n:02}", "x" * 9000) for n in range(30))
    )
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        future = await rpc.send(
            plugin_id,
            {"op": "list", "plugin_id": str(plugin_id), "limit": 1000, "cursor": cursor},
            content_type=content_type,
        )
        message = await asyncio.wait_for(future, 10)
        assert len(message.body) <= reply_max
        page = (msgspec.msgpack.decode if content_type == MSGPACK else msgspec.json.decode)(
            message.body
        )
        assert page["items"], "a page always has an item"
        seen += [item["key"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"k{n:02}" for n in range(30)]
    assert pages >= 3


async def test_a_get_many_larger_than_the_reply_limit_is_reply_too_large(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker(value_max_bytes=10_000, max_reply_bytes=2 * 10_000 + 64 * 1024)
    await write_all(rpc, plugin_id, *(set_cmd(plugin_id, f"k{n}", "x" * 9000) for n in range(10)))
    refs = [{"scope_kind": "issue", "scope_id": "ISS-1", "key": f"k{n}"} for n in range(10)]
    many = {"op": "get_many", "plugin_id": str(plugin_id), "entries": refs}
    reply = await rpc.call(plugin_id, many)
    assert reply["type"] == "error" and reply["code"] == "reply_too_large"
    fits = await rpc.call(plugin_id, {**many, "entries": refs[:3]})
    assert [item["found"] for item in fits["items"]] == [True] * 3


async def test_one_large_entry_named_a_thousand_times_costs_one_reply_not_a_gigabyte(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await declare(amqp, settings)
    worker = spawn_worker(settings)
    try:
        async with RawRpc(settings.amqp_url, settings.prefix) as rpc:
            big = "x" * (1024 * 1024 - 100)
            await wait_until(lambda: rpc.answering(plugin_id), what="the worker to serve reads")
            await write_all(rpc, plugin_id, set_cmd(plugin_id, "big", big))
            reader = parts(worker)["reads"]  # the process that answers (worker.supervisor)
            before = peak_rss(reader)
            ref = {"scope_kind": "issue", "scope_id": "ISS-1", "key": "big"}
            many = {"op": "get_many", "plugin_id": str(plugin_id), "entries": [ref] * 1000}
            replies = await asyncio.gather(*(rpc.call(plugin_id, many) for _ in range(20)))
            assert {r["code"] for r in replies} == {"reply_too_large"}
            one = await rpc.call(plugin_id, {**many, "entries": [ref] * 3})
            assert [i["value"] == big for i in one["items"]] == [True] * 3
            grown = peak_rss(reader) - before
    finally:
        worker.terminate()
        worker.wait(30)
    print(f"peak RSS grew by {grown / 1e6:.1f} MB answering 20 x 1000 x 1 MiB")
    assert grown < 100e6


async def test_only_so_many_reads_of_a_plugin_wait_and_other_plugins_are_not_held_up(
    start_worker: StartWorker,
    rpc: RawRpc,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    await start_worker(roles=frozenset({"reads"}), max_waiting_reads=5)
    other = uuid.uuid4()
    await db.execute("INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", other, str(other))
    # `after` names writes that never come (no worker applies writes here).
    waiting = [
        await rpc.send(plugin_id, get(plugin_id, f"k{n}", after=str(uuid7())), expiration=2.0)
        for n in range(20)
    ]
    started = time.monotonic()
    quick = [msgspec.json.decode((await asyncio.wait_for(f, 1.0)).body) for f in waiting[5:]]
    assert {r["code"] for r in quick} == {"write_pending"}
    assert all("already wait" in r["message"] for r in quick)
    assert await rpc.call(other, get(other, "k")) == {"type": "value", "found": False}
    assert time.monotonic() - started < 1.5
    held = [msgspec.json.decode((await asyncio.wait_for(f, 5.0)).body) for f in waiting[:5]]
    assert {r["code"] for r in held} == {"write_pending"}
    await db.execute("DELETE FROM plugins WHERE id = $1", other)


async def test_after_naming_a_write_no_one_can_have_made_is_invalid_request(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    future = uuid7(int(time.time() * 1000) + DAY_MS)
    for after in (str(future), str(uuid.uuid4())):  # too far ahead; not a UUIDv7
        reply = await rpc.call(plugin_id, get(plugin_id, "k", after=after))
        assert reply["type"] == "error" and reply["code"] == "invalid_request", reply


async def test_after_older_than_the_retention_is_answered_at_once(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    # Like a purged tombstone's id: whatever it was, it is not coming.
    await start_worker()
    ancient = uuid7(int(time.time() * 1000) - 8 * DAY_MS)
    started = time.monotonic()
    reply = await rpc.call(plugin_id, get(plugin_id, "k", after=str(ancient)))
    assert reply == {"type": "value", "found": False}
    assert time.monotonic() - started < 1.0


async def test_a_read_waits_no_longer_than_its_callers_own_deadline(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker(roles=frozenset({"reads"}))
    deadline_ms = int(time.time() * 1000) + 400
    started = time.monotonic()
    reply = await rpc.call(
        plugin_id,
        get(plugin_id, "k", after=str(uuid7())),
        headers={"x-deadline": deadline_ms},
    )
    assert reply["code"] == "write_pending"
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    "position",
    [
        ["issue", "ISS\x00", "default", "k"],  # a NUL Postgres would choke on
        ["galaxy", "x", "default", "k"],
        ["issue", "x" * 501, "default", "k"],
        ["issue", "x", "", "k"],
    ],
    ids=["nul", "unknown-kind", "too-long", "empty-namespace"],
)
async def test_a_cursor_no_server_issued_is_invalid_request(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID, position: list[str]
) -> None:
    await start_worker()
    cursor = base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")
    reply = await rpc.call(plugin_id, {"op": "list", "plugin_id": str(plugin_id), "cursor": cursor})
    assert reply["type"] == "error" and reply["code"] == "invalid_request", reply


async def test_names_too_long_together_for_the_index_are_invalid_request(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    name = "\U0001f600" * 500  # 2000 bytes of UTF-8 each
    write = set_cmd(plugin_id, name, 1, scope_id=name, namespace=name)
    reply = await rpc.call(plugin_id, write, kind="cmd")
    assert reply["type"] == "error" and reply["code"] == "invalid_request"
    assert "bytes of UTF-8 together" in reply["message"]


async def many_entries_and_a_few_rare(db: asyncpg.Pool, plugin_id: uuid.UUID) -> list[str]:
    """Three scan windows' worth of a plugin's entries, and five in a namespace of their own
    at the end of the list order (their keys, in that order)."""
    await db.execute(
        """
        INSERT INTO plugin_state (plugin_id, scope_kind, scope_id, namespace, state_key,
                                  value_json, version, value_bytes)
        SELECT $1::uuid, 'issue', 'ISS-' || lpad(n::text, 5, '0'), 'default', 'k', to_jsonb(n),
               $2::uuid, 1
        FROM generate_series(1, $3) n
        UNION ALL
        SELECT $1::uuid, 'project', 'P-1', 'rare', 'r' || n, to_jsonb(n), $2::uuid, 1
        FROM generate_series(1, 5) n
        """,
        plugin_id,
        uuid7(),
        3 * LIST_SCAN,
    )
    return [f"r{n}" for n in range(1, 6)]


async def test_a_list_filter_that_matches_little_reads_a_bounded_window_per_page(
    start_worker: StartWorker, rpc: RawRpc, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    rare = await many_entries_and_a_few_rare(db, plugin_id)
    seen: list[str] = []
    pages: list[int] = []
    cursor = None
    while True:
        request = {"op": "list", "plugin_id": str(plugin_id), "namespace": "rare", "limit": 2}
        page = await rpc.call(plugin_id, {**request, "cursor": cursor}, timeout=10)
        assert page["type"] == "page", page
        pages.append(len(page["items"]))
        seen += [item["key"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == rare
    # Each of the three windows before the rare entries answers an empty page that goes on
    # after what it read; then the rare ones, two a page.
    assert pages == [0, 0, 0, 2, 2, 1]


async def test_the_client_lists_through_empty_pages_to_the_end(
    start_worker: StartWorker, settings: Settings, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    rare = await many_entries_and_a_few_rare(db, plugin_id)
    async with StateClient(settings.amqp_url, plugin_id, prefix=settings.prefix) as client:
        listed = [entry async for entry in client.list(namespace="rare", page_size=100)]
    assert [entry.key for entry in listed] == rare
