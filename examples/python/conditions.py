"""Conditional writes: a counter that loses no increment, and a claim only one holder wins.

python examples/python/conditions.py "$PLUGIN"
"""

import asyncio
import os
import sys
import uuid

from worker.client import Conflict, Scope, StateClient

AMQP_URL = os.environ.get("PLUGIN_STATE_AMQP_URL", "amqp://guest:guest@localhost:5672/")
PREFIX = os.environ.get("PLUGIN_STATE_PREFIX", "plugin_state")


async def main(plugin_id: uuid.UUID) -> None:
    async with StateClient(AMQP_URL, plugin_id, prefix=PREFIX) as state:
        issue = Scope.issue("ISS-42")
        for _ in range(3):  # a read-modify-write, retried on conflict by update()
            await state.update(issue, "retries", lambda e: (e.value if e else 0) + 1)
        counter = await state.get(issue, "retries")
        print("retries", counter and counter.value)

        run = Scope.run("R-7")
        await state.set(run, "owner", "worker-a", if_absent=True, ttl=30)
        try:
            await state.set(run, "owner", "worker-b", if_absent=True, ttl=30)
        except Conflict:
            owner = await state.get(run, "owner")
            print("worker-b lost the claim to", owner and owner.value)


if __name__ == "__main__":
    asyncio.run(main(uuid.UUID(sys.argv[1])))
