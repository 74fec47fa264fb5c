"""Write ids, and the memory of this client's last write per entry.

A write's id is a UUIDv7 the client makes; the contract orders the writes of an entry by
their ids (last writer wins), so one client's ids must only grow, and a conditional write
must be newer than the version it names. ``LastWrites`` is what read-your-writes rests on:
the id of the client's last write per entry, sent as ``after`` with a read.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

import uuid_utils

K = TypeVar("K", bound=Hashable)

_COUNTER_BITS: Final = 74  # rand_a (12 bits) and rand_b (62 bits) of a UUIDv7
_RAND_B_BITS: Final = 62


def next_uuid7(previous: int) -> int:
    """The smallest UUIDv7 greater than ``previous`` (as ints): its random bits plus one,
    carrying into the millisecond."""
    millis = previous >> 80
    counter = (((previous >> 64) & 0xFFF) << _RAND_B_BITS) | (previous & ((1 << _RAND_B_BITS) - 1))
    counter += 1
    if counter >> _COUNTER_BITS:
        millis, counter = millis + 1, 0
    return (
        (millis << 80)
        | (0x7 << 76)
        | ((counter >> _RAND_B_BITS) << 64)
        | (0b10 << _RAND_B_BITS)
        | (counter & ((1 << _RAND_B_BITS) - 1))
    )


class MonotonicUuid7:
    """UUIDv7s that strictly increase, even many within one millisecond or when the clock
    steps back: the contract orders one writer's writes to an entry by their ids.

    A hybrid logical clock: every version the client has read or written is ``observe``d,
    and a new id is ``max(now, the greatest seen + 1)``, so a conditional write made after
    a read always has a newer id than the version it names (``if_version`` must be older),
    even when this machine's clock is behind the writer's."""

    def __init__(self, source: Callable[[], int] = lambda: uuid_utils.uuid7().int) -> None:
        self._source = source
        self._last = 0

    def __call__(self) -> uuid.UUID:
        candidate = self._source()
        if candidate <= self._last:
            candidate = next_uuid7(self._last)
        self._last = candidate
        return uuid.UUID(int=candidate)

    def is_latest(self, value: uuid.UUID) -> bool:
        """Whether ``value`` is the last id made, none made or observed since."""
        return self._last == value.int

    def observe(self, version: uuid.UUID) -> None:
        """Never make an id older than ``version``."""
        self._last = max(self._last, version.int)


class LastWrites(Generic[K]):
    """The id of this client's last write per entry, the least recently used forgotten
    beyond ``capacity`` entries (0 remembers nothing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("remember must be zero or positive")
        self.capacity = capacity
        self._ids: OrderedDict[K, uuid.UUID] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def record(self, entry: K, write_id: uuid.UUID) -> None:
        if not self.capacity:
            return
        known = self._ids.get(entry)
        # Confirms of concurrent writes may arrive out of order: keep the newest id.
        self._ids[entry] = write_id if known is None or write_id.int > known.int else known
        self._ids.move_to_end(entry)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def get(self, entry: K) -> uuid.UUID | None:
        write_id = self._ids.get(entry)
        if write_id is not None:
            self._ids.move_to_end(entry)
        return write_id

    def drop(self, entry: K) -> None:
        self._ids.pop(entry, None)
