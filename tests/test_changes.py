"""The change log read over RPC (protocol §8): positions for sets, deletes and expiries, the
filters and pages of ``list``, long polls answered within milliseconds of a commit, the
errors (``compacted``, a position ahead of the log, a bad position, a log turned off)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from worker.config import Settings
from worker.store import Store

from .conftest import StartWorker
from .helpers import delete_cmd, set_cmd, uuid7, wait_until
from .rpc import RawRpc


def changes(plugin_id: uuid.UUID, since: str | None, **fields: Any) -> dict[str, Any]:
    return {"op": "changes", "plugin_id": str(plugin_id), "since": since, **fields}


async def applied(rpc: RawRpc, plugin_id: uuid.UUID, command: dict[str, Any]) -> None:
    reply = await rpc.call(plugin_id, command, kind="cmd")
    assert reply["type"] == "applied", reply


@pytest.fixture
async def rpc(settings: Settings) -> Any:
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:
        yield caller


async def test_a_reader_from_the_end_sees_every_change_after_it_in_order(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    start = await rpc.call(plugin_id, changes(plugin_id, None))
    assert start["type"] == "changes" and start["items"] == []
    first, second, gone = uuid7(), uuid7(), uuid7()
    await applied(rpc, plugin_id, set_cmd(plugin_id, "a", {"n": 1}, write_id=first))
    await applied(rpc, plugin_id, set_cmd(plugin_id, "b", [1, 2], write_id=second))
    await applied(rpc, plugin_id, delete_cmd(plugin_id, "a", write_id=gone))

    page = await rpc.call(plugin_id, changes(plugin_id, start["next"]))
    # Compacted: "a" is told once, as its newest change, at its newest position.
    assert [(i["key"], i["change"], i["version"]) for i in page["items"]] == [
        ("b", "set", str(second)),
        ("a", "delete", str(gone)),
    ]
    assert page["items"][0]["value"] == [1, 2] and "value" not in page["items"][1]
    positions = [int(i["position"]) for i in page["items"]]
    assert positions == sorted(positions) and int(page["next"]) == positions[-1]
    again = await rpc.call(plugin_id, changes(plugin_id, page["next"]))
    assert again["items"] == [] and again["next"] == page["next"]


async def test_pages_filters_and_limits_follow_list(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    for n in range(7):
        await applied(
            rpc, plugin_id, set_cmd(plugin_id, f"k{n}", n, namespace="even" if n % 2 else "odd")
        )
    await applied(rpc, plugin_id, set_cmd(plugin_id, "x", 0, scope_kind="instance", scope_id=None))

    seen: list[str] = []
    since = start
    while True:
        page = await rpc.call(plugin_id, changes(plugin_id, since, limit=3))
        assert len(page["items"]) <= 3
        seen += [i["key"] for i in page["items"]]
        if not page["items"]:
            break
        since = page["next"]
    assert seen == [f"k{n}" for n in range(7)] + ["x"]

    odd = await rpc.call(plugin_id, changes(plugin_id, start, namespace="odd"))
    assert [i["key"] for i in odd["items"]] == ["k0", "k2", "k4", "k6"]
    instance = await rpc.call(plugin_id, changes(plugin_id, start, scope_kind="instance"))
    assert [i["key"] for i in instance["items"]] == ["x"]
    assert instance["items"][0]["scope_id"] is None
    prefixed = await rpc.call(plugin_id, changes(plugin_id, start, prefix="k5"))
    assert [i["key"] for i in prefixed["items"]] == ["k5"]
    # A filtered page that found nothing still moves on, to the end of the log.
    none = await rpc.call(plugin_id, changes(plugin_id, start, namespace="nothing"))
    assert none["items"] == [] and none["next"] == page["next"]


async def test_a_long_poll_is_answered_within_milliseconds_of_a_commit(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    await start_worker()  # the commit may be the other worker's: a notice wakes the waiter
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    waiting = await rpc.send(plugin_id, changes(plugin_id, start, wait_ms=20_000))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    began = time.monotonic()
    await applied(rpc, plugin_id, set_cmd(plugin_id, "k", 1))
    message = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - began < 2.0
    reply = msgspec.json.decode(message.body)
    assert [i["key"] for i in reply["items"]] == ["k"]


async def test_a_long_poll_with_nothing_new_ends_empty_at_its_wait(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    began = time.monotonic()
    reply = await rpc.call(plugin_id, changes(plugin_id, start, wait_ms=600))
    assert 0.5 < time.monotonic() - began < 3.0
    assert reply == {"type": "changes", "next": start, "items": []}


async def test_expiries_are_changes_with_the_version_whose_ttl_ran_out(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker(expiry_interval_seconds=0.2)
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    write = uuid7()
    await applied(rpc, plugin_id, {**set_cmd(plugin_id, "lease", 1, write_id=write), "ttl_ms": 300})

    async def expired() -> bool:
        page = await rpc.call(plugin_id, changes(plugin_id, start))
        return [i["change"] for i in page["items"]] == ["expire"]

    await wait_until(expired, timeout=10, what="the expiry in the log")
    page = await rpc.call(plugin_id, changes(plugin_id, start))
    assert page["items"][0]["version"] == str(write)
    assert "expires_at" in page["items"][0] and "value" not in page["items"][0]


async def test_a_position_older_than_the_retention_kept_is_answered_compacted(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID, db: asyncpg.Pool
) -> None:
    await start_worker()
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    old = uuid7(int(time.time() * 1000) - 10_000)
    await applied(rpc, plugin_id, set_cmd(plugin_id, "k", 1, write_id=old))
    await applied(rpc, plugin_id, delete_cmd(plugin_id, "k", write_id=uuid7()))
    latest = (await rpc.call(plugin_id, changes(plugin_id, start)))["next"]
    assert (await Store(db).purge_tombstones(0, 100_000) or 0) >= 1

    reply = await rpc.call(plugin_id, changes(plugin_id, start))
    assert reply["type"] == "error" and reply["code"] == "compacted", reply
    # From the purge's position on, the log reads on.
    reply = await rpc.call(plugin_id, changes(plugin_id, latest))
    assert reply["type"] == "changes"


@pytest.mark.parametrize(
    ("since", "fields"),
    [
        ("not-a-position", {}),
        ("-1", {}),
        ("1" * 30, {}),
        ("999999999", {}),  # ahead of the log
        (None, {"wait_ms": 30_001}),
        (None, {"limit": 0}),
        (None, {"limit": 1001}),
        (None, {"scope_kind": "instance", "scope_id": "x"}),
    ],
)
async def test_bad_reads_of_the_log_are_invalid_requests(
    start_worker: StartWorker,
    rpc: RawRpc,
    plugin_id: uuid.UUID,
    since: str | None,
    fields: dict[str, Any],
) -> None:
    await start_worker()
    reply = await rpc.call(plugin_id, changes(plugin_id, since, **fields))
    assert reply["type"] == "error" and reply["code"] == "invalid_request", reply


async def test_a_plugin_reads_only_its_own_log(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    stranger = uuid.uuid4()
    reply = await rpc.call(plugin_id, changes(stranger, None))
    assert reply["type"] == "error" and reply["code"] in {"forbidden", "invalid_request"}


async def test_with_the_log_off_changes_is_refused_and_writes_carry_no_positions(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID, db: asyncpg.Pool
) -> None:
    await start_worker(changes=False)
    reply = await rpc.call(plugin_id, changes(plugin_id, None))
    assert reply["type"] == "error" and reply["code"] == "invalid_request"
    await applied(rpc, plugin_id, set_cmd(plugin_id, "k", 1))
    row = await db.fetchrow(
        "SELECT position FROM plugin_state_versions WHERE plugin_id = $1", plugin_id
    )
    assert row is not None and row["position"] is None
    assert (
        await db.fetchval("SELECT count(*) FROM plugin_state_feed WHERE plugin_id = $1", plugin_id)
        == 0
    )


async def test_a_page_holds_values_up_to_the_reply_limit_and_moves_on_after_them(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker(max_reply_bytes=2 * 1024 * 1024 + 64 * 1024, value_max_bytes=1024 * 1024)
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    big = "x" * (900 * 1024)
    for n in range(4):
        await applied(rpc, plugin_id, set_cmd(plugin_id, f"big{n}", big))
    keys: list[str] = []
    since = start
    while True:
        page = await rpc.call(plugin_id, changes(plugin_id, since, limit=100), timeout=20)
        assert page["type"] == "changes", page
        if not page["items"]:
            break
        assert len(page["items"]) <= 2
        assert all(i["value"] == big for i in page["items"])
        keys += [i["key"] for i in page["items"]]
        since = page["next"]
    assert keys == [f"big{n}" for n in range(4)]


async def test_long_polls_waiting_do_not_use_up_the_prefetch_other_reads_need(
    start_worker: StartWorker, rpc: RawRpc, plugin_id: uuid.UUID
) -> None:
    await start_worker(rpc_prefetch=8)
    start = (await rpc.call(plugin_id, changes(plugin_id, None)))["next"]
    polls = [
        await rpc.send(plugin_id, changes(plugin_id, start, wait_ms=20_000)) for _ in range(30)
    ]
    await asyncio.sleep(0.5)
    assert not any(poll.done() for poll in polls)
    # Thirty waiting reads, a prefetch of eight: a plain read is still served (it would
    # wait for the long polls' twenty seconds if they held the prefetch).
    reply = await rpc.call(plugin_id, {**changes(plugin_id, None)}, timeout=5)
    assert reply["type"] == "changes"
    await applied(rpc, plugin_id, set_cmd(plugin_id, "k", 1))
    answered = await asyncio.wait_for(asyncio.gather(*polls), 10)
    assert all(msgspec.json.decode(m.body)["items"] for m in answered)
