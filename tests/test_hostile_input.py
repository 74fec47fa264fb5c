"""Hostile input through a running worker: every message ends as a stored value equal to
what was sent, or as a dead letter with a code; nothing sticks, loops or is altered."""

from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas.errors import ERRORS_BY_CODE
from worker.topology import Names

from . import helpers
from .conftest import StartWorker
from .helpers import queue_messages, set_cmd, uuid7, wait_until

BODIES = int(os.environ.get("PLUGIN_STATE_FUZZ_EXAMPLES", "300"))

METACHARACTERS = [
    "'",
    '"',
    "\\",
    "%",
    "_",
    "--",
    ";",
    "/*",
    "*/",
    "{",
    "}",
    "[",
    "]",
    "$1",
    ":",
    ",",
    "'; DROP TABLE plugins; --",
    "' OR '1'='1",
    "\u2028",
    "\u00e9",
    "\U0001f600",
    "\t",
    "\n",
    "__proto__x",
    "null",
    "true",
    "0",
    '{"op":"delete"}',
]
names = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
    st.lists(st.sampled_from(METACHARACTERS), min_size=1, max_size=4).map("".join),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)
wrong_types = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def hostile_bodies(
    draw: st.DrawFn, plugin_id: uuid.UUID
) -> tuple[dict[str, Any] | None, bytes, str]:
    """(the command as meant, or None when unknowable, the bytes sent, their content type)."""
    command = set_cmd(
        plugin_id,
        draw(names),
        draw(json_values),
        scope_id=draw(names),
        namespace=draw(names),
    )
    how = draw(st.sampled_from(["as-is", "as-is", "wrong-type", "corrupt", "deep", "msgpack"]))
    if how == "wrong-type":
        field = draw(st.sampled_from(sorted(command)))
        command = {**command, field: draw(wrong_types)}
    if how == "deep":
        depth = draw(st.integers(50, 3000))
        deep = "[" * depth + "1" + "]" * depth
        body = msgspec.json.encode({**command, "value": "DEEP"}).replace(b'"DEEP"', deep.encode())
        # Compared as text: too deep for a recursive comparison of decoded values.
        return {**command, "value": DeepText(deep)}, body, "application/json"
    if how == "msgpack":
        try:
            return command, msgspec.msgpack.encode(command), "application/msgpack"
        except OverflowError:  # MessagePack has no integers past 64 bits: send JSON
            return command, msgspec.json.encode(command), "application/json"
    if how == "corrupt":
        # What a corrupted body names is unknowable, so it is made older than every other
        # write: if it survives as a write, it can never win over one of them.
        body = msgspec.json.encode({**command, "id": str(uuid7(int(time.time() * 1000) - 60_000))})
        at = draw(st.integers(0, len(body) - 1))
        garbage = draw(st.sampled_from([b"\x80", b"\xff\xfe", b"\x00", b"", b"\\u0000", b"1e999"]))
        body = body[:at] + garbage + body[at + draw(st.integers(0, 3)) :]
        return None, body, "application/json"
    return command, msgspec.json.encode(command), "application/json"


class DeepText(str):
    """A value sent as this exact JSON text (jsonb renders nested one-item arrays alike)."""


def same_json(sent: Any, stored: Any) -> bool:
    """Equal as JSON values: jsonb keeps numbers as decimals, so 1e300 comes back as an
    integer that equals the float sent, and -0.0 as 0."""
    if isinstance(sent, bool) or isinstance(stored, bool):
        return sent is stored
    if isinstance(sent, int | float) and isinstance(stored, int | float):
        if isinstance(sent, int) and isinstance(stored, int):
            return sent == stored
        return math.isclose(float(sent), float(stored), rel_tol=1e-15, abs_tol=0.0) or (
            float(sent) == float(stored)
        )
    if isinstance(sent, list) and isinstance(stored, list):
        return len(sent) == len(stored) and all(map(same_json, sent, stored))
    if isinstance(sent, dict) and isinstance(stored, dict):
        return sent.keys() == stored.keys() and all(same_json(sent[k], stored[k]) for k in sent)
    return bool(sent == stored)


async def test_hostile_input_ends_stored_unaltered_or_dead_lettered_with_a_code(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    cases: list[tuple[dict[str, Any] | None, bytes, str]] = []

    @settings(
        max_examples=BODIES,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(hostile_bodies(plugin_id))
    def collect(case: tuple[dict[str, Any] | None, bytes, str]) -> None:
        cases.append(case)

    collect()
    # One batch applied at a time: concurrent batches of one plugin may commit in any order,
    # and the sentinel below must come last.
    worker = await start_worker(apply_concurrency=1)
    exchange = await amqp.get_exchange(prefix, ensure=False)
    for n, (_, body, content_type) in enumerate(cases):
        await exchange.publish(
            aio_pika.Message(
                body, content_type=content_type, correlation_id=str(n), user_id=helpers.PUBLISHER
            ),
            routing_key=f"cmd.{plugin_id}",
        )
    # One consumer applying one batch at a time takes the queue in order: once this last
    # write is applied, every message before it has been applied or dead-lettered.
    sentinel = set_cmd(plugin_id, "sentinel", True, write_id=uuid7())
    await helpers.publish(amqp, prefix, plugin_id, sentinel)

    async def sentinel_applied() -> bool:
        return bool(
            await db.fetchval(
                "SELECT count(*) FROM plugin_state WHERE plugin_id=$1 AND state_key='sentinel'",
                plugin_id,
            )
        )

    await wait_until(sentinel_applied, timeout=60, what="the sentinel write")
    dead = {m.correlation_id: m for m in await queue_messages(amqp, Names(prefix).dead)}
    rows = await db.fetch(
        "SELECT scope_id, namespace, state_key, value_json FROM plugin_state WHERE plugin_id=$1",
        plugin_id,
    )
    stored = {(r["scope_id"], r["namespace"], r["state_key"]): r["value_json"] for r in rows}
    outcomes: dict[str, int] = {}
    writers: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for n, (command, _, _) in enumerate(cases):
        letter = dead.get(str(n))
        if letter is not None:
            code = str((letter.headers or {})["x-reject-code"])
            assert code in ERRORS_BY_CODE, code
            outcomes[code] = outcomes.get(code, 0) + 1
            continue
        outcomes["stored"] = outcomes.get("stored", 0) + 1
        if command is None:
            continue  # a corrupted body that still made a valid write, somewhere
        key = (command["scope_id"], command["namespace"], command["key"])
        assert key in stored, f"message {n} was neither stored nor dead-lettered: {command!r}"
        writers.setdefault(key, []).append(command)
    print(f"{len(cases)} hostile messages: {outcomes}")
    for key, commands in writers.items():
        # Where hostile messages share an entry, the newest id is what must be stored.
        newest = max(commands, key=lambda c: uuid.UUID(c["id"]).bytes)
        if isinstance(newest["value"], DeepText):
            assert stored[key] == newest["value"]
        else:
            assert same_json(newest["value"], msgspec.json.decode(stored[key])), (
                newest["value"],
                stored[key],
            )
    commands_queue = await amqp.declare_queue(Names(prefix).commands_queue, passive=True)
    assert commands_queue.declaration_result.message_count == 0
    assert worker.metrics.value("plugin_state_writes_total", outcome="rejected") == len(dead)
