"""A hostile soak through two running worker processes (protocol §4, last paragraph).

A steady stream of good writes, and among them a few percent of hostile messages: bodies
from the fuzzers' strategies (any MessagePack, any JSON, deep nesting), AMQP properties no
client sends (timestamps past 9999, strings that are not UTF-8, header tables thousands
deep), bodies of several MiB, reads that would amplify (one large entry named a thousand
times, lists of large entries, waits for writes that never come) and ``reply_to`` queues
that are not the caller's. ``PLUGIN_STATE_SOAK_SECONDS`` long (20 in CI; ``make fuzz``: 600).

At the end: both workers are the processes that started (never restarted, still on their
first broker connection), every good write is applied, every hostile write is dead-lettered
with exactly the code the fuzz target predicts, no reply went anywhere but to its caller,
and each worker's peak memory stayed under the bench's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import aio_pika
import asyncpg
import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic

from schemas.errors import StateError
from worker.config import Settings
from worker.topology import Names, declare

from . import frames, helpers
from .broker import connections_named, require_rabbitmqctl
from .fuzz import strategies
from .fuzz.target import PLUGIN as TARGET_PLUGIN
from .fuzz.target import encode_input, one_delivery
from .helpers import get_request, queue_messages, set_cmd, state_of, uuid7, wait_until
from .processes import peak_rss, spawn_worker, tree
from .rpc import RawRpc

SOAK_SECONDS: Final = float(os.environ.get("PLUGIN_STATE_SOAK_SECONDS", "20"))
HOSTILE_SHARE: Final = 0.04
RSS_BOUND: Final = 200 * 1024 * 1024
"""The bench's bound on a worker's peak resident memory."""
TARGET_ID: Final = strategies._ID


def hostile_writes(count: int) -> list[tuple[bytes, str, str]]:
    """(body, content type, the code the fuzz target predicts) of writes the worker must
    refuse: generated, then kept only when the target refuses them."""
    candidates: list[tuple[bytes, str]] = []

    @settings(
        max_examples=count * 4,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(
        st.one_of(
            strategies.msgpack_commands().map(lambda b: (b, "application/msgpack")),
            strategies.json_commands().map(lambda b: (b, "application/json")),
        )
    )
    def collect(case: tuple[bytes, str]) -> None:
        if b"if_version" not in case[0]:
            # Its version was made at the target's clock: against a fresh id (below) its
            # verdict would change. The fuzz tests judge these.
            candidates.append(case)

    collect()
    # Judged here, not inside the test Hypothesis runs: it raises the interpreter's
    # recursion limit there, so a body nested thousands deep decodes (and is refused) there
    # otherwise than in a worker, which keeps the default limit.
    kept: list[tuple[bytes, str, str]] = []
    for body, content_type in candidates:
        data = encode_input(body, Basic.Properties(content_type=content_type))
        outcome = one_delivery(data)
        # Nesting within a few frames of the interpreter's limit is refused one way or
        # another depending on how deep the stack already is: keep what is refused alike
        # from here and from much deeper (as in a worker's and a test's stacks).
        deeper = _from_deeper(functools.partial(one_delivery, data))
        if (
            isinstance(outcome, StateError)
            and isinstance(deeper, StateError)
            and outcome.code == deeper.code
            and len(kept) < count
        ):
            kept.append((body, content_type, outcome.code))
    return kept


def _from_deeper(call: Any, frames_left: int = 100) -> Any:
    return call() if frames_left == 0 else _from_deeper(call, frames_left - 1)


def for_plugin(body: bytes, plugin_id: uuid.UUID, write_id: uuid.UUID) -> bytes:
    """The body aimed at the soak's plugin with a fresh id: same lengths, so MessagePack
    sizes still hold."""
    return body.replace(str(TARGET_PLUGIN).encode(), str(plugin_id).encode()).replace(
        TARGET_ID.encode(), str(write_id).encode()
    )


async def connections_of(worker: int) -> int:
    """The broker connections of a worker's processes (``worker.supervisor``)."""
    return len(await connections_named(*(f":{pid}:" for pid in tree(worker))))


@dataclass
class Soak:
    """What the soak sent, and what it must find afterwards."""

    amqp: aio_pika.abc.AbstractChannel
    rpc: RawRpc
    prefix: str
    plugin_id: uuid.UUID
    victim: str
    hostile: list[tuple[bytes, str, str]]
    rng: random.Random = field(default_factory=lambda: random.Random(9))
    good: dict[str, Any] = field(default_factory=dict)
    expected_dead: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    replies: list[asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = field(
        default_factory=list
    )

    async def run(self, seconds: float) -> int:
        big = set_cmd(self.plugin_id, "big", "x" * (1024 * 1024 - 100), scope_id="BIG")
        await helpers.publish(self.amqp, self.prefix, self.plugin_id, big)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            key = f"g{n % 200}"
            self.good[key] = set_cmd(self.plugin_id, key, {"n": n}, scope_id="GOOD")
            await helpers.publish(self.amqp, self.prefix, self.plugin_id, self.good[key])
            if self.rng.random() < HOSTILE_SHARE:
                self.count(await one_hostile(self))
            if n % 50 == 0:
                await asyncio.sleep(0.01)
        return n

    def count(self, kind: str) -> None:
        self.sent[kind] += 1
        if kind.startswith("write:"):
            self.expected_dead[kind.removeprefix("write:")] += 1
        elif kind in ("foreign-write", "foreign-read", "read-without-reply-to"):
            self.expected_dead["invalid_request"] += 1
        elif kind == "unreadable-properties":
            self.expected_dead["invalid_message"] += 1

    async def settle(self, db: asyncpg.Pool) -> None:
        expected = {("issue", "GOOD", "default", k): c["value"] for k, c in self.good.items()}

        async def applied() -> bool:
            stored = await state_of(db, self.plugin_id)
            return {k: v for k, v in stored.items() if k[1] == "GOOD"} == expected

        await wait_until(applied, timeout=90, what="every good write applied")
        answered = await asyncio.gather(*(asyncio.wait_for(r, 30) for r in self.replies))
        assert len(answered) == len(self.replies), "every amplifying read is answered"
        dead = Names(self.prefix).dead

        async def all_dead() -> bool:
            queue = await self.amqp.declare_queue(dead, passive=True)
            return (queue.declaration_result.message_count or 0) >= sum(self.expected_dead.values())

        # On a time-out the letters' own check below says which are missing.
        with contextlib.suppress(AssertionError):
            await wait_until(all_dead, timeout=60, what="every hostile write dead-lettered")

    async def check_dead_letters(self) -> None:
        letters = await queue_messages(self.amqp, Names(self.prefix).dead)
        for letter in letters:
            label = letter.correlation_id or ""
            if label.startswith("hostile-"):
                predicted = self.hostile[int(label.removeprefix("hostile-"))][2]
                assert (letter.headers or {}).get("x-reject-code") == predicted, letter.headers
        codes = Counter(str((m.headers or {}).get("x-reject-code")) for m in letters)
        print(f"soak: dead letters by code {dict(codes)}")
        sent_hostile = Counter(
            str(m.correlation_id)
            for m in letters
            if (m.correlation_id or "").startswith("hostile-")
        )
        assert codes == self.expected_dead, (
            f"expected {dict(self.expected_dead)}, sent {dict(self.sent)}, "
            f"hostile letters {sum(sent_hostile.values())}"
        )
        victim = await self.amqp.declare_queue(self.victim, passive=True)
        assert victim.declaration_result.message_count == 0, "a reply went elsewhere"


async def test_a_hostile_soak_through_two_workers_leaves_them_standing(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    require_rabbitmqctl()
    await declare(amqp, settings)
    hostile = hostile_writes(60)
    workers = [spawn_worker(settings), spawn_worker(settings)]
    pids = [w.pid for w in workers]
    victim = await amqp.declare_queue(f"pstest_victim_{uuid.uuid4().hex[:8]}", exclusive=True)
    try:
        async with RawRpc(settings.amqp_url, settings.prefix) as rpc:
            await wait_until(lambda: rpc.answering(plugin_id), what="the workers to serve")
            # Each worker's write path's connection and its read path's.
            assert [await connections_of(pid) for pid in pids] == [2, 2]
            soak = Soak(amqp, rpc, settings.prefix, plugin_id, victim.name, hostile)
            good = await soak.run(SOAK_SECONDS)
            print(f"soak: {good} good writes, hostile {dict(soak.sent)}")
            await soak.settle(db)
        await soak.check_dead_letters()
        assert all(w.poll() is None for w in workers), "a worker stopped"
        assert [await connections_of(pid) for pid in pids] == [2, 2], "a worker reconnected"
        rss = [peak_rss(process) for pid in pids for process in tree(pid)]
        print(f"soak: peak RSS of each process {[f'{r / 1e6:.0f} MB' for r in rss]}")
        assert max(rss) < RSS_BOUND
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)


def read(plugin_id: uuid.UUID, key: str, **fields: Any) -> dict[str, Any]:
    return get_request(plugin_id, key, scope_id="BIG", **fields)


async def one_hostile(soak: Soak) -> str:
    """Send one hostile message; returns what kind it was."""
    rng, amqp, rpc, prefix = soak.rng, soak.amqp, soak.rpc, soak.prefix
    plugin_id, hostile, victim, replies = soak.plugin_id, soak.hostile, soak.victim, soak.replies
    kind = rng.choice(
        ["write"] * 6
        + ["unreadable-properties", "odd-properties", "huge-body", "foreign-write", "foreign-read"]
        + ["read-without-reply-to", "amplifying-get-many", "amplifying-list", "never-met-after"]
    )
    cmd = f"cmd.{plugin_id}"
    if kind == "write":
        index = rng.randrange(len(hostile))
        body, content_type, code = hostile[index]
        raw = for_plugin(body, plugin_id, uuid7())
        await frames.publish_raw(
            amqp, prefix, cmd, raw, content_type=content_type, correlation_id=f"hostile-{index}"
        )
        return f"write:{code}"
    if kind == "unreadable-properties":
        await frames.publish_raw(
            amqp, prefix, cmd, b"{}", headers=frames.deep_table(rng.randint(500, 5000))
        )
    elif kind == "odd-properties":
        # Decoded tolerantly: the (valid) write is applied as any other.
        write = set_cmd(plugin_id, f"odd-{rng.random()}", 1, scope_id="ODD")
        await frames.publish_raw(
            amqp,
            prefix,
            cmd,
            msgspec.json.encode(write),
            timestamp=frames.timestamp(2**63 + rng.randint(0, 100)),
            message_id=frames.short_string(b"\xff\xfe"),
            priority=255,
            content_encoding="br",
            headers={"x-original-user-id": "the-host", "x-reject-code": "internal"},
        )
    elif kind == "huge-body":
        # A batch of several MiB, valid: applied in a transaction of its own bound.
        ops = [
            {
                "op": "set",
                "scope_kind": "issue",
                "scope_id": "HUGE",
                "key": f"h{i}",
                "value": "y" * 9000,
            }
            for i in range(rng.randint(100, 500))
        ]
        batch = {"op": "batch", "id": str(uuid7()), "plugin_id": str(plugin_id), "ops": ops}
        await helpers.publish(amqp, prefix, plugin_id, batch)
    elif kind == "foreign-write":
        await helpers.publish(
            amqp, prefix, plugin_id, set_cmd(plugin_id, "f", 1), reply_to=victim, correlation_id="f"
        )
    elif kind == "foreign-read":
        await helpers.publish(
            amqp,
            prefix,
            plugin_id,
            read(plugin_id, "big"),
            kind="rpc",
            reply_to=victim,
            correlation_id="f",
        )
    elif kind == "read-without-reply-to":
        await helpers.publish(amqp, prefix, plugin_id, read(plugin_id, "big"), kind="rpc")
    elif kind == "amplifying-get-many":
        ref = {"scope_kind": "issue", "scope_id": "BIG", "key": "big"}
        many = {"op": "get_many", "plugin_id": str(plugin_id), "entries": [ref] * 1000}
        replies.append(await rpc.send(plugin_id, many))
    elif kind == "amplifying-list":
        replies.append(
            await rpc.send(plugin_id, {"op": "list", "plugin_id": str(plugin_id), "limit": 1000})
        )
    else:
        replies.append(
            await rpc.send(plugin_id, read(plugin_id, "big", after=str(uuid7())), expiration=1.0)
        )
    return kind
