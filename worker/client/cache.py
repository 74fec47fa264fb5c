"""The near cache: entries this client has read, kept in memory and kept current by
following the plugin's change log (protocol §8), so that most reads cost no round trip.

    async with StateClient(url, plugin_id, cache=CacheLimits(entries=10_000)) as state:
        await state.get(scope, "settings")  # asks the worker, keeps the entry
        await state.get(scope, "settings")  # from memory while the cache is live

**What it answers.** A ``get`` is answered from memory when the cache is *live* (its
follower has its position in the log and its last read of the log succeeded, on a
connection that is up), it holds the entry (a value, or a deletion or expiry it saw in the
log), the entry is not past its ``expires_at`` by this machine's clock, and, for an entry
this client wrote, it holds that write or a newer one: read-your-writes is never weakened.
Everything else goes to the worker, and what the worker answers is kept.

**How stale.** A cached value is at most as old as the feed's lag: the time from a commit
to the follower's applying it, a few milliseconds while the worker and the connection are
well (the follower long-polls ``changes``, answered within milliseconds of a commit). While
the follower cannot read the log (the connection is lost, the read fails), the cache is
not live and every read goes to the worker. ``stats().lag`` is the last measured lag;
``get(..., fresh=True)`` asks the worker whatever the cache holds.

**Never backwards.** Per entry, the cache only moves to newer versions (the contract's
order of writes; an expiry comes after the set it ends). A read the worker answers while
the follower is still behind never makes the cache older: while a read is in flight, the
follower notes the changes of its entries, and the newer of the two is kept. An entry is
only kept from a read sent after the follower had its position, so every later change of
it reaches the follower.

**Entries without a value.** The worker answers "no value" without a version, so such an
answer cannot be ordered against a change the follower has not applied yet (a set that
committed before the read, still on its way). It is kept *tentatively*: not answered from
memory, and forgotten if any change of the entry arrives, until a read of the log that
began after the answer came back, from the follower's position, reaches the end of the log
(a second reader does that at once, beside the follower's long poll): every change of the
entry after that is newer than the answer, and the entry is answered from memory from
then on.
When the log was compacted past the follower's position
(``compacted``), the cache empties itself and starts over.

**Bounded.** At most ``entries`` entries and ``bytes`` bytes of values (their JSON size),
the least recently used go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import msgspec

from schemas.errors import Compacted, InvalidRequest, StateError

from .errors import ClientError
from .ids import LastWrites
from .log import get_logger
from .models import Change, Entry, EntryKey, entry_key

if TYPE_CHECKING:
    from .reads import ChangesPage

log = get_logger(__name__)

FOLLOW_WAIT: Final = 20.0
"""How long one read of the log waits for a change (seconds)."""
_RETRY_INITIAL: Final = 0.05
_RETRY_MAX: Final = 2.0
_SLOT_BYTES: Final = 200
"""What a slot costs besides its value (the key, the version, the bookkeeping), roughly."""


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """How much the near cache keeps: at most ``entries`` entries and ``bytes`` bytes."""

    entries: int = 10_000
    bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.entries < 1 or self.bytes < 1:
            raise ValueError("a cache needs room for at least one entry")


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int
    resets: int
    live: bool
    """Whether the cache may answer now."""
    position: str | None
    """The follower's position in the change log."""
    lag: float | None
    """Seconds from the commit of the last change the follower applied to its applying
    (by this machine's clock and the database's: a skew between them shows here)."""

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry | None
    """The cached entry, or None: it was deleted or expired."""


_UNKNOWN: Final = uuid.UUID(int=0)
"""The version of "no value" as the worker answers it: older than any write."""


@dataclass(slots=True)
class _Slot:
    version: uuid.UUID
    gone: bool
    """Deleted or expired at ``version`` (an expiry has the version of the set it ends, and
    comes after it)."""
    entry: Entry | None
    size: int
    confirmed_by: int = 0
    """A read of the log numbered this or later must reach its end before the slot may be
    answered (0: at once). See "Entries without a value"."""

    def older_than(self, version: uuid.UUID, gone: bool) -> bool:
        return (self.version, self.gone) < (version, gone)


@dataclass(slots=True)
class _InFlight:
    """Reads of an entry in flight, and the newest change of it the follower saw meanwhile."""

    readers: int = 0
    seen: _Slot | None = None


@dataclass(frozen=True, slots=True)
class Filling:
    """Reads sent to the worker whose answers the cache may keep (``NearCache.filling``)."""

    epoch: int
    keys: tuple[EntryKey, ...]


class NearCache:
    """An LRU of entries, and the follower that keeps them current (``start``/``stop``)."""

    def __init__(
        self,
        limits: CacheLimits,
        read_log: Callable[[str | None, float], Awaitable[ChangesPage]],
        *,
        connected: Callable[[], bool],
    ) -> None:
        self.limits = limits
        self._read_log = read_log
        self._connected = connected
        self._slots: OrderedDict[EntryKey, _Slot] = OrderedDict()
        self._fills: dict[EntryKey, _InFlight] = {}
        self._bytes = 0
        self._epoch = 0
        """Counts resets: a read sent before one may not be kept after it."""
        self._position: str | None = None
        self._reads_of_log = 0
        """Reads of the log begun (the follower's and the confirming ones), numbered."""
        self._reached_end = 0
        """The last read of the log (by number) that reached its end."""
        self._to_confirm = 0
        """Tentative slots wait for a read of the log numbered this to reach its end."""
        self._confirming: asyncio.Task[None] | None = None
        self._healthy = False
        self._lag: float | None = None
        self._hits = self._misses = self._evictions = self._resets = 0
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="near-cache")

    async def stop(self) -> None:
        if self._confirming is not None:
            self._confirming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._confirming
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._healthy = False

    @property
    def live(self) -> bool:
        return self._healthy and self._position is not None and self._connected()

    def lost(self) -> None:
        """The connection was lost: nothing from memory until the follower reads again."""
        self._healthy = False

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            entries=len(self._slots),
            bytes=self._bytes,
            evictions=self._evictions,
            resets=self._resets,
            live=self.live,
            position=self._position,
            lag=self._lag,
        )

    # ------------------------------------------------------------------ reads

    def lookup(self, key: EntryKey, written: LastWrites[EntryKey]) -> Hit | None:
        """The cached answer for ``key``, or None: ask the worker."""
        slot = self._slots.get(key) if self.live else None
        mine = written.get(key) if slot is not None else None
        if (
            slot is None
            or slot.confirmed_by > self._reached_end
            or (mine is not None and slot.version < mine)
            or (slot.entry is not None and _expired(slot.entry))
        ):
            self._misses += 1
            return None
        self._hits += 1
        self._slots.move_to_end(key)
        return Hit(slot.entry)

    def filling(self, keys: Iterable[EntryKey]) -> Filling | None:
        """Reads of ``keys`` go to the worker: what to keep their answers with, or None when
        they may not be kept (the follower has no position yet). ``filled`` when done."""
        if self._position is None:
            return None
        filling = Filling(self._epoch, tuple(keys))
        for key in filling.keys:
            self._fills.setdefault(key, _InFlight()).readers += 1
        return filling

    def keep(self, key: EntryKey, answer: Entry | None, filling: Filling) -> Entry | None:
        """Keep what the worker answered for ``key``, or the newer change the follower saw
        while the read was in flight, which is then the answer."""
        if filling.epoch != self._epoch:
            return answer  # the cache was reset meanwhile
        in_flight = self._fills.get(key)
        seen = in_flight.seen if in_flight is not None else None
        best = self._slots.get(key)
        if seen is not None and (best is None or best.older_than(seen.version, seen.gone)):
            best = seen
        if answer is None:
            # The worker has no value: a deletion or expiry whose version is not known, or an
            # entry never written. One the follower saw is kept as it is; a value the
            # follower saw may be older or newer than the answer, so nothing is kept;
            # otherwise it is kept tentatively (see "Entries without a value").
            if best is not None and best.gone:
                self._store(key, best)
            elif best is not None:
                self._drop(key)
            else:
                self._store(key, _Slot(_UNKNOWN, True, None, 0, self._reads_of_log + 1))
                self._to_confirm = max(self._to_confirm, self._reads_of_log + 1)
                if self._confirming is None:
                    self._confirming = asyncio.get_running_loop().create_task(
                        self._confirm(), name="near-cache-confirm"
                    )
            return None
        offered = _Slot(answer.version, False, answer, _size(answer.value))
        if best is None or best.older_than(offered.version, offered.gone):
            best = offered
        self._store(key, best)
        return best.entry

    def filled(self, filling: Filling) -> None:
        """The reads ``filling`` registered are answered (or failed)."""
        for key in filling.keys:
            in_flight = self._fills.get(key)
            if in_flight is not None:
                in_flight.readers -= 1
                if in_flight.readers <= 0:
                    del self._fills[key]

    # ------------------------------------------------------------------ the log

    async def _follow(self) -> None:
        delay = _RETRY_INITIAL
        while True:
            self._reads_of_log += 1
            number = self._reads_of_log
            try:
                page = await self._read_log(self._position, FOLLOW_WAIT)
            except Compacted as exc:
                self._reset(f"the change log was compacted past the cache: {exc.message}")
                continue
            except InvalidRequest as exc:
                # A position the worker does not know (a database restored from a backup).
                self._reset(f"the worker refused the cache's position: {exc.message}")
                continue
            except (ClientError, StateError, TimeoutError) as exc:
                if self._healthy:
                    log.info("near_cache_not_live", error=repr(exc))
                self._healthy = False
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, _RETRY_MAX)
                continue
            delay = _RETRY_INITIAL
            for change in page.changes:
                self._apply(change)
            self._position = page.next
            if not page.changes:
                self._reached_end = max(self._reached_end, number)
            self._healthy = True

    async def _confirm(self) -> None:
        """Read the log from the follower's position to its end, at once, until no tentative
        slot waits for that (see "Entries without a value")."""
        try:
            while self._to_confirm > self._reached_end and self._position is not None:
                epoch, since = self._epoch, self._position
                while epoch == self._epoch:
                    self._reads_of_log += 1
                    number = self._reads_of_log
                    page = await self._read_log(since, 0.0)
                    if epoch != self._epoch:
                        break
                    for change in page.changes:
                        self._apply(change)
                    if not page.changes:
                        self._reached_end = max(self._reached_end, number)
                        break
                    since = page.next
        except (ClientError, StateError, TimeoutError) as exc:
            # The tentative slots stay so; the next one kept tries again.
            log.info("near_cache_confirm_failed", error=repr(exc))
        finally:
            self._confirming = None

    def _reset(self, why: str) -> None:
        log.warning("near_cache_reset", reason=why, entries=len(self._slots))
        self._slots.clear()
        self._bytes = 0
        self._epoch += 1
        self._resets += 1
        self._position = None
        self._healthy = False
        for in_flight in self._fills.values():
            in_flight.seen = None

    def _apply(self, change: Change) -> None:
        key = entry_key(change.scope, change.namespace, change.key)
        gone = change.kind != "set"
        self._lag = max(0.0, time.time() - change.updated_at.timestamp())
        in_flight = self._fills.get(key)
        slot = self._slots.get(key)
        if in_flight is None and slot is None:
            return  # not an entry this client reads
        if slot is not None and slot.confirmed_by > self._reached_end:
            # A tentative "no value": this change may be older or newer than it.
            self._drop(key)
            slot = None
        if slot is not None and not slot.older_than(change.version, gone):
            return
        newer = _Slot(change.version, gone, change.entry, 0 if gone else _size(change.value))
        if in_flight is not None and (
            in_flight.seen is None or in_flight.seen.older_than(change.version, gone)
        ):
            in_flight.seen = newer
        if slot is not None:
            self._store(key, newer)

    # ------------------------------------------------------------------ memory

    def _store(self, key: EntryKey, slot: _Slot) -> None:
        old = self._slots.pop(key, None)
        if old is not None:
            self._bytes -= old.size + _SLOT_BYTES
        self._slots[key] = slot
        self._bytes += slot.size + _SLOT_BYTES
        while len(self._slots) > self.limits.entries or (
            self._bytes > self.limits.bytes and len(self._slots) > 1
        ):
            _, evicted = self._slots.popitem(last=False)
            self._bytes -= evicted.size + _SLOT_BYTES
            self._evictions += 1
        if self._bytes > self.limits.bytes:
            # One value larger than the whole cache: not kept.
            self._drop(key)

    def _drop(self, key: EntryKey) -> None:
        old = self._slots.pop(key, None)
        if old is not None:
            self._bytes -= old.size + _SLOT_BYTES


def _size(value: object) -> int:
    return len(msgspec.json.encode(value))


def _expired(entry: Entry) -> bool:
    return entry.expires_at is not None and entry.expires_at <= datetime.now(UTC)
