"""The data model after validation: what the write path hands from decoding to Postgres."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, NamedTuple

from worker.auth import Caller

Outcome = Literal["applied", "superseded"]


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

    ``value_bytes`` is the size of that JSON text as sent (UTF-8), which quotas, reply
    budgets and transaction bounds count."""

    entry: EntryKey
    version: uuid.UUID
    value_json: str | None
    value_bytes: int = 0

    @property
    def is_delete(self) -> bool:
        return self.value_json is None


@dataclass(frozen=True, slots=True)
class Write:
    """A validated write command: its id, who sent it, and the entry writes it makes, in
    op order."""

    id: uuid.UUID
    plugin_id: uuid.UUID
    entries: tuple[EntryWrite, ...]
    caller: Caller

    @property
    def value_bytes(self) -> int:
        return sum(e.value_bytes for e in self.entries)


@dataclass(frozen=True, slots=True)
class EntryState:
    """What the version register holds for an entry: its newest write, and whether that
    left a value (of ``value_bytes``) or a tombstone."""

    version: uuid.UUID
    deleted: bool
    value_bytes: int = 0


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
