"""Applies a batch of validated writes to Postgres: last writer wins, per entry.

The batch becomes one set-based transaction. When Postgres refuses the batch because of
what one write holds, the batch is split in halves until the culprit stands alone; its
batch-mates are still applied. Failures that are not a write's fault (Postgres down, a lost
connection) propagate to the caller, who pauses and retries the whole batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from schemas.errors import Internal, StateError, UnknownPlugin, UnsupportedValue
from worker.auth import Authorizer
from worker.model import EntryKey, EntryWrite, Outcome, Write
from worker.plugins import PluginDirectory
from worker.quota import Quota, check_quota
from worker.store import Store

log = structlog.get_logger(__name__)

Result = Outcome | StateError

# SQLSTATE classes that mean "this data cannot be stored", the message's fault:
# 22 data exception, 23 integrity constraint violation, 54 program limit exceeded.
_MESSAGE_FAULTS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The entry writes to send, each entry once, and which write each came from."""

    entries: list[EntryWrite]
    origin: list[int]


def plan(writes: Sequence[Write], indices: Sequence[int]) -> _Plan:
    """Keep, per entry, the newest write: greatest id, and within one batch the later op.

    Postgres cannot upsert one row twice in a statement, and the newest write would win
    there anyway; the rest are superseded without a round trip.
    """
    best: dict[EntryKey, tuple[uuid.UUID, int, EntryWrite, int]] = {}
    for index in indices:
        for position, entry_write in enumerate(writes[index].entries):
            current = best.get(entry_write.entry)
            # A later op of the same batch (same id) replaces an earlier one; an equal id
            # from another message is a redelivered duplicate and changes nothing.
            if (
                current is None
                or entry_write.version > current[0]
                or (
                    entry_write.version == current[0]
                    and current[3] == index
                    and position > current[1]
                )
            ):
                best[entry_write.entry] = (entry_write.version, position, entry_write, index)
    return _Plan(
        entries=[item[2] for item in best.values()],
        origin=[item[3] for item in best.values()],
    )


def _classify(exc: Exception, write: Write) -> StateError:
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return UnknownPlugin(f"plugin {write.plugin_id} is not registered")
    if isinstance(
        exc, asyncpg.UntranslatableCharacterError | asyncpg.CharacterNotInRepertoireError
    ):
        return UnsupportedValue(f"Postgres cannot store the value: {exc}")
    return Internal(f"Postgres refused the write ({exc.sqlstate}): {exc}")  # type: ignore[attr-defined]


class Applier:
    """Turns validated writes into outcomes: applied, superseded, or a typed error."""

    def __init__(
        self,
        store: Store,
        authorizer: Authorizer,
        quota: Quota | None = None,
        plugins: PluginDirectory | None = None,
    ) -> None:
        self.store = store
        self.plugins = plugins or PluginDirectory(store, ttl_seconds=0)
        self.authorizer = authorizer
        self.quota = quota or Quota()

    async def apply(self, writes: Sequence[Write]) -> list[Result]:
        results: list[Result | None] = [None] * len(writes)
        owners = await self.plugins.owners(w.plugin_id for w in writes)
        candidates = []
        for index, write in enumerate(writes):
            refused = self.authorizer.check(write.caller, write.plugin_id, owners, "cmd")
            if refused is None:
                candidates.append(index)
            else:
                results[index] = refused
        if self.quota.enabled and candidates:
            candidates = await self._within_quota(writes, candidates, results)
        await self._apply(writes, candidates, results)
        return [r if r is not None else Internal("write was not applied") for r in results]

    async def _within_quota(
        self, writes: Sequence[Write], indices: list[int], results: list[Result | None]
    ) -> list[int]:
        chosen = [writes[i] for i in indices]
        usage = await self.store.plugin_usage(list({w.plugin_id for w in chosen}))
        touched = list({e.entry for w in chosen for e in w.entries})
        lookups = await self.store.lookup_entries([(entry, None) for entry in touched])
        sizes = {
            entry: None if lookup.value is None else len(lookup.value.value_json.encode())
            for entry, lookup in zip(touched, lookups, strict=True)
        }
        allowed = []
        for index, error in zip(
            indices, check_quota(self.quota, chosen, usage, sizes), strict=True
        ):
            if error is None:
                allowed.append(index)
            else:
                results[index] = error
        return allowed

    async def _apply(
        self, writes: Sequence[Write], indices: list[int], results: list[Result | None]
    ) -> None:
        if not indices:
            return
        batch_plan = plan(writes, indices)
        try:
            won = await self.store.apply_entries(batch_plan.entries)
        except _MESSAGE_FAULTS as exc:
            if len(indices) == 1:
                write = writes[indices[0]]
                results[indices[0]] = _classify(exc, write)
                log.warning("write_refused_by_postgres", id=str(write.id), error=str(exc))
                return
            middle = len(indices) // 2
            log.info("batch_split", size=len(indices), error=type(exc).__name__)
            await self._apply(writes, indices[:middle], results)
            await self._apply(writes, indices[middle:], results)
            return
        for index in indices:
            results[index] = "superseded"
        for entry_write, index in zip(batch_plan.entries, batch_plan.origin, strict=True):
            if entry_write.entry in won:
                results[index] = "applied"
