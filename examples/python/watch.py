"""Follow a scope's changes: first its current entries, then every change as it commits.

python examples/python/watch.py "$PLUGIN"
"""

import asyncio
import os
import sys
import uuid

from worker.client import Change, Reset, Scope, StateClient, Synced

AMQP_URL = os.environ.get("PLUGIN_STATE_AMQP_URL", "amqp://guest:guest@localhost:5672/")
PREFIX = os.environ.get("PLUGIN_STATE_PREFIX", "plugin_state")


async def main(plugin_id: uuid.UUID) -> None:
    async with StateClient(AMQP_URL, plugin_id, prefix=PREFIX) as state:
        issue = Scope.issue("ISS-7")
        await state.set(issue, "status", "open", wait=True)
        async for event in state.watch(issue, namespace="default"):
            match event:
                case Change(kind="set"):  # the current entries first, then every change
                    print(event.key, event.value)
                    if event.value == "closed":
                        break  # a real watcher goes on for ever
                case Change():  # kind "delete" or "expire"
                    print(event.key, "gone")
                case Synced():  # caught up; event.position resumes from here
                    await state.set(issue, "status", "closed")
                case Reset():  # the log was compacted past us: entries follow again
                    pass


if __name__ == "__main__":
    asyncio.run(main(uuid.UUID(sys.argv[1])))
