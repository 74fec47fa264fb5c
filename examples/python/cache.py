"""Read through a near cache: repeated reads of an entry come from memory, kept current by
the plugin's change log; `fresh=True` asks the worker anyway.

python examples/python/cache.py "$PLUGIN"
"""

import asyncio
import os
import sys
import uuid

from worker.client import CacheLimits, Scope, StateClient

AMQP_URL = os.environ.get("PLUGIN_STATE_AMQP_URL", "amqp://guest:guest@localhost:5672/")
PREFIX = os.environ.get("PLUGIN_STATE_PREFIX", "plugin_state")


async def main(plugin_id: uuid.UUID) -> None:
    limits = CacheLimits(entries=10_000)
    async with StateClient(AMQP_URL, plugin_id, prefix=PREFIX, cache=limits) as state:
        scope = Scope.instance()
        await state.set(scope, "settings", {"theme": "dark"}, wait=True)
        for _ in range(100):
            entry = await state.get(scope, "settings")  # the worker once, then memory
        print("settings", entry.value if entry else None)
        await state.set(scope, "settings", {"theme": "light"})
        entry = await state.get(scope, "settings")  # never older than this client's write
        print("after a write", entry.value if entry else None)
        entry = await state.get(scope, "settings", fresh=True)  # asks the worker anyway
        print("fresh", entry.value if entry else None)
        stats = state.cache_stats()  # hits, misses, hit_rate, lag, ...
        assert stats is not None


if __name__ == "__main__":
    asyncio.run(main(uuid.UUID(sys.argv[1])))
