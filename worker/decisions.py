"""What one write transaction does, decided in Python against the entries' locked state.

Pure: the writes of the transaction in delivery order, what the version register holds for
every entry they touch, each plugin's usage, the quota, the database's clock and the
staleness cut-off in; an outcome per write, the entry writes to store and each plugin's
change of usage out.

Why deciding in Python is exact: the transaction first locks the ``plugin_counters`` row of
every plugin it writes (in plugin order, so transactions cannot deadlock), and every writer of
a plugin's entries (the applier, the expiry sweeper, the retention, plugin removal) takes that
lock first. So once the locks are held nobody else changes those entries until commit: the
state read after locking is the state the writes meet, and the outcome computed here is the
outcome of applying the writes one at a time. Writes are taken in delivery order; each is
judged against the state the earlier ones left:

- last writer wins: an entry write takes effect when its version (the write's UUIDv7) is
  greater than the entry's; within one batch message, a later op on the same entry replaces
  an earlier one; an equal version from another message is a redelivery and changes nothing;
- a write older than the tombstone retention by the database's clock is ``stale`` (judged
  here, at apply time, so that a batch retried through a long outage cannot bring back an
  entry whose tombstone the retention removed meanwhile);
- a conditional write (protocol §7) is judged once: how (applied, or a conflict) is
  recorded in ``plugin_state_conditional_writes`` in the same transaction, and a redelivery
  is answered from that record, never judged again: a conflict stays the same ``Conflict``
  (judged again, an ``if_absent`` claim that lost could win once the holder's value is
  gone: two winners), an applied write is ``applied`` while it is still an entry's version
  and ``superseded`` once newer writes overtook it. A first delivery's conditions, all
  judged against the state before it, decide: ``if_absent`` holds when the
  entry has no value (never written, deleted, or expired by the database's clock),
  ``if_version`` when it has a value written by exactly that write; one failing condition,
  or a write too old to win any of its entries, makes the whole write a ``Conflict`` that
  changes nothing. So a conditional write is never ``superseded`` unless it was applied, and
  a client retrying on ``conflict`` neither loses nor doubles a change;
- a write that would take its plugin over a quota is ``quota_exceeded`` and changes nothing.

A write is ``applied`` when it made the final state of at least one entry, else
``superseded``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from schemas.errors import Stale, StateError, UnknownPlugin
from worker.model import (
    Conflict,
    EntryKey,
    EntryState,
    EntryWrite,
    Judged,
    Outcome,
    Usage,
    Write,
)
from worker.quota import Quota

Result = Outcome | Conflict | StateError


@dataclass(slots=True)
class Decision:
    """The outcome of each write, and what to store."""

    results: list[Result]
    stores: list[EntryWrite]
    """The entry writes that won, one per entry, in key order."""
    usage: dict[uuid.UUID, Usage] = field(default_factory=dict)
    """Each plugin's change of usage."""
    conditional: list[tuple[Write, Judged]] = field(default_factory=list)
    """The conditional writes judged now (applied or a conflict), to record."""


def state_after(write: EntryWrite) -> EntryState:
    if write.is_delete:
        return EntryState(write.version, True)
    return EntryState(write.version, False, write.value_bytes, write.expires_at_ms)


def _wins(write: EntryWrite, current: EntryState | None) -> bool:
    return current is None or write.version > current.version


def _holds(write: EntryWrite, current: EntryState | None, now_ms: int) -> bool:
    has_value = current is not None and current.has_value(now_ms)
    if write.if_absent:
        return not has_value
    if write.if_version is not None:
        return has_value and current is not None and current.version == write.if_version
    return True


def _conditional(
    write: Write,
    current: Mapping[EntryKey, EntryState | None],
    now_ms: int,
    judged_before: Judged | None,
) -> Result | None:
    """The outcome of a conditional write decided before it changes anything, or None when
    its conditions hold and it is applied as any write."""
    before = [current.get(e.entry) for e in write.entries]
    if isinstance(judged_before, Conflict):
        return judged_before
    if judged_before == "applied":
        still = any(s is not None and s.version == write.id for s in before)
        return "applied" if still else "superseded"
    for index, (entry_write, state) in enumerate(zip(write.entries, before, strict=True)):
        if not _holds(entry_write, state, now_ms):
            return Conflict(index if write.batch else None)
    if not any(_wins(e, s) for e, s in zip(write.entries, before, strict=True)):
        # Older than every entry's version (a delete newer than an if_absent, say): it can
        # never be applied, and saying `superseded` would pass for a redelivery.
        return Conflict(0 if write.batch else None)
    return None


def decide(
    writes: Sequence[Write],
    states: Mapping[EntryKey, EntryState | None],
    usage: Mapping[uuid.UUID, Usage],
    quota: Quota,
    now_ms: int,
    retention_ms: int,
    judged_before: Mapping[uuid.UUID, Judged] | None = None,
) -> Decision:
    """Decide every write of one transaction (see the module's docstring).
    ``judged_before``: how those of its conditional writes that were judged earlier were.

    It runs while the transaction holds its plugins' locks, for every write: the usage
    arithmetic is done on plain ints and versions are compared as ints."""
    current: dict[EntryKey, EntryState | None] = dict(states)
    final: dict[EntryKey, tuple[EntryWrite, int]] = {}
    # By the ids' ints: a UUID hashes and compares in Python, an int in C.
    used = {plugin.int: plugin_usage for plugin, plugin_usage in usage.items()}
    results: list[Result] = []
    judged: dict[uuid.UUID, Judged] = dict(judged_before or {})
    recorded: list[tuple[Write, Judged]] = []
    oldest = now_ms - retention_ms
    for index, write in enumerate(writes):
        results.append("superseded")
        plugin = write.plugin_id.int
        if plugin not in used:
            results[index] = UnknownPlugin(f"plugin {write.plugin_id} is not registered")
            continue
        if write.id.int >> 80 < oldest:
            results[index] = Stale(
                f"id {write.id} is older than the tombstone retention of "
                f"{retention_ms // 1000} s by the database's clock when it was applied"
            )
            continue
        conditional = write.conditional
        if conditional:
            decided = _conditional(write, current, now_ms, judged.get(write.id))
            if isinstance(decided, Conflict) and write.id not in judged:
                judged[write.id] = decided
                recorded.append((write, decided))
            if decided is not None:
                results[index] = decided
                continue
        staged = _staged(write, current)
        if not staged:
            continue
        before = used[plugin]
        after = _after(before, staged.values())
        refused = quota.check(write.plugin_id, before, after) if quota.enabled else None
        if refused is not None:
            results[index] = refused
            continue
        used[plugin] = after
        for key, (entry_write, _) in staged.items():
            current[key] = state_after(entry_write)
            final[key] = (entry_write, index)
        if conditional:
            results[index] = "applied"
            judged[write.id] = "applied"
            recorded.append((write, "applied"))
    for _, origin in final.values():
        if results[origin] == "superseded":
            results[origin] = "applied"
    return Decision(
        results=results,
        stores=[final[key][0] for key in sorted(final, key=_sort_key)],
        usage={
            plugin: used[plugin.int] - plugin_usage
            for plugin, plugin_usage in usage.items()
            if used[plugin.int] != plugin_usage
        },
        conditional=recorded,
    )


def _staged(
    write: Write, current: Mapping[EntryKey, EntryState | None]
) -> dict[EntryKey, tuple[EntryWrite, EntryState | None]]:
    """The entry writes of ``write`` that win, each with what its entry held before."""
    staged: dict[EntryKey, tuple[EntryWrite, EntryState | None]] = {}
    for entry_write in write.entries:
        key = entry_write.entry
        if key in staged:
            # A later op of the same write wins over an earlier one.
            staged[key] = (entry_write, staged[key][1])
            continue
        state = current.get(key)
        if state is None or entry_write.version.int > state.version.int:
            staged[key] = (entry_write, state)
    return staged


def _after(before: Usage, staged: Iterable[tuple[EntryWrite, EntryState | None]]) -> Usage:
    """A plugin's usage once these entry writes replaced what their entries held
    (``Usage.of`` each state, in plain ints)."""
    entries, size, tombstones = before.entries, before.bytes, before.tombstones
    for entry_write, state in staged:
        if state is not None:
            if state.deleted:
                tombstones -= 1
            else:
                entries -= 1
                size -= state.value_bytes
        if entry_write.value_json is None:
            tombstones += 1
        else:
            entries += 1
            size += entry_write.value_bytes
    return Usage(entries, size, tombstones)


def _sort_key(key: EntryKey) -> tuple[int, str, str, str, str]:
    # Deterministic statements (the plugin locks already rule out deadlocks between them).
    # A UUID's int sorts as its bytes do.
    return (key.plugin_id.int, key.scope_kind, key.scope_id or "", key.namespace, key.key)
