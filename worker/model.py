"""The data model after validation: what the write path hands from decoding to Postgres."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, NamedTuple

from worker.auth import Caller

Outcome = Literal["applied", "superseded"]


@dataclass(frozen=True, slots=True)
class Conflict:
    """The outcome of a conditional write whose condition did not hold (protocol §7):
    nothing changed. ``failed_op`` is the first failing op of a batch."""

    failed_op: int | None = None


Judged = Literal["applied"] | Conflict
"""How a conditional write was judged the first time it was decided, recorded so that a
redelivery is answered alike, never judged again (protocol §7)."""


class EntryKey(NamedTuple):
    """The identity of one state entry (protocol §1)."""

    plugin_id: uuid.UUID
    scope_kind: str
    scope_id: str | None
    namespace: str
    key: str


@dataclass(frozen=True, slots=True)
class EntryWrite:
    """One entry's new state at ``version``: JSON text to store, or None for a delete.

    ``value_bytes`` bounds the size of that JSON text as reads return it, which quotas,
    reply budgets and transaction bounds count. A set may expire (``expires_at_ms``, Unix
    ms) and a write may be conditional (``if_version``, ``if_absent``: protocol §7)."""

    entry: EntryKey
    version: uuid.UUID
    value_json: str | None
    value_bytes: int = 0
    expires_at_ms: int | None = None
    if_version: uuid.UUID | None = None
    if_absent: bool = False

    @property
    def is_delete(self) -> bool:
        return self.value_json is None

    @property
    def conditional(self) -> bool:
        return self.if_absent or self.if_version is not None


@dataclass(frozen=True, slots=True)
class Write:
    """A validated write command: its id, who sent it, and the entry writes it makes, in
    op order."""

    id: uuid.UUID
    plugin_id: uuid.UUID
    entries: tuple[EntryWrite, ...]
    caller: Caller
    batch: bool = False
    """A ``batch`` message (its conflicts name the failing op)."""

    @property
    def value_bytes(self) -> int:
        return sum(e.value_bytes for e in self.entries)

    @property
    def conditional(self) -> bool:
        return any(e.conditional for e in self.entries)


@dataclass(frozen=True, slots=True)
class EntryState:
    """What the version register holds for an entry: its newest write, and whether that
    left a value (of ``value_bytes``, expiring at ``expires_at_ms``) or a tombstone."""

    version: uuid.UUID
    deleted: bool
    value_bytes: int = 0
    expires_at_ms: int | None = None

    def has_value(self, now_ms: int) -> bool:
        """A value that has not expired (an expired one reads as missing at once)."""
        return not self.deleted and (self.expires_at_ms is None or self.expires_at_ms > now_ms)


@dataclass(frozen=True, slots=True)
class Usage:
    """A plugin's stored entries, their bytes of JSON, and its tombstones."""

    entries: int = 0
    bytes: int = 0
    tombstones: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.entries + other.entries,
            self.bytes + other.bytes,
            self.tombstones + other.tombstones,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.entries - other.entries,
            self.bytes - other.bytes,
            self.tombstones - other.tombstones,
        )

    @staticmethod
    def of(state: EntryState | None) -> Usage:
        """What one entry in ``state`` counts for (nothing when it has no register row)."""
        if state is None:
            return Usage()
        if state.deleted:
            return Usage(tombstones=1)
        return Usage(entries=1, bytes=state.value_bytes)
