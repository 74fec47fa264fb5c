"""Per-plugin quotas on entries and stored bytes (off unless configured).

Pure: given each plugin's usage, the current size of the entries a batch touches and the
batch's writes in order, decide which writes would take their plugin over a quota. Deletes
and writes that shrink usage are always allowed, so a plugin over its quota can clean up.
Under concurrent workers the check is approximate by at most one batch per worker: usage is
read before the batch is applied, not under a lock, so quotas never serialize writers.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas.errors import QuotaExceeded
from worker.model import EntryKey, Write


@dataclass(frozen=True, slots=True)
class Quota:
    max_entries: int = 0
    """Most entries per plugin; 0 means no limit."""
    max_bytes: int = 0
    """Most bytes of values' JSON text per plugin; 0 means no limit."""

    @property
    def enabled(self) -> bool:
        return bool(self.max_entries or self.max_bytes)


def check_quota(
    quota: Quota,
    writes: Sequence[Write],
    usage: Mapping[uuid.UUID, tuple[int, int]],
    sizes: Mapping[EntryKey, int | None],
) -> list[QuotaExceeded | None]:
    """One result per write: None if it fits, else the error. ``sizes`` holds the stored
    size of every entry the writes touch (None when the entry has no value)."""
    used = {plugin: list(u) for plugin, u in usage.items()}
    current = dict(sizes)
    results: list[QuotaExceeded | None] = []
    for write in writes:
        entries_delta = bytes_delta = 0
        after: dict[EntryKey, int | None] = {}
        for entry_write in write.entries:
            before = after.get(entry_write.entry, current.get(entry_write.entry))
            new = None if entry_write.value_json is None else len(entry_write.value_json.encode())
            entries_delta += (new is not None) - (before is not None)
            bytes_delta += (new or 0) - (before or 0)
            after[entry_write.entry] = new
        plugin_usage = used.setdefault(write.plugin_id, [0, 0])
        entries_after = plugin_usage[0] + entries_delta
        bytes_after = plugin_usage[1] + bytes_delta
        over = []
        if quota.max_entries and entries_delta > 0 and entries_after > quota.max_entries:
            over.append(f"{entries_after} entries (limit {quota.max_entries})")
        if quota.max_bytes and bytes_delta > 0 and bytes_after > quota.max_bytes:
            over.append(f"{bytes_after} bytes (limit {quota.max_bytes})")
        if over:
            results.append(
                QuotaExceeded(f"plugin {write.plugin_id} would hold " + " and ".join(over))
            )
            continue
        plugin_usage[0] += entries_delta
        plugin_usage[1] += bytes_delta
        current.update(after)
        results.append(None)
    return results
