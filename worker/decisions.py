"""What one write transaction does, decided in Python against the entries' locked state.

Pure: the writes of the transaction in delivery order, what the version register holds for
every entry they touch, each plugin's usage, the quota and the staleness cut-off in; an
outcome per write, the entry writes to store and each plugin's change of usage out.

Why deciding in Python is exact: the transaction first locks the ``plugin_counters`` row of
every plugin it writes (in plugin order, so transactions cannot deadlock), and every writer of
a plugin's entries (the applier, the expiry sweeper, the retention, plugin removal) takes that
lock first. So once the locks are held nobody else changes those entries until commit: the
state read after locking is the state the writes meet, and the outcome computed here is the
outcome Postgres would reach one write at a time. Writes are taken in delivery order; each is
judged against the state the earlier ones left:

- last writer wins: an entry write takes effect when its version (the write's UUIDv7) is
  greater than the entry's; within one batch message, a later op on the same entry replaces
  an earlier one; an equal version from another message is a redelivery and changes nothing;
- a write older than the tombstone retention by the database's clock is ``stale`` (judged
  here, at apply time, so that a batch retried through a long outage cannot bring back an
  entry whose tombstone the retention removed meanwhile);
- a write that would take its plugin over a quota is ``quota_exceeded`` and changes nothing.

A write is ``applied`` when it made the final state of at least one entry, else
``superseded``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.errors import Stale, StateError, UnknownPlugin
from worker.model import EntryKey, EntryState, EntryWrite, Outcome, Usage, Write
from worker.quota import Quota

Result = Outcome | StateError


@dataclass(slots=True)
class Decision:
    """The outcome of each write, and what to store."""

    results: list[Result]
    stores: list[EntryWrite]
    """The entry writes that won, one per entry, in key order."""
    before: dict[EntryKey, EntryState | None]
    """What each stored entry held before the transaction."""
    usage: dict[uuid.UUID, Usage] = field(default_factory=dict)
    """Each plugin's change of usage."""


def state_after(write: EntryWrite) -> EntryState:
    return EntryState(write.version, write.is_delete, 0 if write.is_delete else write.value_bytes)


def _wins(write: EntryWrite, current: EntryState | None) -> bool:
    return current is None or write.version > current.version


def decide(
    writes: Sequence[Write],
    states: Mapping[EntryKey, EntryState | None],
    usage: Mapping[uuid.UUID, Usage],
    quota: Quota,
    cutoff_ms: int,
    retention_ms: int,
) -> Decision:
    """Decide every write of one transaction (see the module's docstring)."""
    current: dict[EntryKey, EntryState | None] = dict(states)
    final: dict[EntryKey, tuple[EntryWrite, int]] = {}
    used = dict(usage)
    results: list[Result] = []
    for index, write in enumerate(writes):
        results.append("superseded")
        if write.plugin_id not in usage:
            results[index] = UnknownPlugin(f"plugin {write.plugin_id} is not registered")
            continue
        if write.id.int >> 80 < cutoff_ms:
            results[index] = Stale(
                f"id {write.id} is older than the tombstone retention of "
                f"{retention_ms // 1000} s by the database's clock when it was applied"
            )
            continue
        staged: dict[EntryKey, EntryWrite] = {}
        for entry_write in write.entries:
            if entry_write.entry in staged or _wins(entry_write, current.get(entry_write.entry)):
                staged[entry_write.entry] = entry_write
        if not staged:
            continue
        change = Usage()
        for key, entry_write in staged.items():
            change = change + Usage.of(state_after(entry_write)) - Usage.of(current.get(key))
        before = used[write.plugin_id]
        refused = quota.check(write.plugin_id, before, before + change) if quota.enabled else None
        if refused is not None:
            results[index] = refused
            continue
        used[write.plugin_id] = before + change
        for key, entry_write in staged.items():
            current[key] = state_after(entry_write)
            final[key] = (entry_write, index)
    for _, origin in final.values():
        results[origin] = "applied"
    stores = [final[key][0] for key in sorted(final, key=_sort_key)]
    return Decision(
        results=results,
        stores=stores,
        before={s.entry: states.get(s.entry) for s in stores},
        usage={
            plugin: used[plugin] - usage[plugin]
            for plugin in usage
            if used[plugin] != usage[plugin]
        },
    )


def _sort_key(key: EntryKey) -> tuple[bytes, str, str, str, str]:
    # Deterministic statements (the plugin locks already rule out deadlocks between them).
    return (key.plugin_id.bytes, key.scope_kind, key.scope_id or "", key.namespace, key.key)
