"""Streams of writes with a known final state, for tests that cut things mid-stream."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import msgspec

from . import helpers
from .helpers import delete_cmd, set_cmd, state_of


@dataclass
class Stream:
    """``count`` writes over ``entries`` keys of one plugin, ids increasing."""

    plugin_id: uuid.UUID
    count: int
    entries: int = 50
    seed: int = 0
    commands: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        for n in range(self.count):
            key = f"k{rng.randrange(self.entries)}"
            if rng.random() < 0.2:
                self.commands.append(delete_cmd(self.plugin_id, key))
            else:
                self.commands.append(set_cmd(self.plugin_id, key, {"n": n, "pad": "x" * 100}))

    def expected(self) -> dict[tuple[Any, ...], Any]:
        """The last write per entry, in id order: the only correct final state."""
        state: dict[tuple[Any, ...], Any] = {}
        for command in sorted(self.commands, key=lambda c: uuid.UUID(c["id"]).bytes):
            key = ("issue", "ISS-1", "default", command["key"])
            if command["op"] == "set":
                state[key] = command["value"]
            else:
                state.pop(key, None)
        return state

    async def publish(
        self,
        channel: aio_pika.abc.AbstractChannel,
        prefix: str,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        """Publish persistent, with publisher confirms, in chunks."""
        exchange = await channel.get_exchange(prefix, ensure=False)
        selected = self.commands[start:stop]
        for offset in range(0, len(selected), 200):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            msgspec.json.encode(c),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            user_id=helpers.PUBLISHER,
                        ),
                        routing_key=f"cmd.{self.plugin_id}",
                    )
                    for c in selected[offset : offset + 200]
                )
            )

    async def some_applied(self, db: asyncpg.Pool) -> bool:
        """Whether the worker has applied any of the stream yet (to cut things mid-stream)."""
        count = await db.fetchval(
            "SELECT count(*) FROM plugin_state WHERE plugin_id = $1", self.plugin_id
        )
        return bool(count)

    async def matches(self, db: asyncpg.Pool) -> bool:
        return await state_of(db, self.plugin_id) == self.expected()
