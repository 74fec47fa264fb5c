"""No gap in the change log (protocol §8), whatever the number of workers committing at once.

Two and four worker processes apply sets, deletes, expiring sets, conditional updates and
batches from several writers, while readers follow the log: a ``watch``, and a raw reader
with small pages and a filter. Once the writes stop and the last entry has expired, for
every entry the last change each reader saw carries the entry's final version (and kind),
and the versions one reader saw of one entry only grew. A sequence taken inside concurrent
transactions would fail this: a reader moves past a position whose transaction commits
later, and never sees it (``worker.changes`` says why positions given under the plugin's
lock cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import uuid
from typing import Any

import asyncpg
import pytest

from schemas.topology import Names
from worker.client import Change, Conflict, Entry, Scope, StateClient, Synced, op_delete, op_set
from worker.config import Settings
from worker.topology import declare

from .broker import rabbitmqctl, require_rabbitmqctl
from .helpers import wait_until
from .processes import spawn_worker, wait_exit

WRITES = int(os.environ.get("PLUGIN_STATE_GAP_WRITES", "1500"))
WRITERS = 4
KEYS = 40
SCOPES = [Scope.issue("A"), Scope.issue("B"), Scope.instance()]

EntryId = tuple[str, str | None, str, str]
Seen = tuple[uuid.UUID, bool, str]
"""A change as the test orders it: its version, whether it ends a value, its kind."""


def seen_of(change: Change) -> Seen:
    return (change.version, change.kind != "set", change.kind)


class Followed:
    """What one reader saw, per entry, in order."""

    def __init__(self) -> None:
        self.per_entry: dict[EntryId, list[Seen]] = {}

    def saw(self, change: Change) -> None:
        key = (change.scope.kind, change.scope.id, change.namespace, change.key)
        self.per_entry.setdefault(key, []).append(seen_of(change))

    def went_back(self) -> list[EntryId]:
        return [
            key
            for key, seen in self.per_entry.items()
            if any(a[:2] > b[:2] for a, b in itertools.pairwise(seen))
        ]


async def final_versions(db: asyncpg.Pool, plugin_id: uuid.UUID) -> dict[EntryId, Seen]:
    rows = await db.fetch(
        "SELECT scope_kind, scope_id, namespace, state_key, version, deleted, expired "
        "FROM plugin_state_versions WHERE plugin_id = $1",
        plugin_id,
    )
    return {
        (r["scope_kind"], r["scope_id"], r["namespace"], r["state_key"]): (
            r["version"],
            r["deleted"],
            ("expire" if r["expired"] else "delete") if r["deleted"] else "set",
        )
        for r in rows
    }


async def write(state: StateClient, writer: int, count: int) -> None:
    rng = random.Random(writer)
    for n in range(count):
        scope = rng.choice(SCOPES)
        key = f"k{rng.randrange(KEYS)}"
        roll = rng.random()
        if roll < 0.45:
            await state.set(scope, key, {"writer": writer, "n": n})
        elif roll < 0.6:
            await state.delete(scope, key)
        elif roll < 0.75:
            await state.set(scope, key, n, ttl=rng.uniform(0.05, 0.6))
        elif roll < 0.9:
            # Losing the race three times is fine here: the conflict changed nothing.
            with contextlib.suppress(Conflict):
                await state.update(scope, key, _increment, attempts=3)
        else:
            other = f"k{rng.randrange(KEYS)}"
            await state.batch([op_set(scope, key, n), op_delete(scope, other)])


def _increment(entry: Entry | None) -> int:
    return entry.value + 1 if entry is not None and isinstance(entry.value, int) else 0


async def follow_watch(state: StateClient, followed: Followed) -> None:
    async for event in state.watch(initial=False, wait=1):
        if isinstance(event, Change):
            followed.saw(event)
        else:
            assert isinstance(event, Synced), f"unexpected {event!r}"


async def follow_pages(state: StateClient, followed: Followed) -> None:
    """Small pages, a filter, and waits: the reads most likely to step past a gap."""
    page = await state.changes(None)
    since = page.next
    while True:
        page = await state.changes(since, "issue", limit=7, wait=0.2)
        for change in page.changes:
            followed.saw(change)
        since = page.next


@pytest.mark.parametrize("workers", [2, 4])
async def test_readers_of_the_log_miss_no_change_with_many_workers_committing(
    workers: int,
    settings: Settings,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
    amqp: Any,
) -> None:
    require_rabbitmqctl()
    await declare(amqp, settings)
    processes = [
        spawn_worker(settings, expiry_interval_seconds="0.1", batch_wait_ms="2")
        for _ in range(workers)
    ]
    clients = [
        StateClient(settings.amqp_url, plugin_id, prefix=settings.prefix, timeout=30)
        for _ in range(WRITERS + 2)
    ]
    try:
        for state in clients:
            await state.connect()
        watched, paged = Followed(), Followed()
        readers = [
            asyncio.create_task(follow_watch(clients[-1], watched)),
            asyncio.create_task(follow_pages(clients[-2], paged)),
        ]
        await asyncio.sleep(0.5)  # both readers have their positions
        await asyncio.gather(*(write(clients[w], w, WRITES // WRITERS) for w in range(WRITERS)))

        async def settled() -> bool:
            # Every write applied (none ready or unacked in the commands queue), every
            # expiry swept: the register stops moving.
            listing = await rabbitmqctl("list_queues", "--no-table-headers", "name", "messages")
            queued = [
                line.split("\t")[1]
                for line in listing.splitlines()
                if line.split("\t")[0] == Names(settings.prefix).commands_queue
            ]
            expiring = await db.fetchval(
                "SELECT count(*) FROM plugin_state WHERE plugin_id = $1 AND expires_at IS NOT NULL",
                plugin_id,
            )
            return queued == ["0"] and expiring == 0

        await wait_until(settled, timeout=60, what="every expiry swept")
        final = await final_versions(db, plugin_id)

        async def caught_up() -> bool:
            watch_done = all(watched.per_entry.get(k, [None])[-1] == v for k, v in final.items())
            pages_done = all(
                paged.per_entry.get(k, [None])[-1] == v for k, v in final.items() if k[0] == "issue"
            )
            return watch_done and pages_done

        await wait_until(caught_up, timeout=60, what="both readers at every final version")
        assert not watched.went_back() and not paged.went_back()
        told = sum(len(s) for s in watched.per_entry.values())
        print(f"{workers} workers: {len(final)} entries, {told} changes told to the watch")
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        for state in clients:
            await state.close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await wait_exit(process)
