"""``StateClient.watch``: the current entries, then every change; resumable from a position;
across closed connections, a restarted worker and a compacted log, nothing lost and nothing
repeated."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from worker.client import Change, Reset, Scope, StateClient, Synced, WatchEvent
from worker.config import Settings
from worker.store import Store

from .broker import close_connections, require_rabbitmqctl
from .conftest import StartWorker
from .helpers import wait_until

ISSUE = Scope.issue("ISS-3")
EntryId = tuple[str, str | None, str, str]


class Watcher:
    """Follows a watch in the background: every event, and the state they build."""

    def __init__(self, events: AsyncIterator[WatchEvent]) -> None:
        self.events: list[WatchEvent] = []
        self.state: dict[EntryId, Any] = {}
        self.synced = asyncio.Event()
        self._task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncIterator[WatchEvent]) -> None:
        async for event in events:
            self.events.append(event)
            if isinstance(event, Synced):
                self.synced.set()
            elif isinstance(event, Reset):
                self.state.clear()
            else:
                key = (event.scope.kind, event.scope.id, event.namespace, event.key)
                if event.kind == "set":
                    self.state[key] = event.value
                else:
                    self.state.pop(key, None)

    def changes(self) -> list[Change]:
        return [e for e in self.events if isinstance(e, Change)]

    def live_positions(self) -> list[int]:
        """Positions of the changes told from the log (not those of a listing)."""
        positions = []
        listing = False
        for event in self.events:
            if isinstance(event, Reset):
                listing = True
            elif isinstance(event, Synced):
                listing = False
            elif isinstance(event, Change) and not (listing and event.kind == "set"):
                positions.append(int(event.position))
        return positions

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def stored(db: asyncpg.Pool, plugin_id: uuid.UUID) -> dict[EntryId, Any]:
    rows = await db.fetch(
        "SELECT scope_kind, scope_id, namespace, state_key, value_json FROM plugin_state "
        "WHERE plugin_id = $1 AND (expires_at IS NULL OR expires_at > now())",
        plugin_id,
    )
    return {
        (r["scope_kind"], r["scope_id"], r["namespace"], r["state_key"]): msgspec.json.decode(
            r["value_json"]
        )
        for r in rows
    }


@pytest.fixture
async def client(settings: Settings, plugin_id: uuid.UUID) -> AsyncIterator[StateClient]:
    async with StateClient(settings.amqp_url, plugin_id, prefix=settings.prefix) as state:
        yield state


@pytest.fixture
async def watching(settings: Settings, plugin_id: uuid.UUID) -> AsyncIterator[StateClient]:
    """A client of its own for the watch, so the test can cut its connection alone."""
    async with StateClient(
        settings.amqp_url,
        plugin_id,
        prefix=settings.prefix,
        connection_name=f"watch {uuid.uuid4()}",
    ) as state:
        yield state


async def converged(watcher: Watcher, db: asyncpg.Pool, plugin_id: uuid.UUID) -> None:
    async def same() -> bool:
        return watcher.state == await stored(db, plugin_id)

    await wait_until(same, timeout=30, what="the watcher to hold the stored state")


async def test_a_watch_tells_the_current_entries_then_every_change(
    start_worker: StartWorker,
    client: StateClient,
    watching: StateClient,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
) -> None:
    await start_worker()
    await client.set(ISSUE, "a", 1, wait=True)
    await client.set(ISSUE, "b", 2, wait=True)
    await client.set(Scope.issue("OTHER"), "c", 3, wait=True)
    watcher = Watcher(watching.watch(ISSUE))
    await asyncio.wait_for(watcher.synced.wait(), 10)
    assert [(c.key, c.kind, c.value) for c in watcher.changes()] == [
        ("a", "set", 1),
        ("b", "set", 2),
    ]
    began = time.monotonic()
    await client.set(ISSUE, "a", 10)
    await client.delete(ISSUE, "b")
    await client.set(Scope.issue("OTHER"), "c", 30)  # outside the filter
    await wait_until(lambda: _told(watcher, 4), timeout=10, what="two live changes")
    assert time.monotonic() - began < 5
    # Two fire-and-forget writes of different entries: they may commit in either order.
    assert sorted((c.key, c.kind) for c in watcher.changes()[2:]) == [("a", "set"), ("b", "delete")]
    assert watcher.state == {("issue", "ISS-3", "default", "a"): 10}
    await watcher.stop()


async def _told(watcher: Watcher, count: int) -> bool:
    return len(watcher.changes()) >= count


async def test_a_watch_resumes_after_a_position_without_repeating_it(
    start_worker: StartWorker, client: StateClient, watching: StateClient
) -> None:
    await start_worker()
    first = Watcher(watching.watch(ISSUE, initial=False))
    await asyncio.wait_for(first.synced.wait(), 10)
    for n in range(5):
        await client.set(ISSUE, f"k{n}", n)
    await wait_until(lambda: _told(first, 5), timeout=10, what="five changes")
    await first.stop()
    middle = first.changes()[2]
    for n in range(5, 8):
        await client.set(ISSUE, f"k{n}", n)
    resumed = Watcher(watching.watch(ISSUE, since=middle.position))
    await wait_until(lambda: _told(resumed, 5), timeout=10, what="the rest")
    # Log order is commit order, not the order the writes were sent in (batches of
    # different entries commit concurrently): after the third change told, exactly the
    # other five, each once, in log order.
    told = resumed.changes()
    assert sorted(c.key for c in told) == sorted(
        {f"k{n}" for n in range(8)} - {c.key for c in first.changes()[:3]}
    )
    positions = [int(c.position) for c in told]  # the worker's positions are numbers
    assert positions == sorted(positions) and positions[0] > int(middle.position)
    await resumed.stop()


async def test_a_watch_survives_closed_connections_and_a_restarted_worker(
    start_worker: StartWorker,
    client: StateClient,
    watching: StateClient,
    settings: Settings,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
) -> None:
    require_rabbitmqctl()
    worker = await start_worker()
    watcher = Watcher(watching.watch(ISSUE, wait=2))
    await asyncio.wait_for(watcher.synced.wait(), 10)
    writes = 0

    async def write(count: int) -> None:
        nonlocal writes
        for _ in range(count):
            writes += 1
            if writes % 7 == 0:
                await client.delete(ISSUE, f"k{writes % 13}")
            else:
                await client.set(ISSUE, f"k{writes % 13}", writes)

    await write(50)
    assert await close_connections(watching.connection_name) == 1
    await write(50)
    # Every connection of this test's worker and clients, at once.
    await close_connections(worker.instance)
    await close_connections(watching.connection_name)
    await write(50)
    worker.request_stop()
    await start_worker()  # a new worker; the old one drains
    await write(50)
    await converged(watcher, db, plugin_id)
    positions = watcher.live_positions()
    assert positions == sorted(set(positions)), "a change was told twice or out of order"
    await watcher.stop()


async def test_a_watch_behind_a_compacted_log_resets_relists_and_goes_on(
    start_worker: StartWorker,
    client: StateClient,
    watching: StateClient,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
) -> None:
    await start_worker()
    for n in range(4):
        await client.set(ISSUE, f"k{n}", n, wait=True)
    synced = None
    async for event in watching.watch(ISSUE):
        if isinstance(event, Synced):
            synced = event
            break
    assert synced is not None
    # While nobody watches: a deletion, which the retention then purges.
    await client.delete(ISSUE, "k0", wait=True)
    await client.set(ISSUE, "k1", 100, wait=True)
    assert (await Store(db).purge_tombstones(0, 100_000) or 0) >= 1

    watcher = Watcher(watching.watch(ISSUE, since=synced.position))
    await wait_until(lambda: _synced_after_reset(watcher), timeout=10, what="reset and relist")
    assert isinstance(watcher.events[0], Reset)
    assert watcher.state == await stored(db, plugin_id)
    await client.set(ISSUE, "k9", 9)
    await converged(watcher, db, plugin_id)
    await watcher.stop()


async def _synced_after_reset(watcher: Watcher) -> bool:
    return any(isinstance(e, Reset) for e in watcher.events) and watcher.synced.is_set()
