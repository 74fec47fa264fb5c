"""Any order, any duplication, any number of concurrent appliers: the same final state.

Random streams of set/delete/batch over a few entries are duplicated, shuffled, split among
four appliers that run concurrently on their own connections, each in random batch sizes.
The stored state must equal applying the distinct writes in UUIDv7 order, one at a time.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import codec_for
from worker.applier import Applier
from worker.model import Write
from worker.store import Store
from worker.validate import Rules, validate_write

from .helpers import trusted_caller, uuid7

NOW_MS = 1_800_000_000_000
RULES = Rules(value_max_bytes=1 << 20, retention_ms=7 * 86_400_000, future_skew_ms=300_000)
APPLIERS = 4

# A few entries, one of them instance-scoped (scope_id NULL), to force collisions.
ENTRIES: list[dict[str, Any]] = [
    {"scope_kind": "instance", "scope_id": None, "key": "token"},
    {"scope_kind": "issue", "scope_id": "ISS-1", "key": "cursor"},
    {"scope_kind": "issue", "scope_id": "ISS-2", "key": "cursor"},
    {"scope_kind": "project", "scope_id": "P", "key": "cursor", "namespace": "ns"},
]

entry_index = st.integers(0, len(ENTRIES) - 1)
single_op = st.tuples(st.sampled_from(["set", "delete"]), entry_index, st.integers(0, 99))
write_op = st.one_of(
    single_op.map(lambda op: ("single", [op])),
    st.lists(single_op, min_size=1, max_size=4).map(lambda ops: ("batch", ops)),
)


def command(plugin_id: uuid.UUID, write_id: uuid.UUID, kind: str, ops: list[Any]) -> bytes:
    def body(op: str, entry: int, value: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"op": op, **ENTRIES[entry]}
        if op == "set":
            fields["value"] = {"v": value, "by": str(write_id)}
        return fields

    if kind == "single":
        message = {"id": str(write_id), "plugin_id": str(plugin_id), **body(*ops[0])}
    else:
        message = {
            "op": "batch",
            "id": str(write_id),
            "plugin_id": str(plugin_id),
            "ops": [body(*op) for op in ops],
        }
    return msgspec.json.encode(message)


def model(writes: list[Write]) -> dict[tuple[Any, ...], Any]:
    """Apply the distinct writes one at a time in UUIDv7 order: the expected final state."""
    state: dict[tuple[Any, ...], Any] = {}
    for write in sorted(writes, key=lambda w: w.id.bytes):
        for entry_write in write.entries:
            key = tuple(entry_write.entry)[1:]
            if entry_write.value_json is None:
                state.pop(key, None)
            else:
                state[key] = msgspec.json.decode(entry_write.value_json)
    return state


async def scenario(database_url: str, stream: list[Any], seed: int) -> None:
    rng = random.Random(seed)
    plugin_id = uuid.uuid4()
    writes = []
    for position, (kind, ops) in enumerate(stream):
        # Ids within a few milliseconds: many share a millisecond and order by random bits.
        write_id = uuid7(NOW_MS + position % 3)
        body = command(plugin_id, write_id, kind, ops)
        command_ = codec_for(None).decode_write(body)
        writes.append(validate_write(command_, NOW_MS, RULES, trusted_caller(plugin_id)))
    deliveries = writes + [rng.choice(writes) for _ in range(len(writes) // 2)]
    rng.shuffle(deliveries)
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(
            "INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin_id, str(plugin_id)
        )
        shares = [deliveries[i::APPLIERS] for i in range(APPLIERS)]

        async def run_applier(share: list[Write], store: Store) -> None:
            applier = Applier(store, RULES.retention_ms)
            while share:
                size = rng.randint(1, 5)
                chunk, share[:] = share[:size], share[size:]
                await applier.apply(chunk)

        stores = [
            Store(await asyncpg.create_pool(database_url, min_size=1, max_size=1))
            for _ in range(APPLIERS)
        ]
        try:
            await asyncio.gather(
                *(run_applier(share, store) for share, store in zip(shares, stores, strict=True))
            )
        finally:
            for store in stores:
                await store.close()
        rows = await admin.fetch(
            "SELECT scope_kind, scope_id, namespace, state_key, value_json, version "
            "FROM plugin_state WHERE plugin_id = $1",
            plugin_id,
        )
        stored = {
            (r["scope_kind"], r["scope_id"], r["namespace"], r["state_key"]): msgspec.json.decode(
                r["value_json"]
            )
            for r in rows
        }
        assert stored == model(writes)
        for row in rows:
            assert row["value_json"] and str(row["version"]) in row["value_json"]
    finally:
        await admin.execute("DELETE FROM plugins WHERE id = $1", plugin_id)
        await admin.close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=st.lists(write_op, min_size=1, max_size=25), seed=st.integers(0, 2**32))
def test_concurrent_appliers_reach_the_state_of_applying_in_uuidv7_order(
    database_url: str, stream: list[Any], seed: int
) -> None:
    asyncio.run(scenario(database_url, stream, seed))
