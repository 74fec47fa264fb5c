"""Error messages say which rule was broken, in words: never a regular expression or a
length constraint in msgspec's terms, never a code twice. The same words in a reply, a
dead letter's reason and the CLI."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import msgspec
import pytest

from schemas.codec import codec_for
from schemas.errors import InvalidRequest
from worker.config import Settings
from worker.topology import Names

from .cli import clean_env, cli
from .conftest import StartWorker
from .helpers import publish, queue_messages, set_cmd, uuid7, wait_until
from .rpc import RawRpc

RESERVED = "must not be one of __proto__, prototype, constructor"

RULES = [
    ("", "must not be empty"),
    ("__proto__", RESERVED),
    ("constructor", RESERVED),
    (" \t\n", "must not be only whitespace"),
    ("a\x00b", "must not contain U+0000 (NUL)"),
    ("k" * 501, "must be at most 500 characters (it has 501)"),
]


@pytest.mark.parametrize(("key", "rule"), RULES)
def test_a_broken_name_rule_is_said_in_words(key: str, rule: str) -> None:
    plugin = uuid.uuid4()
    codec = codec_for("application/json")
    single = set_cmd(plugin, key, 1)
    batch = {
        "op": "batch",
        "id": str(uuid7()),
        "plugin_id": str(plugin),
        "ops": [{k: v for k, v in single.items() if k not in ("id", "plugin_id")}],
    }
    for body, where in ((single, "key"), (batch, "ops[0].key")):
        with pytest.raises(InvalidRequest) as caught:
            codec.decode_write(msgspec.json.encode(body))
        assert caught.value.message == f"{where} {rule}"


async def test_dead_letter_reasons_and_replies_say_the_rule_in_words(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await start_worker()
    await publish(amqp, prefix, plugin_id, set_cmd(plugin_id, "__proto__", 1))
    dead: list[Any] = []

    async def dead_lettered() -> bool:
        dead.extend(await queue_messages(amqp, Names(prefix).dead))
        return bool(dead)

    await wait_until(dead_lettered, what="the write to be dead-lettered")
    headers = dead[0].headers
    assert (headers["x-reject-code"], headers["x-reject-reason"]) == (
        "invalid_request",
        f"key {RESERVED}",
    )
    async with RawRpc(settings.amqp_url, prefix) as rpc:
        reply = await rpc.call(
            plugin_id,
            {"op": "get", "plugin_id": str(plugin_id), "scope_kind": "instance", "key": ""},
        )
    assert reply == {"type": "error", "code": "invalid_request", "message": "key must not be empty"}


async def test_the_cli_says_a_code_once(start_worker: StartWorker, settings: Settings) -> None:
    await start_worker()
    unknown = uuid.uuid4()
    env = clean_env(PLUGIN_STATE_AMQP_URL=settings.amqp_url, PLUGIN_STATE_PREFIX=settings.prefix)
    ran = await cli("get", "--plugin", str(unknown), "--scope", "instance", "k", env=env)
    assert ran.code == 2
    assert ran.stderr.startswith("Error: unknown_plugin: "), ran.stderr
    assert ran.stderr.count("\n") == 1 and "UnknownPlugin" not in ran.stderr
