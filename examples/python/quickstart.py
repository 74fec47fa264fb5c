"""Write, read, batch and list a plugin's state with the Python client.

PLUGIN=$(plugin-state-worker plugins add --key my-plugin --amqp-user guest)
python examples/python/quickstart.py "$PLUGIN"
"""

import asyncio
import os
import sys
import uuid

from worker.client import Scope, StateClient, op_delete, op_set

AMQP_URL = os.environ.get("PLUGIN_STATE_AMQP_URL", "amqp://guest:guest@localhost:5672/")
PREFIX = os.environ.get("PLUGIN_STATE_PREFIX", "plugin_state")


async def main(plugin_id: uuid.UUID) -> None:
    async with StateClient(AMQP_URL, plugin_id, prefix=PREFIX) as state:
        issue = Scope.issue("ISS-42")
        await state.set(issue, "cursor", {"page": 3})  # returns the write id
        entry = await state.get(issue, "cursor")  # reads its own write
        assert entry is not None and entry.value == {"page": 3}
        await state.batch(
            [op_set(issue, "seen", True), op_delete(Scope.instance(), "token")],
            wait=True,  # applied, not only queued: the list below sees it
        )
        async for item in state.list(issue):  # pages for you
            print(item.key, item.value)


if __name__ == "__main__":
    asyncio.run(main(uuid.UUID(sys.argv[1])))
