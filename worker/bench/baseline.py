"""The naive baseline: the consumer a user would write by hand.

One message at a time: decode it, run one ``INSERT ... ON CONFLICT ... DO UPDATE`` (or one
``DELETE``) in a transaction of its own on one asyncpg connection, ack it. It keeps last
writer wins with a version comparison, as a careful user would, but skips the tombstones,
validation, authorization and batching that the worker does. Same queue setup as the
ceiling: the same bodies (of a plugin of its own), pre-filled into a quorum queue with the
commands queue's arguments, timed from the first delivery to the last ack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from worker.bench.ceiling import prefill
from worker.bench.harness import APPLICATION_NAME, BenchEnv
from worker.bench.report import Rate

# The naive consumer's two statements, as a user would write them.
NAIVE_UPSERT: Final = """
INSERT INTO plugin_state
    (plugin_id, scope_kind, scope_id, namespace, state_key, value_json, version, updated_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, now())
ON CONFLICT (plugin_id, scope_kind, scope_id, namespace, state_key) DO UPDATE
    SET value_json = EXCLUDED.value_json, version = EXCLUDED.version, updated_at = now()
    WHERE plugin_state.version < EXCLUDED.version
"""
NAIVE_DELETE: Final = """
DELETE FROM plugin_state
WHERE plugin_id = $1 AND scope_kind = $2 AND scope_id = $3 AND namespace = $4
  AND state_key = $5 AND version < $6
"""

_PREFETCH: Final = 100


async def measure_baseline(env: BenchEnv, bodies: list[bytes], bar: Callable[..., Any]) -> Rate:
    """Writes per second of the naive consumer over pre-filled ``bodies``."""
    await prefill(env, "baseline", "baseline.x", bodies, bar)
    conn = await asyncpg.connect(
        env.settings.database_url, server_settings={"application_name": APPLICATION_NAME}
    )
    channel = await env.connection.channel()
    try:
        await channel.set_qos(prefetch_count=_PREFETCH)
        queue = await channel.get_queue(env.bench_queue_name("baseline"), ensure=False)
        first = last = 0.0
        done = 0
        with bar("baseline: consume", total=len(bodies)) as progress:
            async with queue.iterator() as messages:
                async for message in messages:
                    if done == 0:
                        first = time.perf_counter()
                    command = json.loads(message.body)
                    key = (
                        command["plugin_id"],
                        command["scope_kind"],
                        command["scope_id"],
                        command["namespace"],
                        command["key"],
                    )
                    if command["op"] == "set":
                        value = json.dumps(command["value"])
                        await conn.execute(NAIVE_UPSERT, *key, value, command["id"])
                    else:
                        await conn.execute(NAIVE_DELETE, *key, command["id"])
                    await message.ack()
                    done += 1
                    progress.update(1)
                    if done == len(bodies):
                        # A synchronous round trip: the broker has processed every ack.
                        await channel.set_qos(prefetch_count=_PREFETCH)
                        last = time.perf_counter()
                        break
    finally:
        await channel.close()
        await conn.close()
    return Rate(len(bodies), last - first)
