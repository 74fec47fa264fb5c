"""Removes expired entries' rows, one worker at a time, a bounded amount per round.

An entry past its ``expires_at`` already reads as missing (every read filters on it) and a
condition sees it as absent; the sweeper only tidies up, within
``PLUGIN_STATE_EXPIRY_INTERVAL_SECONDS`` or so: it deletes the row from ``plugin_state`` and
turns the entry's register row into a tombstone at its version (protocol §7), so that an
older write cannot bring the value back, and the retention removes it like any tombstone.
The expiry is a change like any other: it takes the entry's next position in its plugin's
log and goes to the feed (``worker.changes``).
Each round is one transaction that locks the plugins it touches, as every writer does, so a
worker killed while sweeping loses nothing (the transaction is rolled back, the next round
does it again). An advisory lock keeps it to one worker at a time.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Final

import structlog

from worker import changes
from worker.config import Settings
from worker.metrics import Metrics
from worker.store import DATABASE_FAILURES, EXPIRY_LOCK, Store

log = structlog.get_logger(__name__)

SWEEP_CHUNK: Final = 1000
"""Expired entries removed per transaction."""
_ROUND_SECONDS: Final = 1.0
"""Most time one round keeps sweeping before it waits for the next interval."""


async def sweep_chunk(store: Store, feed: bool) -> list[uuid.UUID] | None:
    """Turn up to ``SWEEP_CHUNK`` expired entries into tombstones in one transaction (their
    ``expire`` changes into the feed); the plugins of each entry swept, or None when another
    worker holds the sweeper's lock."""
    async with store.write_transaction() as tx:
        if not await tx.try_lock(EXPIRY_LOCK):
            return None
        plugins = await tx.expired_plugins(SWEEP_CHUNK)
        if not plugins:
            return []
        await tx.lock_plugins(plugins)
        swept, at = await tx.sweep_expired(SWEEP_CHUNK, plugins, feed)
        if feed and at is not None:
            await tx.feed(
                changes.expiry_rows(
                    [
                        (s.entry, s.version, s.position, s.expires_at)
                        for s in swept
                        if s.position is not None
                    ],
                    at,
                )
            )
    return [s.entry.plugin_id for s in swept]


async def sweep_once(
    store: Store,
    on_swept: Callable[[Iterable[uuid.UUID]], None] = lambda _plugins: None,
    *,
    feed: bool = True,
) -> int | None:
    """One round: chunks until none is full or the round's time is up. Returns the entries
    swept, or None when another worker holds the sweeper's lock."""
    started = time.monotonic()
    total = 0
    while True:
        swept = await sweep_chunk(store, feed)
        if swept is None:
            return None if total == 0 else total
        if swept:
            on_swept(set(swept))
        total += len(swept)
        if len(swept) < SWEEP_CHUNK or time.monotonic() - started > _ROUND_SECONDS:
            return total


async def run_sweeper(
    store: Store,
    settings: Settings,
    metrics: Metrics,
    on_swept: Callable[[Iterable[uuid.UUID]], None] = lambda _plugins: None,
) -> None:
    """Sweep every ``expiry_interval_seconds`` (with jitter, so workers spread out)."""
    interval = settings.expiry_interval_seconds
    while True:
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        try:
            swept = await sweep_once(store, on_swept, feed=settings.changes)
        except DATABASE_FAILURES as exc:
            log.warning("expiry_sweep_failed", error=repr(exc))
            continue
        if swept:
            metrics.expired.inc(swept)
