"""The Python client against the real services: confirmed writes, read-your-writes in both
encodings, paging, monotonic ids, bounded memory, timeouts, a cut connection, typed errors."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aio_pika
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import JSON, MSGPACK
from schemas.errors import InvalidRequest, UnknownPlugin, UnsupportedValue, WritePending
from worker.client import (
    Entry,
    MonotonicUuid7,
    PublishRefused,
    RequestTimeout,
    Scope,
    StateClient,
    Unroutable,
    nacks,
    next_uuid7,
    op_delete,
    op_set,
)
from worker.config import Settings
from worker.topology import declare

from .broker import close_connections, rabbitmqctl, require_rabbitmqctl
from .conftest import StartWorker
from .helpers import state_of, uuid7, wait_until

ISSUE = Scope.issue("ISS-42")

ClientFactory = Callable[..., AbstractAsyncContextManager[StateClient]]


@pytest.fixture
def connect(settings: Settings, plugin_id: uuid.UUID) -> ClientFactory:
    """Clients of this test's plugin and prefix (client options as keywords)."""

    def factory(**options: Any) -> StateClient:
        options = {"prefix": settings.prefix, "timeout": 10.0, **options}
        plugin = options.pop("plugin_id", plugin_id)
        return StateClient(settings.amqp_url, plugin, **options)

    return factory


@pytest.fixture
async def client(connect: ClientFactory) -> AsyncIterator[StateClient]:
    async with connect() as state:
        yield state


def is_uuid7(value: uuid.UUID) -> bool:
    return value.version == 7 and value.variant == uuid.RFC_4122


def strictly_increasing(ids: list[uuid.UUID]) -> bool:
    return all(a < b for a, b in itertools.pairwise(ids))


# ------------------------------------------------------------------------------ ids


def test_uuid7_successor_carries_into_the_millisecond() -> None:
    millis = 1_700_000_000_000
    last_of_millisecond = uuid.UUID(
        int=(millis << 80) | (0x7 << 76) | (0xFFF << 64) | (0b10 << 62) | ((1 << 62) - 1)
    )
    successor = uuid.UUID(int=next_uuid7(last_of_millisecond.int))
    assert successor > last_of_millisecond
    assert is_uuid7(successor)
    assert successor.int >> 80 == millis + 1


def test_generated_ids_strictly_increase_even_within_a_millisecond() -> None:
    new_id = MonotonicUuid7()
    ids = [new_id() for _ in range(100_000)]
    assert strictly_increasing(ids)
    assert all(is_uuid7(i) for i in ids)
    # Far more ids than milliseconds passed: many shared one.
    assert len({i.int >> 80 for i in ids}) < len(ids)


@given(st.lists(st.integers(min_value=0, max_value=(1 << 48) - 2), min_size=1, max_size=50))
def test_ids_strictly_increase_whatever_the_clock_does(readings: list[int]) -> None:
    clock = iter(readings)
    new_id = MonotonicUuid7(lambda: uuid7(next(clock)).int)
    ids = [new_id() for _ in readings]
    assert strictly_increasing(ids)
    assert all(is_uuid7(i) for i in ids)


def test_scope_parses_and_prints_both_forms() -> None:
    assert Scope.parse("instance") == Scope.instance()
    assert Scope.parse("issue:ISS:42") == Scope("issue", "ISS:42")
    assert str(Scope.issue("ISS-42")) == "issue:ISS-42"
    with pytest.raises(ValueError, match="unknown scope kind"):
        Scope.parse("planet:mars")
    with pytest.raises(ValueError, match="needs one"):
        Scope.parse("issue")


# --------------------------------------------------------------------------- writes


async def test_set_delete_and_batch_return_ids_once_confirmed(
    start_worker: StartWorker, client: StateClient, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    set_id = await client.set(ISSUE, "cursor", {"page": 3})
    other_id = await client.set(Scope.instance(), "token", "abc", namespace="auth")
    assert is_uuid7(set_id) and set_id < other_id
    assert client.pending_requests == 0

    async def both_stored() -> bool:
        return await state_of(db, plugin_id) == {
            ("issue", "ISS-42", "default", "cursor"): {"page": 3},
            ("instance", None, "auth", "token"): "abc",
        }

    await wait_until(both_stored, what="both sets to be applied")

    delete_id = await client.delete(ISSUE, "cursor")
    batch_id = await client.batch(
        [
            op_set(ISSUE, "a", 1),
            op_set(ISSUE, "b", [2]),
            op_delete(Scope.instance(), "token", namespace="auth"),
        ]
    )
    assert other_id < delete_id < batch_id

    async def batch_applied() -> bool:
        return await state_of(db, plugin_id) == {
            ("issue", "ISS-42", "default", "a"): 1,
            ("issue", "ISS-42", "default", "b"): [2],
        }

    await wait_until(batch_applied, what="the delete and the batch to be applied")


async def test_wait_returns_after_the_applied_reply(
    start_worker: StartWorker, client: StateClient, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    await client.set(ISSUE, "cursor", {"page": 1}, wait=True)
    assert await state_of(db, plugin_id) == {("issue", "ISS-42", "default", "cursor"): {"page": 1}}
    await client.batch([op_set(ISSUE, "x", None), op_delete(ISSUE, "cursor")], wait=True)
    assert await state_of(db, plugin_id) == {("issue", "ISS-42", "default", "x"): None}
    await client.delete(ISSUE, "x", wait=True)
    assert await state_of(db, plugin_id) == {}
    assert client.pending_requests == 0


async def test_write_ids_strictly_increase_across_1000_quick_calls(
    start_worker: StartWorker, connect: ClientFactory
) -> None:
    # Uncoalesced: each write its own message and id (coalesced writes share their batch's).
    await start_worker()
    async with connect(coalesce=False) as client:
        ids = await asyncio.gather(*(client.set(ISSUE, f"k{i % 7}", i) for i in range(1000)))
        assert strictly_increasing(ids)
        assert client.last_write(ISSUE, f"k{999 % 7}") == ids[-1]


async def test_remembered_writes_stay_bounded(
    start_worker: StartWorker, connect: ClientFactory
) -> None:
    await start_worker()
    async with connect(remember=5) as client:
        ids = [await client.set(ISSUE, f"key-{i}", i) for i in range(20)]
        assert client.remembered_writes == 5
        assert client.last_write(ISSUE, "key-0") is None
        assert client.last_write(ISSUE, "key-19") == ids[-1]
        batch_id = await client.batch([op_set(ISSUE, f"batch-{i}", i) for i in range(12)])
        assert client.remembered_writes == 5
        assert client.last_write(ISSUE, "batch-11") == batch_id


async def test_write_error_reply_raises_the_typed_exception(
    start_worker: StartWorker, client: StateClient, connect: ClientFactory
) -> None:
    await start_worker()
    with pytest.raises(InvalidRequest) as invalid:
        await client.set(ISSUE, "__proto__", 1, wait=True)
    assert invalid.value.code == "invalid_request"
    async with connect(plugin_id=uuid.uuid4()) as stranger:
        with pytest.raises(UnknownPlugin):
            await stranger.set(ISSUE, "cursor", 1, wait=True)
    assert client.pending_requests == 0


async def test_values_json_cannot_carry_are_refused_before_publishing(
    client: StateClient,
) -> None:
    # JSON has no NaN or Infinity: encoded, they would silently become null.
    for value in (float("nan"), {"a": [1, float("inf")]}, [None, -float("inf")]):
        with pytest.raises(UnsupportedValue):
            await client.set(ISSUE, "cursor", value)
    with pytest.raises(UnsupportedValue):
        await client.batch([op_set(ISSUE, "a", None), op_set(ISSUE, "b", float("nan"))])
    with pytest.raises(ValueError, match="at least one op"):
        await client.batch([])
    assert client.last_write(ISSUE, "cursor") is None


async def test_publishing_where_nothing_routes_raises_unroutable(
    client: StateClient, amqp: aio_pika.abc.AbstractChannel, prefix: str
) -> None:
    with pytest.raises(Unroutable, match="no exchange"):
        await client.set(ISSUE, "cursor", 1)
    # The exchange alone, with no queue bound: the mandatory message comes back.
    await amqp.declare_exchange(prefix, aio_pika.ExchangeType.TOPIC, durable=True)
    with pytest.raises(Unroutable, match="no queue is bound"):
        await client.set(ISSUE, "cursor", 1)
    with pytest.raises(Unroutable):
        await client.get(ISSUE, "cursor")
    assert client.pending_requests == 0


async def test_a_write_the_broker_nacks_raises_publish_refused(
    client: StateClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    # A commands queue full at one message, and no worker draining it: the broker nacks.
    await declare(amqp, settings.with_changes(commands_max_length=1))
    # A quorum queue applies its limit once it has counted what it holds: soon, not at once.
    with pytest.raises(PublishRefused, match="nacked") as refused:
        for i in range(100):
            await client.set(ISSUE, f"key-{i}", i)
    # Refused after a bounded run of nacks, each on a fresh channel, well before the timeout.
    assert f"{nacks.ATTEMPTS} times" in str(refused.value)
    assert client.last_write(ISSUE, "key-0") is not None
    assert client.last_write(ISSUE, f"key-{i}") is None


async def test_a_run_of_nacks_that_ends_is_retried_not_a_refusal(
    client: StateClient,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    """As during a quorum queue's leader election: the broker nacks for a while, then takes
    the write again; the write is sent again (same id) on a fresh channel and is applied."""
    full = settings.with_changes(commands_max_length=1)
    await declare(amqp, full)

    async def nacked() -> bool:  # fill the queue until the broker says no
        try:
            await client.set(ISSUE, "filler", 0, timeout=1)
        except PublishRefused:
            return True
        return False

    await wait_until(nacked, 30, "the commands queue to be full")
    writing = asyncio.create_task(client.set(ISSUE, "cursor", {"page": 3}, wait=True))
    await asyncio.sleep(0.3)  # nacked a few times meanwhile
    assert not writing.done()
    await start_worker(commands_max_length=1)  # drains the queue: publishes are taken again
    write_id = await asyncio.wait_for(writing, 10)
    assert client.last_write(ISSUE, "cursor") == write_id
    assert (await state_of(db, plugin_id))[("issue", "ISS-42", "default", "cursor")] == {"page": 3}


async def test_a_call_nobody_answers_times_out_and_leaves_no_pending_call(
    client: StateClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    await declare(amqp, settings)  # the topology, but no worker consuming it
    with pytest.raises(RequestTimeout) as timed_out:
        await client.get(ISSUE, "cursor", timeout=0.5)
    assert isinstance(timed_out.value, TimeoutError)
    assert client.pending_requests == 0
    # The write itself is confirmed (queued); only the applied reply never comes.
    with pytest.raises(RequestTimeout):
        await client.set(ISSUE, "cursor", 1, wait=True, timeout=0.5)
    assert client.pending_requests == 0


# ---------------------------------------------------------------------------- reads


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
async def test_set_then_get_reads_your_write(
    start_worker: StartWorker, connect: ClientFactory, content_type: str
) -> None:
    await start_worker()
    async with connect(content_type=content_type) as client:
        for page in range(5):
            write_id = await client.set(ISSUE, "cursor", {"page": page})
            entry = await client.get(ISSUE, "cursor")
            assert entry is not None
            assert entry.value == {"page": page}
            assert entry.version == write_id
            assert (entry.scope, entry.namespace, entry.key) == (ISSUE, "default", "cursor")
        await client.delete(ISSUE, "cursor")
        assert await client.get(ISSUE, "cursor") is None


async def test_get_tells_a_missing_entry_from_a_stored_null(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker()
    assert await client.get(ISSUE, "never-written") is None
    await client.set(ISSUE, "nothing", None, namespace="ns")
    entry = await client.get(ISSUE, "nothing", namespace="ns")
    assert isinstance(entry, Entry)
    assert entry.value is None
    assert entry.updated_at.tzinfo is not None


async def test_get_many_answers_each_entry_in_order(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker()
    await client.batch(
        [op_set(ISSUE, "a", 1), op_set(Scope.instance(), "b", "two", namespace="ns")]
    )
    await client.set(Scope.run("r-1"), "c", [3])
    entries = await client.get_many(
        [(Scope.run("r-1"), "c"), (ISSUE, "missing"), (Scope.instance(), "b", "ns"), (ISSUE, "a")]
    )
    assert [e.value if e else None for e in entries] == [[3], None, "two", 1]
    assert entries[2] is not None and entries[2].namespace == "ns"
    assert await client.get_many([]) == []


async def test_list_iterates_every_page(start_worker: StartWorker, client: StateClient) -> None:
    await start_worker()
    await client.batch(
        [op_set(ISSUE, f"key-{i:02}", i) for i in range(11)]
        + [op_set(Scope.issue("ISS-7"), "other", True), op_set(Scope.instance(), "k", "v")],
        wait=True,
    )
    listed = [entry async for entry in client.list(page_size=3)]
    assert [(str(e.scope), e.key) for e in listed] == [
        ("instance", "k"),
        *[("issue:ISS-42", f"key-{i:02}") for i in range(11)],
        ("issue:ISS-7", "other"),
    ]
    of_issue = [e.value async for e in client.list(ISSUE, prefix="key-0", page_size=2)]
    assert of_issue == list(range(10))
    of_kind = [e.key async for e in client.list("issue", page_size=5)]
    assert len(of_kind) == 12


async def test_read_error_reply_raises_the_typed_exception(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker()
    with pytest.raises(InvalidRequest):
        await client.get(ISSUE, "__proto__")
    with pytest.raises(InvalidRequest):
        await client.get_many([(ISSUE, "ok"), (ISSUE, "")])
    assert client.pending_requests == 0


# ---------------------------------------------------------------------------- faults


async def test_client_survives_its_connection_being_closed(
    start_worker: StartWorker, connect: ClientFactory, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    require_rabbitmqctl()
    await start_worker()
    cut = asyncio.Event()
    outcomes: list[uuid.UUID | Entry | BaseException | None] = []

    async def keep_calling(client: StateClient, lane: int) -> None:
        # Back to back until the cut is over, so that calls are in flight when it happens.
        count = 0
        while not cut.is_set() or count < 3:
            try:
                outcomes.append(await client.set(ISSUE, f"lane-{lane}", count, wait=True))
                outcomes.append(await client.get(ISSUE, f"lane-{lane}"))
            except RequestTimeout as exc:
                outcomes.append(exc)
            count += 1

    async with connect(timeout=8.0) as client:
        await client.set(ISSUE, "before", 1, wait=True)
        async with asyncio.TaskGroup() as group:
            lanes = [group.create_task(keep_calling(client, lane)) for lane in range(8)]
            assert await close_connections(client.connection_name) == 1
            cut.set()
            # Each call completes or fails with the clear timeout; this bound only proves
            # that none hangs.
            await asyncio.wait_for(asyncio.gather(*lanes), timeout=60)
        timeouts = [o for o in outcomes if isinstance(o, RequestTimeout)]
        print(f"{len(outcomes)} calls around the cut, {len(timeouts)} timed out")
        assert all(isinstance(o, uuid.UUID | Entry | RequestTimeout) for o in outcomes)
        assert client.pending_requests == 0

        after_id = await client.set(ISSUE, "after", 2)
        entry = await client.get(ISSUE, "after")
        assert entry is not None and entry.version == after_id
        assert (await state_of(db, plugin_id))[("issue", "ISS-42", "default", "after")] == 2


async def test_after_write_pending_the_next_read_still_waits_for_the_write(
    start_worker: StartWorker, client: StateClient
) -> None:
    await start_worker(value_max_bytes=100)
    await client.set(ISSUE, "big", "old", wait=True)
    await client.set(ISSUE, "big", "x" * 1000)  # confirmed, then dead-lettered by the worker
    for _ in range(2):
        # Never the old value: the client does not know the write is lost.
        with pytest.raises(WritePending, match="forget_write"):
            await client.get(ISSUE, "big", timeout=1.0)
    assert client.last_write(ISSUE, "big") is not None
    client.forget_write(ISSUE, "big")
    entry = await client.get(ISSUE, "big")
    assert entry is not None and entry.value == "old"


async def test_a_client_with_a_reply_queue_of_its_own_gets_its_answers_there(
    start_worker: StartWorker, connect: ClientFactory, settings: Settings, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    async with connect(reply_queue="inbox") as state:
        await state.set(ISSUE, "k", {"own": True}, wait=True)
        entry = await state.get(ISSUE, "k")
        assert entry is not None and entry.value == {"own": True}
        own = f"{settings.prefix}.reply.{plugin_id}.inbox"
        listing = await rabbitmqctl("list_queues", "--no-table-headers", "name")
        assert own in listing.split()
