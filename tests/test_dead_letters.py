"""`plugin-state-worker dead list|replay|purge` against the real RabbitMQ (and a running worker
where real dead letters are needed): listing loses nothing, replay and purge take only what
was selected, and a replay that cannot be delivered leaves its dead letter in the queue."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import asyncpg
import click
import msgspec
from click.testing import CliRunner, Result

from schemas.codec import JSON, MSGPACK
from worker.client import nacks
from worker.config import Settings
from worker.dead_commands import register
from worker.dead_letters import PREVIEW_CHARS, preview
from worker.topology import Names, declare

from .conftest import StartWorker, unique
from .helpers import queue_messages, set_cmd, state_of, wait_until


def console() -> click.Group:
    """A console command of the test's own, with the `dead` group registered as in main."""
    group = click.Group("plugin-state-worker")
    register(group)
    return group


async def dead(settings: Settings, *args: str, answer: str | None = None) -> Result:
    """Run `dead ...` in a thread: the command starts an event loop of its own."""
    return await asyncio.to_thread(
        CliRunner().invoke, console(), ["dead", *args], input=answer, obj=settings
    )


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


async def listed(settings: Settings, *args: str) -> list[dict[str, Any]]:
    result = succeeded(await dead(settings, "list", "--json", *args))
    return [json.loads(line) for line in result.stdout.splitlines()]


def publisher(settings: Settings) -> str:
    """The RabbitMQ user the tests connect as: the only user_id RabbitMQ lets them set."""
    return urlsplit(settings.amqp_url).username or "guest"


async def publish_command(
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    plugin: uuid.UUID,
    body: dict[str, Any] | bytes,
    label: str,
) -> bytes:
    """Publish a command to `cmd.<plugin>` as a plugin would; ``label`` is its correlation id."""
    encoded = body if isinstance(body, bytes) else msgspec.json.encode(body)
    exchange = await amqp.get_exchange(settings.prefix, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            encoded,
            content_type=JSON,
            correlation_id=label,
            user_id=publisher(settings),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=Names.command_key(plugin),
    )
    return encoded


async def message_count(amqp: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await amqp.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def wait_for_count(
    amqp: aio_pika.abc.AbstractChannel, queue: str, count: int, what: str
) -> None:
    async def reached() -> bool:
        return await message_count(amqp, queue) == count

    await wait_until(reached, what=f"{what} ({count} messages in {queue})")


async def publish_dead_letter(
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    label: str,
    code: str,
    routing_key: str,
    exchange: str | None = None,
) -> bytes:
    """A dead letter as `worker.publish` makes one, straight into the dead exchange."""
    body = msgspec.json.encode({"op": "set", "label": label})
    dead_exchange = await amqp.get_exchange(Names(settings.prefix).dead, ensure=False)
    await dead_exchange.publish(
        aio_pika.Message(
            body,
            headers={
                "x-trace": label,
                "x-reject-code": code,
                "x-reject-reason": f"{code} for the test",
                "x-original-routing-key": routing_key,
                "x-original-exchange": settings.prefix if exchange is None else exchange,
                "x-original-user-id": publisher(settings),
            },
            content_type=JSON,
            message_id=f"id-{label}",
            correlation_id=label,
            app_id="a-plugin",
            type="state-command",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=routing_key,
    )
    return body


# --------------------------------------------------------------------------- list


def test_a_preview_is_one_short_printable_line_and_msgpack_shows_as_json() -> None:
    assert preview(b'{"op": "set"}', JSON) == '{"op": "set"}'
    packed = msgspec.msgpack.encode({"op": "set", "n": [1]})
    assert preview(packed, MSGPACK) == '{"op":"set","n":[1]}'
    assert preview(b"\x00\n\xff", MSGPACK) == "\\x00\\n\\xff", "not MessagePack: escaped"
    huge = msgspec.json.encode({"value": "é" * 1_000_000})
    cut = preview(huge, JSON)
    assert len(cut) == PREVIEW_CHARS and cut.startswith('{"value":"éé') and cut.endswith("…")


async def test_list_shows_each_dead_letter_with_its_code_and_leaves_the_queue_intact(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    plugin_id: uuid.UUID,
) -> None:
    await start_worker()
    unknown = uuid.uuid4()
    long_value = set_cmd(plugin_id, "k", "x" * 5000)
    cases: dict[str, tuple[uuid.UUID, dict[str, Any] | bytes, str]] = {
        "garbage": (plugin_id, b"\x00\xff not json at all", "invalid_message"),
        "bad-scope": (plugin_id, {**long_value, "scope_kind": "galaxy"}, "invalid_request"),
        "no-such-plugin": (unknown, set_cmd(unknown, "k", 1), "unknown_plugin"),
    }
    bodies = {
        label: await publish_command(amqp, settings, routed, body, label)
        for label, (routed, body, _) in cases.items()
    }
    queue = Names(settings.prefix).dead
    await wait_for_count(amqp, queue, 3, "every bad command to be dead-lettered")

    letters = await listed(settings)

    assert [letter["index"] for letter in letters] == [1, 2, 3]
    by_label = {letter["correlation_id"]: letter for letter in letters}
    assert by_label.keys() == cases.keys()
    for label, (routed, _, code) in cases.items():
        letter = by_label[label]
        assert letter["code"] == code, letter
        assert letter["reason"], letter
        assert letter["dead_lettered_by"] == "worker"
        assert letter["routing_key"] == f"cmd.{routed}"
        assert letter["exchange"] == settings.prefix
        assert letter["content_type"] == JSON
        assert letter["body_size"] == len(bodies[label])
        assert len(letter["preview"]) <= PREVIEW_CHARS
    assert by_label["bad-scope"]["preview"].endswith("…"), "a long body is only previewed"
    assert by_label["garbage"]["preview"].startswith("\\x00\\xff not json")

    await wait_for_count(amqp, queue, 3, "the listing to leave every dead letter")
    table = succeeded(await dead(settings, "list"))
    assert table.stdout.splitlines()[0].split()[:3] == ["#", "CODE", "ROUTING"]
    for code in ("invalid_message", "invalid_request", "unknown_plugin"):
        assert code in table.stdout
    assert f"3 of 3 dead letter(s) in {queue}" in table.stdout

    await wait_for_count(amqp, queue, 3, "the table to leave every dead letter")
    assert await listed(settings, "--limit", "2") == letters[:2]
    await wait_for_count(amqp, queue, 3, "a limited listing to leave every dead letter")
    assert await listed(settings) == letters, "the same letters, in the same order"
    await wait_for_count(amqp, queue, 3, "listings to leave every dead letter")
    kept = await queue_messages(amqp, queue)
    assert sorted(message.body for message in kept) == sorted(bodies.values())


async def test_a_message_dead_lettered_by_rabbitmq_is_listed_with_its_reason(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, plugin_id: uuid.UUID
) -> None:
    """No worker: the commands queue's own dead-lettering (delivery limit, reject)."""
    settings = settings.with_changes(delivery_limit=2)
    topology = await declare(amqp, settings)
    await publish_command(amqp, settings, plugin_id, set_cmd(plugin_id, "poison", 1), "poison")
    while (message := await topology.commands.get(fail=False, no_ack=False)) is not None:
        await message.nack(requeue=True)  # as if its consumer crashed holding it
    queue = Names(settings.prefix).dead
    await wait_for_count(amqp, queue, 1, "the delivery limit to dead-letter it")
    await publish_command(amqp, settings, plugin_id, set_cmd(plugin_id, "refused", 1), "refused")
    refused = await topology.commands.get(no_ack=False)
    await refused.reject(requeue=False)
    await wait_for_count(amqp, queue, 2, "the reject to dead-letter it")

    letters = {letter["correlation_id"]: letter for letter in await listed(settings)}

    assert letters["poison"]["code"] == "delivery_limit"
    assert letters["refused"]["code"] == "rejected"
    for letter in letters.values():
        assert letter["dead_lettered_by"] == "rabbitmq"
        assert Names(settings.prefix).commands_queue in letter["reason"]
        assert letter["routing_key"] == f"cmd.{plugin_id}"
        assert letter["exchange"] == settings.prefix
        assert letter["user_id"] == publisher(settings)


# --------------------------------------------------------------------------- replay


async def test_replaying_unknown_plugin_letters_once_the_plugin_is_registered_applies_them(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    await start_worker()
    late = uuid.uuid4()
    invalid = {**set_cmd(plugin_id, "k", 1), "scope_kind": "galaxy"}
    await publish_command(amqp, settings, plugin_id, invalid, "invalid")
    await publish_command(amqp, settings, late, set_cmd(late, "cursor", {"page": 3}), "early-1")
    await publish_command(amqp, settings, late, set_cmd(late, "token", "abc"), "early-2")
    queue = Names(settings.prefix).dead
    await wait_for_count(amqp, queue, 3, "the three commands to be dead-lettered")
    codes = sorted(letter["code"] for letter in await listed(settings))
    assert codes == ["invalid_request", "unknown_plugin", "unknown_plugin"]
    await db.execute("INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", late, unique("plugin"))

    result = succeeded(await dead(settings, "replay", "--code", "unknown_plugin", "--yes"))

    assert "replayed 2 of 3 dead letter(s)" in result.stdout
    expected = {
        ("issue", "ISS-1", "default", "cursor"): {"page": 3},
        ("issue", "ISS-1", "default", "token"): "abc",
    }

    async def applied() -> bool:
        return await state_of(db, late) == expected

    await wait_until(applied, what="the replayed commands to be applied by the worker")
    await wait_for_count(amqp, queue, 1, "the replayed letters to leave the dead queue")
    [left] = await listed(settings)
    assert (left["code"], left["correlation_id"]) == ("invalid_request", "invalid")


async def test_replay_republishes_the_original_message_without_the_dead_letter_headers(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    """No worker, so the replayed commands stay in the commands queue to be looked at;
    selection by routing-key glob and limit leaves every other letter in its place."""
    await declare(amqp, settings)
    one, other = uuid.uuid4(), uuid.uuid4()
    bodies = {
        "a1": await publish_dead_letter(amqp, settings, "a1", "internal", f"cmd.{one}"),
        "b1": await publish_dead_letter(amqp, settings, "b1", "internal", f"cmd.{other}"),
        "a2": await publish_dead_letter(amqp, settings, "a2", "internal", f"cmd.{one}"),
    }
    names = Names(settings.prefix)
    await wait_for_count(amqp, names.dead, 3, "the dead letters to arrive")

    glob = f"cmd.{str(one)[:8]}*"
    result = succeeded(
        await dead(settings, "replay", "--routing-key", glob, "--limit", "1", "--yes", "--progress")
    )

    assert "replayed 1 of 3" in result.stdout
    assert "replayed=1" in result.stderr, "the progress bar counts the replays"
    await wait_for_count(amqp, names.commands_queue, 1, "the replay to reach the commands queue")
    [replayed] = await queue_messages(amqp, names.commands_queue)
    assert replayed.body == bodies["a1"]
    assert replayed.routing_key == f"cmd.{one}"
    assert replayed.exchange == settings.prefix
    # The commands queue (quorum) adds its own x-delivery-count on delivery.
    headers = {k: v for k, v in (replayed.headers or {}).items() if k != "x-delivery-count"}
    assert headers == {"x-trace": "a1"}, "only the dead-lettering headers are gone"
    assert (replayed.message_id, replayed.correlation_id) == ("id-a1", "a1")
    assert (replayed.app_id, replayed.type, replayed.content_type) == (
        "a-plugin",
        "state-command",
        JSON,
    )
    assert replayed.user_id == publisher(settings)
    assert replayed.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    await wait_for_count(amqp, names.dead, 2, "the other letters to stay")
    assert [letter["correlation_id"] for letter in await listed(settings)] == ["b1", "a2"]


async def test_a_replay_that_cannot_be_delivered_fails_and_keeps_its_dead_letter(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    await declare(amqp, settings)
    names = Names(settings.prefix)
    await publish_dead_letter(amqp, settings, "unroutable", "internal", "nowhere.at.all")
    await publish_dead_letter(
        amqp, settings, "gone", "stale", "cmd.x", exchange=unique("no_such_exchange")
    )
    await wait_for_count(amqp, names.dead, 2, "the dead letters to arrive")

    for code, why in (("internal", "unroutable"), ("stale", "gone")):
        result = await dead(settings, "replay", "--code", code, "--yes")

        assert result.exit_code == 1, result.output
        assert "could not be replayed" in result.stderr, result.stderr
        assert f"it stays in {names.dead}" in result.stderr
        await wait_for_count(amqp, names.dead, 2, f"the {why} letter to stay")
    assert sorted(letter["correlation_id"] for letter in await listed(settings)) == [
        "gone",
        "unroutable",
    ]


# --------------------------------------------------------------------------- purge


async def test_purge_by_code_removes_only_those_and_purge_all_empties_the_queue(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    await declare(amqp, settings)
    names = Names(settings.prefix)
    for label, code in (("s1", "stale"), ("f1", "forbidden"), ("s2", "stale"), ("i1", "internal")):
        await publish_dead_letter(amqp, settings, label, code, f"cmd.{uuid.uuid4()}")
    await wait_for_count(amqp, names.dead, 4, "the dead letters to arrive")

    result = succeeded(await dead(settings, "purge", "--code", "stale", "--yes"))

    assert "purged 2 of 4" in result.stdout
    await wait_for_count(amqp, names.dead, 2, "the stale letters to go")
    assert [letter["correlation_id"] for letter in await listed(settings)] == ["f1", "i1"]

    await wait_for_count(amqp, names.dead, 2, "the listing to leave both")
    refused = await dead(settings, "purge", "--all", answer="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output, refused.output
    assert (await dead(settings, "purge")).exit_code == 2, "purge says what to purge"
    assert (await dead(settings, "purge", "--all", "--code", "stale", "--yes")).exit_code == 2
    await wait_for_count(amqp, names.dead, 2, "a refused purge to leave both")

    result = succeeded(await dead(settings, "purge", "--all", answer="y\n"))

    assert "purged 2 of 2" in result.stdout
    await wait_for_count(amqp, names.dead, 0, "purge --all to empty the queue")
    assert "no dead letters" in succeeded(await dead(settings, "purge", "--all")).stdout


async def test_the_commands_fail_cleanly_when_the_topology_does_not_exist(
    settings: Settings,
) -> None:
    result = await dead(settings, "list")

    assert result.exit_code == 1
    assert f"there is no queue '{Names(settings.prefix).dead}'" in result.stderr


async def test_replay_leaves_forbidden_letters_unless_asked_for_by_code(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, plugin_id: uuid.UUID
) -> None:
    """A replay goes out as the operator's user: a write its publisher was not allowed to
    make must not slip through as the operator's."""
    await declare(amqp, settings)
    queue = Names(settings.prefix).dead
    routing_key = Names.command_key(plugin_id)
    await publish_dead_letter(amqp, settings, "refused", "forbidden", routing_key)
    await publish_dead_letter(amqp, settings, "fixable", "unknown_plugin", routing_key)
    commands = await amqp.declare_queue(Names(settings.prefix).commands_queue, passive=True)

    everything = succeeded(await dead(settings, "replay", "--yes"))
    assert "left 1 forbidden one(s) in place" in everything.stdout
    assert [letter["code"] for letter in await listed(settings)] == ["forbidden"]
    await wait_for_count(amqp, commands.name, 1, "the fixable letter replayed")

    succeeded(await dead(settings, "replay", "--yes", "--code", "forbidden"))
    await wait_for_count(amqp, queue, 0, "the forbidden letter replayed when asked")
    await wait_for_count(amqp, commands.name, 2, "both replayed")


async def test_list_and_purge_take_any_letter_however_malformed(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    await declare(amqp, settings)
    queue = Names(settings.prefix).dead
    exchange = await amqp.get_exchange(queue, ensure=False)
    deep_msgpack = b"\x91" * 5000 + b"\x90"
    odd = [
        aio_pika.Message(deep_msgpack, content_type=MSGPACK, correlation_id="deep"),
        aio_pika.Message(b"\xc1\xff", content_type=MSGPACK, correlation_id="not-msgpack"),
        aio_pika.Message(
            b"{}",
            headers={"x-death": "not a list", "x-reject-code": 7, "x-original-exchange": [1]},
            correlation_id="odd-headers",
        ),
        aio_pika.Message(b"", correlation_id="empty"),
    ]
    for message in odd:
        await exchange.publish(message, routing_key="cmd.whatever")
    await wait_for_count(amqp, queue, len(odd), "the odd letters")
    letters = await listed(settings)
    assert [letter["correlation_id"] for letter in letters] == [
        "deep",
        "not-msgpack",
        "odd-headers",
        "empty",
    ]
    assert all(len(letter["preview"]) <= PREVIEW_CHARS for letter in letters)
    succeeded(await dead(settings, "purge", "--all", "--yes"))
    await wait_for_count(amqp, queue, 0, "every odd letter purged")


async def test_a_replay_nacked_for_a_while_is_sent_again_and_one_nacked_for_good_stays(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    """Nacks are retried on a fresh channel with back-off (a quorum queue electing a leader
    nacks for a while); a queue that stays full is a refusal after a bounded run of them."""
    full = settings.with_changes(commands_max_length=1)
    await declare(amqp, full)
    names = Names(settings.prefix)
    plugin = uuid.uuid4()
    commands = await amqp.get_exchange(settings.prefix, ensure=False)  # confirms: the default

    async def nacked() -> bool:  # a quorum queue applies its limit once it counted what it holds
        try:
            await commands.publish(aio_pika.Message(b"{}"), f"cmd.{plugin}")
        except aiormq.exceptions.DeliveryError:
            return True
        return False

    await wait_until(nacked, what="the commands queue to be full")
    await publish_dead_letter(amqp, settings, "late", "internal", f"cmd.{plugin}")
    await wait_for_count(amqp, names.dead, 1, "the dead letter to arrive")

    refused = await dead(settings, "replay", "--yes")
    assert refused.exit_code == 1, refused.output
    assert f"nacked the message {nacks.ATTEMPTS} times" in refused.stderr, refused.stderr
    await wait_for_count(amqp, names.dead, 1, "the refused letter to stay")

    replaying = asyncio.create_task(dead(settings, "replay", "--yes"))
    await asyncio.sleep(0.5)  # nacked meanwhile
    assert not replaying.done()
    await (await amqp.get_queue(names.commands_queue, ensure=False)).purge()  # room again
    succeeded(await asyncio.wait_for(replaying, 20))
    await wait_for_count(amqp, names.dead, 0, "the replayed letter to leave")
    replayed = await queue_messages(amqp, names.commands_queue)
    assert [m.headers.get("x-trace") for m in replayed] == ["late"]
