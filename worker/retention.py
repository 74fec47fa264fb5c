"""Removes tombstones past the retention, one worker at a time.

Writes older than the retention are rejected as ``stale`` (``worker.validate``), so once a
tombstone is older than that no write that could resurrect its entry is accepted anymore.
The cut-off keeps an extra ``future_skew`` margin for workers whose clocks disagree.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Final

import structlog

from worker.config import Settings
from worker.store import DATABASE_FAILURES, Store
from worker.validate import uuid7_floor

log = structlog.get_logger(__name__)

PURGE_CHUNK: Final = 5000


async def purge_once(store: Store, settings: Settings, now: float) -> int | None:
    """One round: returns tombstones removed, or None if another worker is on it."""
    cutoff_ms = int(now * 1000) - (settings.retention_seconds + settings.future_skew_seconds) * 1000
    cutoff = uuid7_floor(cutoff_ms)
    total = 0
    while True:
        removed = await store.purge_tombstones(cutoff, PURGE_CHUNK)
        if removed is None:
            return None if total == 0 else total
        total += removed
        if removed < PURGE_CHUNK:
            return total


async def run_retention(
    store: Store, settings: Settings, clock: Callable[[], float] = time.time
) -> None:
    """Purge every ``retention_interval_seconds`` (with jitter, so workers spread out)."""
    interval = settings.retention_interval_seconds
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        try:
            removed = await purge_once(store, settings, clock())
        except DATABASE_FAILURES as exc:
            log.warning("retention_failed", error=repr(exc))
            continue
        if removed:
            log.info("tombstones_purged", count=removed)
