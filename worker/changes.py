"""The change log of protocol §8: positions, the items changes are told as, and why nothing
is ever skipped.

**Positions.** Every stored change of a plugin's entries (a set, a delete, an expiry) gets
the next position of that plugin, ``head + 1``, ``head + 2``… (``assign_positions``). The
head lives in the plugin's ``plugin_counters`` row, which every writer locks first and holds
until its commit (``worker.decisions``): so a transaction takes its positions only after
every earlier holder of the lock has committed (or rolled back, giving its numbers back),
and positions follow commit order. That is what makes reading gap-free. The trap a shared
sequence falls into (A takes 4, B takes 5, B commits, a reader moves past 5, A commits 4,
nobody ever reads 4) cannot happen: B could only take 5 after A had committed 4. A reader's
snapshot (one statement) therefore holds, for each plugin, every change up to some
position and none after it; ``read_changes`` also reads the head from that snapshot, so
``next`` never passes a change that had not committed yet.

**The log** is the version register: each entry's row carries the position of its newest
change, so the log is compacted by construction (a reader that falls behind sees an entry's
newest change, never an older one after a newer), deletions and expiries stay while their
tombstones do, and when the retention removes tombstones it raises the plugin's
``purged_through``: a reader asking from before that is answered ``compacted``.

**The feed** (``worker.relay``) publishes every change, not just the newest per entry:
each transaction also writes its changes' items to an outbox, ``plugin_state_feed``, one
row per plugin (``feed_rows``).

Positions are opaque to callers: decimal text, checked when they come back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import msgspec

from schemas.errors import InvalidRequest
from schemas.messages import ChangeItem, ChangeKind
from worker.model import EntryKey, EntryWrite
from worker.store import FeedRow

_MAX_DIGITS: Final = 19
_encoder = msgspec.json.Encoder()


def encode_position(position: int) -> str:
    return str(position)


def decode_position(text: str) -> int:
    """The position a ``since`` names, or ``invalid_request``."""
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_DIGITS:
        raise InvalidRequest("since is not a position this server gave")
    return int(text)


def assign_positions(
    stores: Sequence[EntryWrite], heads: dict[uuid.UUID, int]
) -> tuple[list[int], dict[uuid.UUID, int]]:
    """The next positions of each stored change's plugin, in order, and the new heads."""
    after = dict(heads)
    positions = []
    # Stores come grouped by plugin: look the head up once per run, comparing the ids'
    # ints (a UUID hashes and compares in Python).
    plugin: uuid.UUID | None = None
    head = 0
    for entry_write in stores:
        if plugin is None or entry_write.entry.plugin_id.int != plugin.int:
            if plugin is not None:
                after[plugin] = head
            plugin = entry_write.entry.plugin_id
            head = after[plugin]
        head += 1
        positions.append(head)
    if plugin is not None:
        after[plugin] = head
    return positions, after


def item(
    entry: EntryKey,
    change: ChangeKind,
    version: uuid.UUID,
    position: int,
    at: datetime | str,
    *,
    value_json: str | None = None,
    expires_at: datetime | None = None,
) -> ChangeItem:
    """``at``: when the change was made, or its RFC 3339 text (made once per transaction)."""
    return ChangeItem(
        position=encode_position(position),
        change=change,
        scope_kind=entry.scope_kind,  # type: ignore[arg-type]
        scope_id=entry.scope_id,
        namespace=entry.namespace,
        key=entry.key,
        version=version,
        value=msgspec.UNSET if value_json is None else msgspec.Raw(value_json.encode()),
        updated_at=at if isinstance(at, str) else at.isoformat(),
        expires_at=msgspec.UNSET if expires_at is None else expires_at.isoformat(),
    )


def feed_rows(
    stores: Sequence[EntryWrite], positions: Sequence[int], at: datetime
) -> list[FeedRow]:
    """The feed's outbox rows of a transaction's changes: one per plugin, its items as JSON
    lines in position order (a plugin's positions in a transaction run on one by one, and
    its stores come together)."""
    rows: list[FeedRow] = []
    updated_at = at.isoformat()
    plugin: uuid.UUID | None = None
    first = 0
    lines: list[bytes] = []
    for entry_write, position in zip(stores, positions, strict=True):
        if plugin is None or entry_write.entry.plugin_id.int != plugin.int:
            if plugin is not None:
                rows.append(FeedRow(plugin, first, first + len(lines) - 1, b"\n".join(lines)))
            plugin, first, lines = entry_write.entry.plugin_id, position, []
        expires_at = (
            None
            if entry_write.expires_at_ms is None
            else datetime.fromtimestamp(entry_write.expires_at_ms / 1000, tz=at.tzinfo)
        )
        lines.append(
            _encoder.encode(
                item(
                    entry_write.entry,
                    "delete" if entry_write.value_json is None else "set",
                    entry_write.version,
                    position,
                    updated_at,
                    value_json=entry_write.value_json,
                    expires_at=expires_at,
                )
            )
        )
    if plugin is not None:
        rows.append(FeedRow(plugin, first, first + len(lines) - 1, b"\n".join(lines)))
    return rows


def expiry_rows(
    swept: Sequence[tuple[EntryKey, uuid.UUID, int, datetime | None]], at: datetime
) -> list[FeedRow]:
    """The feed's rows of a sweep: each (entry, version, position, expires_at) swept."""
    lines: dict[uuid.UUID, list[tuple[int, bytes]]] = {}
    for entry, version, position, expires_at in swept:
        body = _encoder.encode(item(entry, "expire", version, position, at, expires_at=expires_at))
        lines.setdefault(entry.plugin_id, []).append((position, body))
    rows = []
    for plugin, items in lines.items():
        items.sort()
        rows.append(
            FeedRow(plugin, items[0][0], items[-1][0], b"\n".join(body for _, body in items))
        )
    return rows


def split_items(row: FeedRow) -> list[tuple[int, bytes]]:
    """A row's items with their positions; a row whose count disagrees is refused."""
    items = row.items.split(b"\n")
    if len(items) != row.last_position - row.position + 1:
        raise ValueError(
            f"the feed's row at position {row.position} of plugin {row.plugin_id} holds "
            f"{len(items)} items for positions up to {row.last_position}"
        )
    return list(zip(range(row.position, row.last_position + 1), items, strict=True))


def encode_item(change: ChangeItem) -> bytes:
    return _encoder.encode(change)
