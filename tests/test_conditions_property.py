"""Conditional and unconditional writes, any order, any duplication, four concurrent
appliers: the outcome of applying the writes one at a time in the order they were decided.

Random streams of sets, deletes and batches over a few entries, some with ``if_absent`` or
``if_version`` (naming another write of the stream), some with a time to live (already over,
or far off), are duplicated, shuffled and split among four appliers that run concurrently on
connections of their own, in random transaction sizes. Each transaction reports where it
stands in the plugin's order (its head); replayed one transaction after another in that
order by a model written from protocol §7 alone, every write must get the outcome it was
reported (so no conditional write is ``applied`` unless its condition held then), and the
final state must be the model's. A conditional write is judged once: redelivered, it gets
the outcome of its first judgement (a conflict stays a conflict).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import codec_for
from worker.applier import Applier, TimedOut
from worker.decisions import Result
from worker.model import Conflict, Write
from worker.store import Store
from worker.validate import Rules, validate_write

from .helpers import trusted_caller, uuid7

RULES = Rules(value_max_bytes=1 << 20, retention_ms=7 * 86_400_000, future_skew_ms=300_000)
APPLIERS = 4
HOUR_MS = 3_600_000
ENTRIES: list[dict[str, Any]] = [
    {"scope_kind": "instance", "scope_id": None, "key": "lock"},
    {"scope_kind": "issue", "scope_id": "ISS-1", "key": "count"},
    {"scope_kind": "issue", "scope_id": "ISS-2", "key": "count"},
]

entry = st.integers(0, len(ENTRIES) - 1)
# (op, entry, condition: none | absent | version of the nth write, ttl: none | over | far)
op = st.tuples(
    st.sampled_from(["set", "set", "delete"]),
    entry,
    st.sampled_from([None, "absent", "absent", "version", "version"]).flatmap(
        lambda c: st.integers(0, 40) if c == "version" else st.just(c)
    ),
    st.sampled_from([None, "over", "over", "far"]),
)
writes_ = st.lists(
    st.one_of(
        op.map(lambda o: ("single", [o])),
        st.lists(op, min_size=1, max_size=3).map(lambda ops: ("batch", ops)),
    ),
    min_size=1,
    max_size=25,
)


def body(
    plugin_id: uuid.UUID, write_id: uuid.UUID, kind: str, ops: list[Any], ids: list[uuid.UUID]
) -> bytes:
    def one(name: str, index: int, condition: Any, ttl: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"op": name, **ENTRIES[index]}
        if name == "set":
            fields["value"] = {"by": str(write_id)}
            if ttl is not None:
                fields["ttl_ms"] = 1 if ttl == "over" else 24 * HOUR_MS
            if condition == "absent":
                fields["if_absent"] = True
        if isinstance(condition, int) and ids[condition % len(ids)] < write_id:
            fields["if_version"] = str(ids[condition % len(ids)])
        return fields

    if kind == "single":
        message = {"id": str(write_id), "plugin_id": str(plugin_id), **one(*ops[0])}
    else:
        message = {"op": "batch", "id": str(write_id), "plugin_id": str(plugin_id)}
        message["ops"] = [one(*o) for o in ops]
    return msgspec.json.encode(message)


@dataclass
class Model:
    """Protocol §7 on its own: per entry, the version and whether it has a value (and until
    when). ``now_ms`` is later than every "over" expiry and before every "far" one."""

    now_ms: int
    state: dict[Any, tuple[uuid.UUID, bool, int | None]] = field(default_factory=dict)
    applied: set[uuid.UUID] = field(default_factory=set)
    """Conditional writes applied so far (a redelivery is answered, not judged again)."""
    conflicted: dict[uuid.UUID, Conflict] = field(default_factory=dict)
    """Conditional writes that were a conflict: a redelivery is the same conflict, whatever
    changed since (judged again, a losing claim could win once the holder is gone)."""

    def has_value(self, key: Any) -> bool:
        found = self.state.get(key)
        return found is not None and found[1] and (found[2] is None or found[2] > self.now_ms)

    def transaction(self, writes: list[Write]) -> list[Result]:
        """Outcomes of one transaction's writes, in order; applied = made a final state."""
        outcomes: list[Result] = []
        final: dict[Any, int] = {}
        for index, write in enumerate(writes):
            outcomes.append(self._one(write, index, final))
        for origin in final.values():
            if outcomes[origin] == "superseded":
                outcomes[origin] = "applied"
        return outcomes

    def _one(self, write: Write, index: int, final: dict[Any, int]) -> Result:
        keys = [tuple(e.entry) for e in write.entries]
        versions = [self.state.get(k, (None,))[0] for k in keys]
        if write.conditional:
            if write.id in self.applied:
                return "applied" if write.id in versions else "superseded"
            if write.id in self.conflicted:
                return self.conflicted[write.id]
            conflict = self._conflict(write, keys, versions)
            if conflict is not None:
                self.conflicted[write.id] = conflict
                return conflict
        mine: set[Any] = set()
        for e, k in zip(write.entries, keys, strict=True):
            current = self.state.get(k)
            if k in mine or current is None or e.version > current[0]:
                mine.add(k)
                self.state[k] = (e.version, not e.is_delete, e.expires_at_ms)
                final[k] = index
        if write.conditional and mine:
            self.applied.add(write.id)
            return "applied"
        return "superseded"

    def _conflict(
        self, write: Write, keys: list[Any], versions: list[uuid.UUID | None]
    ) -> Conflict | None:
        for position, (e, k) in enumerate(zip(write.entries, keys, strict=True)):
            present = self.has_value(k)
            version = self.state.get(k, (None,))[0]
            if (e.if_absent and present) or (
                e.if_version is not None and (not present or version != e.if_version)
            ):
                return Conflict(position if write.batch else None)
        if all(v is not None and v >= write.id for v in versions):
            return Conflict(0 if write.batch else None)  # too old to be applied
        return None


async def scenario(database_url: str, stream: list[Any], seed: int) -> None:
    rng = random.Random(seed)
    plugin_id = uuid.uuid4()
    now_ms = int(time.time() * 1000)
    base = now_ms - HOUR_MS
    ids = [uuid7(base + rng.randrange(0, 50)) for _ in stream]
    writes = [
        validate_write(
            codec_for(None).decode_write(body(plugin_id, write_id, kind, ops, ids)),
            now_ms,
            RULES,
            trusted_caller(plugin_id),
        )
        for write_id, (kind, ops) in zip(ids, stream, strict=True)
    ]
    deliveries = writes + [rng.choice(writes) for _ in range(len(writes) // 2)]
    rng.shuffle(deliveries)
    admin = await asyncpg.connect(database_url)
    await admin.execute(
        "INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin_id, str(plugin_id)
    )
    decided: list[tuple[int, int, list[Write], list[Result | TimedOut]]] = []
    try:
        stores = [
            Store(await asyncpg.create_pool(database_url, min_size=1, max_size=1))
            for _ in range(APPLIERS)
        ]

        async def run_applier(share: list[Write], store: Store) -> None:
            applier = Applier(store, RULES.retention_ms)
            while share:
                size = rng.randint(1, 4)
                chunk, share[:] = share[:size], share[size:]
                applied = await applier.apply_transaction(chunk)
                (heads,) = applied.heads
                decided.append((heads[plugin_id], bool(applied.changed), chunk, applied.results))

        try:
            shares = [deliveries[i::APPLIERS] for i in range(APPLIERS)]
            await asyncio.gather(
                *(run_applier(s, st_) for s, st_ in zip(shares, stores, strict=True))
            )
        finally:
            for store in stores:
                await store.close()
        # In decision order: by the head each left, a transaction that changed nothing
        # after the one that set that head (it was decided later, from the same state).
        decided.sort(key=lambda t: (t[0], not t[1]))
        model = Model(int(time.time() * 1000))
        for _, _, chunk, reported in decided:
            assert reported == model.transaction(chunk), (chunk, reported)
        rows = await admin.fetch(
            "SELECT scope_kind, scope_id, namespace, state_key, version FROM plugin_state "
            "WHERE plugin_id = $1",
            plugin_id,
        )
        stored = {(plugin_id, *tuple(r)[:4]): r["version"] for r in rows}
        expected = {k: v[0] for k, v in model.state.items() if v[1]}
        assert stored == expected
    finally:
        await admin.execute("DELETE FROM plugins WHERE id = $1", plugin_id)
        await admin.close()


@settings(
    max_examples=int(os.environ.get("PLUGIN_STATE_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=writes_, seed=st.integers(0, 2**32))
def test_concurrent_conditional_writes_end_as_applied_one_at_a_time_in_decision_order(
    database_url: str, stream: list[Any], seed: int
) -> None:
    asyncio.run(scenario(database_url, stream, seed))
