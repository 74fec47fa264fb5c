"""Reads first: the read path's turn on the event loop it shares with the write path.

asyncio has no priorities: a read request that arrives while a batch of writes is being
decoded waits for every callback ahead of it. So the write path gives way at its yield
points (between decode slices, before each transaction, before settling) while read
requests are held unanswered, for at most ``most_wait`` seconds each time: a stream of
reads slows writes down, it never stops them.
"""

from __future__ import annotations

import asyncio
from typing import Final

MOST_WAIT: Final = 0.005
"""Longest the write path waits at one yield point for the reads to be answered."""


class ReadsFirst:
    def __init__(self, most_wait: float = MOST_WAIT) -> None:
        self.most_wait = most_wait
        self._held = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def arrived(self, count: int = 1) -> None:
        """Read requests arrived: held until ``served``."""
        self._held += count
        self._idle.clear()

    def served(self, count: int = 1) -> None:
        """Read requests were answered (or parked, or given back)."""
        self._held = max(0, self._held - count)
        if not self._held:
            self._idle.set()

    async def writes_turn(self) -> None:
        """Yield to the event loop, and wait a moment longer while reads are held."""
        if self._idle.is_set():
            await asyncio.sleep(0)
            return
        try:
            async with asyncio.timeout(self.most_wait):
                await self._idle.wait()
        except TimeoutError:
            pass
