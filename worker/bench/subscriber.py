"""The FastStream peer: the subscriber a FastStream user would write instead of the worker, as a
process of its own (its own event loop and CPU), as the bench's other servers are.

    python -m worker.bench.subscriber AMQP_URL QUEUE DATABASE_URL COUNT REPORT_PATH

It consumes QUEUE, which the bench declared (a quorum queue with the commands queue's
arguments), with FastStream's defaults wherever FastStream has one: every message is decoded
and validated into a pydantic model before its handler runs, in a task of its own, and acked
alone after the handler returned (``AckPolicy.REJECT_ON_ERROR``). The handler runs the naive
baseline's statement, one upsert or one delete (``baseline.NAIVE_UPSERT``, ``NAIVE_DELETE``),
through an asyncpg pool of asyncpg's default size.

FastStream's RabbitMQ subscriber has no ``max_workers``: every delivery gets its task, so its
concurrency is the channel's prefetch, which FastStream leaves unlimited (RabbitMQ would push
the whole queue at once). ``PREFETCH`` is what a user following RabbitMQ's advice sets.
Service messages are logged at ``WARNING`` and above, as ``faststream run --log-level
warning`` (and the worker in the bench) do, not one line per message.

After COUNT handled messages it stops and writes REPORT_PATH (JSON): its settings, when its
first handler started, its CPU time from then to the last commit, and when each key's last
write committed (``time.time()`` when the handler's autocommitted statement returned).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg
from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from pydantic import BaseModel

from worker.bench.baseline import NAIVE_DELETE, NAIVE_UPSERT

PREFETCH: Final = 100
"""Unacknowledged messages, so handlers running, at once (RabbitMQ suggests 100 to 300)."""
POOL_SIZE: Final = 10
"""asyncpg's default ``max_size``: what ``asyncpg.create_pool(url)`` gives."""


class StateWrite(BaseModel):
    """A write command as a FastStream user types it; FastStream validates each message into it."""

    op: Literal["set", "delete"]
    id: uuid.UUID
    plugin_id: uuid.UUID
    scope_kind: str
    scope_id: str | None = None
    namespace: str = "default"
    key: str
    value: Any = None


@dataclass
class Record:
    """What the bench reads back: the window of the run and every key's commit time."""

    count: int
    handled: int = 0
    first: float = 0.0
    cpu_first: float = 0.0
    cpu_last: float = 0.0
    commits: dict[str, float] = field(default_factory=dict)

    def started(self) -> None:
        if not self.first:
            self.first = time.time()
            self.cpu_first = time.process_time()

    def committed(self, key: str) -> bool:
        """Count one handled message; true when it was the last one."""
        self.commits[key] = time.time()
        self.handled += 1
        if self.handled < self.count:
            return False
        self.cpu_last = time.process_time()
        return True

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": {
                "faststream": metadata.version("faststream"),
                "prefetch": PREFETCH,
                "pool_size": POOL_SIZE,
            },
            "first": self.first,
            "cpu_seconds": self.cpu_last - self.cpu_first,
            "commits": self.commits,
        }


async def serve(amqp_url: str, queue: str, database_url: str, count: int) -> Record:
    """Handle ``count`` messages of ``queue``, then stop."""
    record = Record(count)
    quiet = logging.getLogger("worker.bench.subscriber")
    quiet.setLevel(logging.WARNING)
    broker = RabbitBroker(amqp_url, default_channel=Channel(prefetch_count=PREFETCH), logger=quiet)
    app = FastStream(broker, logger=quiet)
    async with asyncpg.create_pool(database_url, max_size=POOL_SIZE) as pool:

        @broker.subscriber(RabbitQueue(queue, declare=False))
        async def on_write(write: StateWrite) -> None:
            record.started()
            key = (write.plugin_id, write.scope_kind, write.scope_id, write.namespace, write.key)
            if write.op == "set":
                await pool.execute(NAIVE_UPSERT, *key, json.dumps(write.value), write.id)
            else:
                await pool.execute(NAIVE_DELETE, *key, write.id)
            if record.committed(write.key):
                app.exit()

        await app.run(log_level=logging.WARNING)
    if record.handled < count:
        raise SystemExit(f"stopped after {record.handled} of {count} messages")
    return record


if __name__ == "__main__":
    from worker.loop import run_async

    arguments = sys.argv[1:]
    if len(arguments) != 5:
        raise SystemExit(__doc__)
    amqp, queue_name, database, messages, report = arguments
    handled = run_async(serve(amqp, queue_name, database, int(messages)))
    Path(report).write_text(json.dumps(handled.as_json()))
