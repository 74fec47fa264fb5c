"""The near cache (``StateClient(cache=...)``): reads from memory once an entry is cached,
kept current from the change log; never older than this client's writes or than what it
last saw, never going backwards, converging once writes stop; bounded; not answering while
it cannot follow the log."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.errors import Compacted
from worker.client import CacheLimits, Entry, Scope, StateClient
from worker.client.cache import NearCache
from worker.client.ids import LastWrites
from worker.client.models import Change, EntryKey
from worker.client.reads import ChangesPage
from worker.config import Settings

from .broker import close_connections, require_rabbitmqctl
from .conftest import StartWorker
from .helpers import wait_until

ISSUE = Scope.issue("ISS-5")


@pytest.fixture
async def worker(start_worker: StartWorker) -> None:
    await start_worker()


@pytest.fixture
async def cached(
    worker: None, settings: Settings, plugin_id: uuid.UUID
) -> AsyncIterator[StateClient]:
    async with StateClient(
        settings.amqp_url,
        plugin_id,
        prefix=settings.prefix,
        cache=True,
        connection_name=f"cached {uuid.uuid4()}",
    ) as state:
        await wait_until(_live(state), timeout=10, what="the cache to follow the log")
        yield state


@pytest.fixture
async def other(settings: Settings, plugin_id: uuid.UUID) -> AsyncIterator[StateClient]:
    async with StateClient(settings.amqp_url, plugin_id, prefix=settings.prefix) as state:
        yield state


def _live(state: StateClient) -> Any:
    async def live() -> bool:
        stats = state.cache_stats()
        return stats is not None and stats.live

    return live


async def test_a_second_read_is_answered_from_memory_and_follows_other_writers(
    cached: StateClient, other: StateClient
) -> None:
    await other.set(ISSUE, "k", 1, wait=True)
    assert (await cached.get(ISSUE, "k")).value == 1  # type: ignore[union-attr]
    began = time.perf_counter()
    entry = await cached.get(ISSUE, "k")
    assert time.perf_counter() - began < 0.001
    assert entry is not None and entry.value == 1
    stats = cached.cache_stats()
    assert stats is not None and (stats.hits, stats.misses) == (1, 1)

    await other.set(ISSUE, "k", 2)

    async def updated() -> bool:
        found = await cached.get(ISSUE, "k")
        return found is not None and found.value == 2

    await wait_until(updated, timeout=5, what="the cache to take the other writer's value")
    await other.delete(ISSUE, "k")

    async def deleted() -> bool:
        return await cached.get(ISSUE, "k") is None

    await wait_until(deleted, timeout=5, what="the cache to take the deletion")
    stats = cached.cache_stats()
    assert stats is not None and stats.lag is not None and stats.lag < 5
    assert stats.hit_rate > 0.5


async def test_read_your_writes_holds_with_a_cache(cached: StateClient) -> None:
    for n in range(30):
        await cached.set(ISSUE, "mine", n)  # fire and forget
        entry = await cached.get(ISSUE, "mine")
        assert entry is not None and entry.value == n
    await cached.delete(ISSUE, "mine")
    assert await cached.get(ISSUE, "mine") is None


async def test_fresh_reads_ask_the_worker(cached: StateClient, other: StateClient) -> None:
    await other.set(ISSUE, "k", 1, wait=True)
    await cached.get(ISSUE, "k")
    before = cached.cache_stats()
    assert before is not None
    assert (await cached.get(ISSUE, "k", fresh=True)).value == 1  # type: ignore[union-attr]
    after = cached.cache_stats()
    assert after is not None and after.hits == before.hits


async def test_the_cache_stays_within_its_entries_and_bytes(
    worker: None, settings: Settings, plugin_id: uuid.UUID, other: StateClient
) -> None:
    for n in range(20):
        await other.set(ISSUE, f"k{n}", "x" * 1000, wait=n == 19)
    async with StateClient(
        settings.amqp_url,
        plugin_id,
        prefix=settings.prefix,
        cache=CacheLimits(entries=5, bytes=10**9),
    ) as few:
        await wait_until(_live(few), timeout=10, what="the cache to follow the log")
        for n in range(20):
            await few.get(ISSUE, f"k{n}")
        stats = few.cache_stats()
        assert stats is not None and stats.entries == 5 and stats.evictions == 15
        await few.get(ISSUE, "k19")
        assert few.cache_stats().hits == 1  # type: ignore[union-attr]
    async with StateClient(
        settings.amqp_url,
        plugin_id,
        prefix=settings.prefix,
        cache=CacheLimits(entries=1000, bytes=4000),
    ) as small:
        await wait_until(_live(small), timeout=10, what="the cache to follow the log")
        for n in range(20):
            await small.get(ISSUE, f"k{n}")
        stats = small.cache_stats()
        assert stats is not None and stats.bytes <= 4000 and stats.entries <= 4


async def test_while_its_connection_is_cut_the_cache_answers_nothing_from_memory(
    cached: StateClient, other: StateClient
) -> None:
    require_rabbitmqctl()
    await other.set(ISSUE, "k", 1, wait=True)
    await cached.get(ISSUE, "k")
    assert await close_connections(cached.connection_name) == 1
    stats = cached.cache_stats()
    assert stats is not None and not stats.live
    await other.set(ISSUE, "k", 2, wait=True)
    # Not from memory: the worker answers, with the newer value.
    entry = await cached.get(ISSUE, "k")
    assert entry is not None and entry.value == 2
    await wait_until(_live(cached), timeout=15, what="the cache to follow the log again")


# ---------------------------------------------------------------------- the model


Op = tuple[str, int, int]
"""(who, key, action): who is "me", "other" or "read"; action 0 delete, 1 set, 2 fresh."""

ops = st.lists(
    st.tuples(
        st.sampled_from(["me", "other", "read", "read", "pause"]),
        st.integers(0, 3),
        st.integers(0, 2),
    ),
    min_size=5,
    max_size=40,
)


class Model:
    """What the cached client may answer: per entry, the writes made (by id), what this
    client wrote last, and the lower bound of what it has seen."""

    def __init__(self) -> None:
        self.writes: dict[int, dict[uuid.UUID, Any]] = {}
        """Per key, each write's id and value (None for a delete)."""
        self.mine: dict[int, uuid.UUID] = {}
        self.floor: dict[int, uuid.UUID] = {}
        """Per key, what every later answer must be at least as new as."""

    def wrote(self, key: int, write_id: uuid.UUID, value: Any, mine: bool) -> None:
        self.writes.setdefault(key, {})[write_id] = value
        if mine:
            self.mine[key] = write_id

    def check(self, key: int, entry: Entry | None) -> None:
        writes = self.writes.get(key, {})
        floor = max(
            (v for v in (self.floor.get(key), self.mine.get(key)) if v is not None),
            default=None,
        )
        if entry is not None:
            assert entry.version in writes and writes[entry.version] == entry.value
            assert floor is None or entry.version >= floor, "older than seen or written"
            self.floor[key] = entry.version
            return
        # Nothing: only a delete at or past the floor explains it. The oldest such delete
        # is the floor from now on (a later value must be newer than it).
        deletes = sorted(
            i for i, v in writes.items() if v is None and (floor is None or i >= floor)
        )
        assert floor is None or deletes, "no value, but no delete newer than what was seen"
        if deletes:
            self.floor[key] = deletes[0]


@settings(
    max_examples=int(os.environ.get("PLUGIN_STATE_CACHE_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(program=ops)
async def test_the_cache_against_a_model(
    program: list[Op], cached: StateClient, other: StateClient
) -> None:
    scope = Scope.issue(f"M-{uuid.uuid4()}")
    model = Model()
    for who, key, action in program:
        name = f"k{key}"
        if who == "pause":
            await asyncio.sleep(0.005 * (action + 1))
        elif who == "read":
            entry = await cached.get(scope, name, fresh=action == 2)
            model.check(key, entry)
        else:
            client = cached if who == "me" else other
            if action == 0:
                write_id = await client.delete(scope, name)
                model.wrote(key, write_id, None, who == "me")
            else:
                value = {"by": who, "at": time.monotonic_ns()}
                write_id = await client.set(scope, name, value)
                model.wrote(key, write_id, value, who == "me")
    # Once writes stop, the cache converges to what is stored.
    for key in {key for _, key, _ in program}:

        async def same(key: int = key) -> bool:
            stored = await other.get(scope, f"k{key}")
            entry = await cached.get(scope, f"k{key}")
            model.check(key, entry)
            return (entry is None and stored is None) or (
                entry is not None and stored is not None and entry.version == stored.version
            )

        await wait_until(same, timeout=10, what=f"the cache to converge on k{key}")


# ------------------------------------------------------------ the follower, alone


async def test_a_compacted_log_empties_the_cache_and_it_starts_over() -> None:
    """The follower's reaction to ``compacted``, with a log that answers it on cue."""
    answers: asyncio.Queue[ChangesPage | Exception] = asyncio.Queue()

    async def read_log(since: str | None, wait: float) -> ChangesPage:
        answer = await answers.get()
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = NearCache(CacheLimits(), read_log, connected=lambda: True)
    cache.start()
    key: EntryKey = ("issue", "X", "default", "k")
    await answers.put(ChangesPage([], "10"))
    await wait_until(_cache_live(cache), timeout=2, what="the follower's position")
    filling = cache.filling([key])
    assert filling is not None
    entry = Entry(ISSUE, "default", "k", 1, uuid.uuid4(), datetime.now(UTC))
    cache.keep(key, entry, filling)
    cache.filled(filling)
    assert cache.lookup(key, LastWrites(0)) is not None
    await answers.put(Compacted("purged"))
    await wait_until(_not_live(cache), timeout=2, what="the reset")
    assert cache.stats().entries == 0 and cache.stats().resets == 1
    assert cache.lookup(key, LastWrites(0)) is None
    change = Change("11", "set", ISSUE, "default", "k", uuid.uuid4(), datetime.now(UTC), 2)
    await answers.put(ChangesPage([change], "11"))
    await wait_until(_cache_live(cache), timeout=2, what="the follower to start over")
    await cache.stop()


def _cache_live(cache: NearCache) -> Any:
    async def live() -> bool:
        return cache.live

    return live


def _not_live(cache: NearCache) -> Any:
    async def not_live() -> bool:
        return not cache.live

    return not_live


async def test_an_entry_without_a_value_is_answered_from_memory_once_confirmed(
    cached: StateClient, other: StateClient
) -> None:
    assert await cached.get(ISSUE, "never") is None  # asks the worker: tentative

    async def from_memory() -> bool:
        before = cached.cache_stats()
        assert await cached.get(ISSUE, "never") is None
        after = cached.cache_stats()
        return before is not None and after is not None and after.hits == before.hits + 1

    await wait_until(from_memory, timeout=5, what="the absence to be confirmed")
    await other.set(ISSUE, "never", "now", wait=True)

    async def seen() -> bool:
        entry = await cached.get(ISSUE, "never")
        return entry is not None and entry.value == "now"

    await wait_until(seen, timeout=5, what="the cache to take the new value")
