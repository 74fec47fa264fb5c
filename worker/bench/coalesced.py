"""Coalesced writes from one client: what the Python client's coalescing buys end to end.

One ``StateClient`` (coalescing on, its defaults) fires ``count`` fire-and-forget sets over
the bench's entries as fast as it can (``asyncio.gather`` over chunks), at one running
worker. The clock starts at the first call and stops when the version register holds every
entry's final id (the id the last set of each entry returned: its batch's), as the other
throughput phases check. A warm-up write that waits for its ``applied`` reply first makes
sure the worker is consuming, so start-up is not counted.

The calls return long before the worker has applied their writes (a few messages carry
thousands of them), so the check runs while the worker works, on the same cores: it looks
only at the entries not yet seen at their final id (an entry at its final id stays there),
and starts at most every three times its own duration, so that it never takes more than a
third of a core from what it measures (it took 17 ms every 20 ms over 10,000 entries).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Final, cast

from schemas.messages import ScopeKind
from worker.bench.harness import BenchEnv, Process, wait_for
from worker.bench.report import Rate
from worker.bench.workload import EntryName, json_value
from worker.client import Scope, StateClient

CHUNK: Final = 5000
"""Calls in flight at once: enough to keep the batches full."""
_POLL: Final = 0.02
ENTRIES_AT: Final = """
SELECT f.n FROM unnest($2::text[], $3::text[], $4::text[], $5::uuid[]) WITH ORDINALITY
    AS f (scope_kind, scope_id, state_key, version, n)
WHERE f.version = (
    SELECT v.version FROM plugin_state_versions v
    WHERE v.plugin_id = $1 AND v.scope_kind = f.scope_kind AND v.scope_id = f.scope_id
      AND v.namespace = 'default' AND v.state_key = f.state_key
)
"""
"""Which of these entries (every bench entry has a scope id) the register holds at these
ids, by their 1-based place in the arrays. One probe of the register's unique index per
entry, in a subquery the planner cannot turn into a join: as a join, the generic plan
that a prepared statement ends up with (it takes a plugin for one row) scanned the whole
function for each of the plugin's rows, seconds per check."""


async def measure_coalesced(
    env: BenchEnv,
    worker: Process,
    plugin_id: uuid.UUID,
    count: int,
    entries: list[EntryName],
    bar: Callable[..., Any],
) -> Rate:
    """Writes per second from one coalescing client, from the first call to the last
    commit."""
    rng = random.Random(5)
    # Made before the clock starts: the phase measures the client and the worker, not this.
    writes = [(rng.choice(entries), json_value(rng, n)) for n in range(count)]
    final: dict[EntryName, uuid.UUID] = {}
    settings = env.settings
    async with StateClient(env.amqp_url, plugin_id, prefix=settings.prefix, timeout=60.0) as client:
        await client.set(Scope.instance(), "warm-up", True, wait=True)
        with bar("coalesced writes: publish", total=count) as progress:
            started = time.perf_counter()
            for begin in range(0, count, CHUNK):
                chunk = writes[begin : begin + CHUNK]
                ids = await asyncio.gather(
                    *(
                        client.set(
                            Scope(cast(ScopeKind, entry.scope_kind), entry.scope_id),
                            entry.key,
                            value,
                        )
                        for entry, value in chunk
                    )
                )
                final.update(zip((entry for entry, _ in chunk), ids, strict=True))
                progress.update(len(chunk))
    # Many entries share one batch's id: each entry is matched on its key and its id.
    pending = list(final.items())
    next_check = 0.0

    async def all_applied() -> bool:
        nonlocal pending, next_check
        checked = time.perf_counter()
        if checked < next_check:
            return False
        rows = await env.pool.fetch(
            ENTRIES_AT,
            plugin_id,
            [e.scope_kind for e, _ in pending],
            [e.scope_id for e, _ in pending],
            [e.key for e, _ in pending],
            [write_id for _, write_id in pending],
        )
        seen = {row["n"] - 1 for row in rows}
        pending = [item for n, item in enumerate(pending) if n not in seen]
        next_check = checked + 3 * (time.perf_counter() - checked)
        return not pending

    finished = await wait_for(
        all_applied,
        timeout=60.0 + count / 100,
        what="the coalesced writes to be applied",
        interval=_POLL,
        alive=worker.check_alive,
    )
    return Rate(count, finished - started)
