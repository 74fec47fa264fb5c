"""Which plugins exist and which RabbitMQ user each belongs to, as the hot paths see it.

Every write batch and every read burst needs this; asking Postgres each time would add a
round trip to each of them. Registered plugins are remembered for
``plugin_cache_seconds``; ids not found are asked again every time, so a plugin registered
a moment ago is seen at once. The price: a plugin removed or given another ``amqp_user`` is
seen as it was for up to that long (a removed plugin's writes still fail on the foreign
key, as ``unknown_plugin``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from worker.store import Store


class PluginDirectory:
    def __init__(
        self, store: Store, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.ttl = ttl_seconds
        self.clock = clock
        self._known: dict[uuid.UUID, tuple[str | None, float]] = {}

    async def owners(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str | None]:
        """The registered plugins among ``ids``, each with its ``amqp_user``."""
        now = self.clock()
        found: dict[uuid.UUID, str | None] = {}
        missing = []
        for plugin_id in set(ids):
            cached = self._known.get(plugin_id)
            if cached is not None and cached[1] > now:
                found[plugin_id] = cached[0]
            else:
                missing.append(plugin_id)
        if missing:
            fresh = await self.store.plugin_owners(missing)
            found.update(fresh)
            if self.ttl > 0:
                expires = now + self.ttl
                self._known.update((p, (user, expires)) for p, user in fresh.items())
        return found
