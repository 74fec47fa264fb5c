"""Per-plugin quotas on entries, stored bytes and tombstones (off unless configured).

Usage is kept exact in ``plugin_counters``, in the same transaction as the writes, under the
plugin's row lock (see ``worker.decisions``): a quota is never overshot, whatever the number
of workers. A write that only shrinks what a limit counts is always allowed, so a plugin over
its quota can still clean up: deleting an entry lowers its entries and bytes (it raises its
tombstones, so a plugin at its tombstone quota deletes after the retention frees some).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.errors import QuotaExceeded
from worker.model import Usage

if TYPE_CHECKING:
    from worker.config import Settings


@dataclass(frozen=True, slots=True)
class Quota:
    max_entries: int = 0
    """Most entries per plugin; 0 means no limit."""
    max_bytes: int = 0
    """Most bytes of values' JSON text per plugin; 0 means no limit."""
    max_tombstones: int = 0
    """Most tombstones per plugin; 0 means no limit."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Quota:
        return cls(settings.quota_entries, settings.quota_bytes, settings.quota_tombstones)

    @property
    def enabled(self) -> bool:
        return bool(self.max_entries or self.max_bytes or self.max_tombstones)

    def check(self, plugin_id: uuid.UUID, before: Usage, after: Usage) -> QuotaExceeded | None:
        """None when going from ``before`` to ``after`` keeps every limit it raises."""
        over = []
        for name, limit, was, now in (
            ("entries", self.max_entries, before.entries, after.entries),
            ("bytes", self.max_bytes, before.bytes, after.bytes),
            ("tombstones", self.max_tombstones, before.tombstones, after.tombstones),
        ):
            if limit and now > was and now > limit:
                over.append(f"{now} {name} (limit {limit})")
        if not over:
            return None
        return QuotaExceeded(f"plugin {plugin_id} would hold " + " and ".join(over))
