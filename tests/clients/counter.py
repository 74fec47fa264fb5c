"""Increments one entry ``COUNT`` times through ``StateClient.update`` and exits 0.

python -m tests.clients.counter AMQP_URL PLUGIN_ID PREFIX COUNT
"""

from __future__ import annotations

import asyncio
import sys

from worker.client import Scope, StateClient


async def main(amqp_url: str, plugin_id: str, prefix: str, count: int) -> None:
    async with StateClient(amqp_url, plugin_id, prefix=prefix, timeout=30) as state:
        for _ in range(count):
            await state.update(
                Scope.instance(),
                "counter",
                lambda entry: (entry.value if entry is not None else 0) + 1,
                attempts=10_000,
            )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
