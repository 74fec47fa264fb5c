"""Applies validated writes to Postgres, one bounded transaction at a time.

A batch of messages becomes one or more transactions, each bounded in entry writes and in
bytes (``transactions``): the size of a transaction follows from what it writes, not from how
many messages carried it. Each transaction locks its plugins, reads the entries it touches,
decides every write in Python (``worker.decisions``) and stores the winners in one statement.

When Postgres refuses a transaction because of what one write holds, it is split in halves
until the culprit stands alone; its transaction-mates are still applied. A transaction that
times out while Postgres answers otherwise is split the same way, so that no write can hold
a batch back for ever; a single write that keeps timing out is the caller's to judge
(``TIMED_OUT``). Failures that are not a write's fault (Postgres down, a lost
connection) propagate to the caller, who pauses and retries; any other exception (a bug)
is isolated like a data fault, its culprit answered ``internal``, so no write can stop the
consumer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import asyncpg
import structlog

from schemas.errors import Internal, InvalidRequest, StateError, UnknownPlugin, UnsupportedValue
from worker.changes import assign_positions, feed_rows
from worker.decisions import Result, decide
from worker.model import EntryKey, Write
from worker.quota import Quota
from worker.store import DATABASE_FAILURES, Store, StoreInconsistent

log = structlog.get_logger(__name__)

# SQLSTATE classes that mean "this data cannot be stored", the message's fault:
# 22 data exception, 23 integrity constraint violation, 54 program limit exceeded.
_MESSAGE_FAULTS: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    StoreInconsistent,
)
# A statement that ran out of time: asyncpg's command timeout, or Postgres' statement_timeout.
TIMEOUTS: Final = (TimeoutError, asyncpg.QueryCanceledError)
_PING_SECONDS: Final = 2.0


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The outcome of a write that timed out on its own while Postgres answered a ping: the
    caller decides whether to try again."""


TIMED_OUT: Final = TimedOut()


@dataclass(slots=True)
class Applied:
    """The outcome of each write, the entries that changed, and where each transaction
    stands in its plugins' order of writes (their heads once it was decided)."""

    results: list[Result | TimedOut]
    changed: list[EntryKey] = field(default_factory=list)
    heads: list[dict[uuid.UUID, int]] = field(default_factory=list)

    def __add__(self, other: Applied) -> Applied:
        return Applied(
            self.results + other.results, self.changed + other.changed, self.heads + other.heads
        )


def transactions(writes: Sequence[Write], max_ops: int, max_bytes: int) -> list[list[int]]:
    """Group writes, in order, into transactions of at most ``max_ops`` entry writes and
    ``max_bytes`` bytes of values; a write larger than that on its own stands alone."""
    groups: list[list[int]] = []
    ops = size = 0
    for index, write in enumerate(writes):
        write_ops, write_bytes = len(write.entries), write.value_bytes
        if groups and ops + write_ops <= max_ops and size + write_bytes <= max_bytes:
            groups[-1].append(index)
            ops += write_ops
            size += write_bytes
        else:
            groups.append([index])
            ops, size = write_ops, write_bytes
    return groups


def _classify(exc: Exception, write: Write) -> StateError:
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return UnknownPlugin(f"plugin {write.plugin_id} is not registered")
    if isinstance(exc, asyncpg.DataError):
        return UnsupportedValue(f"Postgres cannot store the value: {exc}")
    if isinstance(exc, asyncpg.ProgramLimitExceededError):
        return InvalidRequest(f"the write exceeds a limit of Postgres: {exc}")
    if isinstance(exc, StoreInconsistent):
        return Internal(f"the write could not be applied consistently: {exc}")
    return Internal(f"Postgres refused the write ({exc.sqlstate}): {exc}")  # type: ignore[attr-defined]


class Applier:
    """Turns validated writes into outcomes: applied, superseded, or a typed error."""

    def __init__(
        self,
        store: Store,
        retention_ms: int,
        quota: Quota | None = None,
        *,
        changes: bool = True,
    ) -> None:
        self.store = store
        self.retention_ms = retention_ms
        self.quota = quota or Quota()
        self.changes = changes
        """Give each stored change a position and write it to the feed (protocol §8)."""

    async def apply(self, writes: Sequence[Write]) -> list[Result | TimedOut]:
        """The outcome of each of ``writes``, applied as one transaction."""
        applied = await self.apply_transaction(writes)
        return applied.results

    async def apply_transaction(self, writes: Sequence[Write]) -> Applied:
        """Apply ``writes`` in one transaction, split to isolate a culprit or a time-out."""
        if not writes:
            return Applied([])
        try:
            return await self._attempt(writes)
        except _MESSAGE_FAULTS as exc:
            if len(writes) == 1:
                log.warning("write_refused_by_postgres", id=str(writes[0].id), error=str(exc))
                return Applied([_classify(exc, writes[0])])
            reason = type(exc).__name__
        except TIMEOUTS:
            # Postgres itself not answering is an outage, not this transaction's fault.
            await self.store.ping(timeout=_PING_SECONDS)
            if len(writes) == 1:
                log.warning("write_timed_out", id=str(writes[0].id))
                return Applied([TIMED_OUT])
            reason = "timeout"
        except DATABASE_FAILURES:
            raise  # not the writes' fault: the consumer pauses and retries
        except Exception as exc:
            # Unforeseen (a bug deciding or applying): the culprit is found like a data
            # fault's, and only it is dead-lettered, as `internal`.
            if len(writes) == 1:
                log.exception("write_handling_failed", id=str(writes[0].id))
                return Applied([Internal(f"the worker could not apply this write ({exc!r})")])
            reason = type(exc).__name__
        middle = len(writes) // 2
        log.info("transaction_split", size=len(writes), reason=reason)
        return await self.apply_transaction(writes[:middle]) + await self.apply_transaction(
            writes[middle:]
        )

    async def _attempt(self, writes: Sequence[Write]) -> Applied:
        keys = list(dict.fromkeys(e.entry for w in writes for e in w.entries))
        async with self.store.write_transaction() as tx:
            locked = await tx.lock_plugins(w.plugin_id for w in writes)
            states = await tx.read_entries(keys) if locked.usage else {}
            conditional = [w for w in writes if w.conditional]
            # Only conditional writes are looked up and recorded: unconditional ones pay
            # nothing for it.
            judged = await tx.recorded_conditional_writes(conditional) if conditional else {}
            decision = decide(
                writes, states, locked.usage, self.quota, locked.now_ms, self.retention_ms, judged
            )
            stores = decision.stores
            if self.changes and locked.now is not None:
                positions, heads = assign_positions(stores, locked.heads)
                feed = feed_rows(stores, positions, locked.now)
                await tx.write_entries(stores, decision.usage, positions, heads, feed)
            else:
                heads = locked.heads
                await tx.write_entries(stores, decision.usage, [None] * len(stores), heads, [])
            await tx.record_conditional_writes(decision.conditional)
        results: list[Result | TimedOut] = list(decision.results)
        return Applied(results, [s.entry for s in decision.stores], [heads])


__all__ = ["TIMED_OUT", "Applied", "Applier", "Result", "TimedOut", "transactions"]
