"""Removes tombstones past the retention, one worker at a time.

Writes older than the retention are rejected as ``stale`` (``worker.validate``), so once a
tombstone is older than that no write that could resurrect its entry is accepted anymore.
The cut-off keeps an extra ``future_skew`` margin for workers whose clocks disagree, and is
judged by the database's clock, as staleness is when a write is applied (``worker.decisions``):
both sides of the rule read the same clock. Each round locks the plugins whose tombstones it
removes, as every writer does, and updates their counters.
"""

from __future__ import annotations

import asyncio
import random
from typing import Final

import structlog

from worker.config import Settings
from worker.store import DATABASE_FAILURES, Store

log = structlog.get_logger(__name__)

PURGE_CHUNK: Final = 5000


async def purge_once(store: Store, settings: Settings) -> int | None:
    """One round: returns tombstones removed, or None if another worker is on it."""
    cutoff = settings.retention_seconds + settings.future_skew_seconds
    await store.purge_conditional_writes(cutoff)
    total = 0
    while True:
        removed = await store.purge_tombstones(cutoff, PURGE_CHUNK)
        if removed is None:
            return None if total == 0 else total
        total += removed
        if removed < PURGE_CHUNK:
            return total


async def run_retention(store: Store, settings: Settings) -> None:
    """Purge every ``retention_interval_seconds`` (with jitter, so workers spread out)."""
    interval = settings.retention_interval_seconds
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        try:
            removed = await purge_once(store, settings)
        except DATABASE_FAILURES as exc:
            log.warning("retention_failed", error=repr(exc))
            continue
        if removed:
            log.info("tombstones_purged", count=removed)
