"""A failure no rule foresaw (a bug) while handling one message is that message's outcome,
``internal``, and nothing more: the worker stays up, and the other messages of its burst
or batch are answered or applied (protocol §4).

The bug is injected into one pure function of the worker, for one key only, against the
real broker and database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import asyncpg
import msgspec
import pytest

from worker import applier, decisions, reads
from worker.config import Settings
from worker.topology import Names

from .conftest import StartWorker
from .helpers import get_request as get
from .helpers import queue_messages, set_cmd, state_of, wait_until
from .rpc import RawRpc

CULPRIT = "boom"


class InjectedBug(RuntimeError):
    """Stands for a bug the worker's authors did not foresee."""


@pytest.fixture
async def rpc(settings: Settings) -> AsyncIterator[RawRpc]:
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:
        yield caller


def failing_for_culprit(
    original: Callable[..., Any], names_culprit: Callable[..., bool]
) -> Callable[..., Any]:
    def injected(*args: Any, **kwargs: Any) -> Any:
        if names_culprit(*args, **kwargs):
            raise InjectedBug("injected for the test")
        return original(*args, **kwargs)

    return injected


READ_BUGS: dict[str, tuple[str, Callable[..., bool], dict[str, Any]]] = {
    # Where the lookups of a whole burst are sorted out.
    "checking a lookup": (
        "check_lookup_size",
        lambda entries, *_: any(e.key == CULPRIT for e in entries),
        {"op": "get", "scope_kind": "issue", "scope_id": "ISS-1", "key": CULPRIT},
    ),
    # Where a list is planned.
    "planning a list": (
        "list_bounds",
        lambda request: request.prefix == CULPRIT,
        {"op": "list", "prefix": CULPRIT},
    ),
    # Where a reply is built.
    "building a list page": (
        "page_reply",
        lambda rows, *_: any(row.entry.key == CULPRIT for row in rows),
        {"op": "list", "prefix": CULPRIT[:2]},
    ),
}


@pytest.mark.parametrize("bug", READ_BUGS.values(), ids=READ_BUGS.keys())
async def test_a_read_that_hits_a_bug_is_answered_internal_and_its_burst_is_served(
    start_worker: StartWorker,
    rpc: RawRpc,
    plugin_id: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
    bug: tuple[str, Callable[..., bool], dict[str, Any]],
) -> None:
    function, names_culprit, culprit_request = bug
    await start_worker()
    applied = await rpc.call(plugin_id, set_cmd(plugin_id, CULPRIT, 1), kind="cmd")
    assert applied["type"] == "applied"
    monkeypatch.setattr(
        reads, function, failing_for_culprit(getattr(reads, function), names_culprit)
    )
    burst = [await rpc.send(plugin_id, get(plugin_id, f"k{n}")) for n in range(5)]
    culprit = await rpc.send(plugin_id, {**culprit_request, "plugin_id": str(plugin_id)})
    burst += [await rpc.send(plugin_id, get(plugin_id, f"k{n}")) for n in range(5, 10)]
    listing = await rpc.send(plugin_id, {"op": "list", "plugin_id": str(plugin_id), "prefix": "k"})
    replies = [await asyncio.wait_for(f, 10) for f in [*burst, listing, culprit]]
    decoded = [aio_pika_json(r) for r in replies]
    assert decoded[:10] == [{"type": "value", "found": False}] * 10
    assert decoded[10]["type"] == "page"
    assert decoded[11]["type"] == "error" and decoded[11]["code"] == "internal", decoded[11]
    # Still up: the next request is answered as usual.
    assert (await rpc.call(plugin_id, get(plugin_id, "after")))["type"] == "value"


def aio_pika_json(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(message.body)
    return decoded


async def test_a_write_that_hits_a_bug_is_dead_lettered_internal_and_its_batch_applied(
    start_worker: StartWorker,
    rpc: RawRpc,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    prefix: str,
    plugin_id: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        applier,
        "decide",
        failing_for_culprit(
            decisions.decide,
            lambda writes, *_: any(e.entry.key == CULPRIT for w in writes for e in w.entries),
        ),
    )
    await start_worker(batch_wait_ms=200)
    keys = [f"k{n}" for n in range(5)] + [CULPRIT] + [f"k{n}" for n in range(5, 10)]
    replies = await asyncio.gather(
        *(rpc.call(plugin_id, set_cmd(plugin_id, key, key), kind="cmd") for key in keys)
    )
    outcomes = dict(zip(keys, replies, strict=True))
    assert outcomes.pop(CULPRIT)["code"] == "internal"
    assert {r["outcome"] for r in outcomes.values()} == {"applied"}
    state = await state_of(db, plugin_id)
    assert sorted(k[3] for k in state) == sorted(outcomes)

    dead: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def dead_lettered() -> bool:
        dead.extend(await queue_messages(amqp, Names(prefix).dead))
        return bool(dead)

    await wait_until(dead_lettered, what="the culprit's dead letter")
    assert [m.headers["x-reject-code"] for m in dead] == ["internal"]
    # Still up: the next write is applied.
    after = await rpc.call(plugin_id, set_cmd(plugin_id, "after", 1), kind="cmd")
    assert after["outcome"] == "applied"
