"""Tells read-your-writes waiters that writes were committed.

Commits of this worker's consumer signal directly; commits of other workers arrive through
Postgres ``LISTEN plugin_state_commits`` (every write transaction that changes state sends a
``NOTIFY``, delivered when it commits). Waiters then re-check in one query instead of polling
Postgres in a tight loop. While the listening connection is down, waiters fall back to a
slow poll, so a lost notification costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg
import structlog

from worker.store import APPLICATION_NAME, DATABASE_FAILURES, QUERIES

log = structlog.get_logger(__name__)

CHANNEL: Final = "plugin_state_commits"
_LIVENESS_SECONDS: Final = 5.0


class CommitSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Return on the next commit, or after ``timeout`` seconds, whichever is first."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return
        finally:
            self._event.clear()


async def listen_for_commits(
    database_url: str, signal: CommitSignal, retry_initial: float, retry_max: float
) -> None:
    """Keep a LISTEN connection open (reconnecting with back-off) until cancelled."""
    delay = retry_initial
    while True:
        try:
            conn = await asyncpg.connect(
                database_url, server_settings={"application_name": f"{APPLICATION_NAME} listen"}
            )
        except DATABASE_FAILURES as exc:
            log.warning("commit_listener_connect_failed", error=repr(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max)
            continue
        delay = retry_initial
        try:
            await _listen(conn, signal)
            log.warning("commit_listener_lost")
        except DATABASE_FAILURES as exc:
            log.warning("commit_listener_failed", error=repr(exc))
        finally:
            if not conn.is_closed():
                await conn.close()


async def _listen(conn: asyncpg.Connection, signal: CommitSignal) -> None:
    """Forward notifications to ``signal`` until the connection is lost."""
    closed = asyncio.Event()
    conn.add_termination_listener(lambda _conn: closed.set())
    await conn.add_listener(CHANNEL, lambda *_args: signal.notify())
    # Writes may have committed while we were not listening.
    signal.notify()
    while not closed.is_set():
        try:
            async with asyncio.timeout(_LIVENESS_SECONDS):
                await closed.wait()
        except TimeoutError:
            # A silently dead connection is only noticed by using it.
            await conn.execute(QUERIES["ping"])
