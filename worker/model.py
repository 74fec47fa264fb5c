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
    """One entry's new state at ``version``: JSON text to store, or None for a delete."""

    entry: EntryKey
    version: uuid.UUID
    value_json: str | None

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
