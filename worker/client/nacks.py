"""A publish the broker nacks is tried again, on a fresh channel, a bounded number of times.

A nack is not always the broker's last word on a message. While a quorum queue elects a new
leader (its node went down, or it moved), a publisher's confirms are nacked; a channel
opened during the election may go on being nacked until it is closed. So a nacked publish
is sent again with back-off, and the channel that nacked it is replaced first. Only a run
of ``ATTEMPTS`` nacks is a refusal (``PublishRefused``): the commands queue is full
(``x-overflow: reject-publish``) and stays so, or the queue has no leader for that long.
Sending a write again is safe: it carries its UUIDv7 id, and a duplicate changes nothing.

Used by the client's calls (``connection``) and by ``dead replay`` (``worker.dead_letters``).
"""

from __future__ import annotations

import time
from typing import Final

from .errors import PublishRefused

ATTEMPTS: Final = 8
"""Nacks in a row before a publish is refused: about 4 s of back-off, longer than a quorum
queue's leader election on a healthy cluster."""
RETRY_INITIAL: Final = 0.05
RETRY_MAX: Final = 1.0


class NackRun:
    """The nacks of one publish so far, and the pause before it is sent again."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self._pause = RETRY_INITIAL
        self._started = time.monotonic()

    def nacked(self) -> float:
        """One more nack: the seconds to wait before sending again, or ``PublishRefused``
        once the run is long enough to be a refusal."""
        self.count += 1
        if self.count >= ATTEMPTS:
            raise self.refusal()
        pause, self._pause = self._pause, min(self._pause * 2, RETRY_MAX)
        return pause

    def refusal(self) -> PublishRefused:
        return PublishRefused(
            f"the broker nacked the message {self.count} times in "
            f"{time.monotonic() - self._started:.1f}s, each time on a fresh channel "
            f"({self.where}): the queue is full (x-overflow reject-publish) or has no leader"
        )
