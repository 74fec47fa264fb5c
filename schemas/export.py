"""The wire contract as JSON Schema (draft 2020-12) and AsyncAPI 3, generated from the structs.

Plugins in other languages validate against ``schemas/json/``; ``schemas/asyncapi.json``
describes the whole protocol (channels, operations, AMQP bindings, replies, dead letters) for
AsyncAPI tooling. The files are never edited by hand: ``python -m schemas.export`` rewrites
them, and a test fails when they are stale.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple, get_args
from urllib.parse import urlsplit

import msgspec
from msgspec import UNSET, Meta, UnsetType

from schemas.errors import ErrorCode
from schemas.messages import ChangeItem, ReadRequest, Reply, WriteCommand
from schemas.topology import (
    COMMANDS_QUEUE_TYPE,
    CONSISTENT_HASH_EXCHANGE_TYPE,
    DEAD_QUEUE_TYPE,
    DEFAULT_AMQP_URL,
    HASH_PROPERTY,
    RPC_QUEUE_TYPE,
    Names,
)

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
DIRECTORY: Final = Path(__file__).parent / "json"
ASYNCAPI_PATH: Final = Path(__file__).parent / "asyncapi.json"


class Message(NamedTuple):
    """One kind of message and the schema file that describes it."""

    name: str
    title: str
    type: Any
    description: str


MESSAGES: Final = (
    Message(
        "write-command",
        "WriteCommand",
        WriteCommand,
        "A write a plugin publishes with routing key cmd.<plugin_id>: set, delete or batch, "
        "chosen by `op`. Rules the schema cannot state: `id` is a UUIDv7 at most 5 minutes "
        "ahead of the worker's clock and no older than the tombstone retention (7 days by "
        "default); `scope_id` is null for scope_kind `instance` and required otherwise; a "
        "value holds no U+0000, NaN or Infinity, is at most 1 MiB of JSON by default (its "
        "numbers counted as written out in full) and nests at most 256 arrays and objects; "
        "scope_id, namespace and key are at most 2400 bytes of UTF-8 together; `if_version` "
        "and `if_absent` exclude each other, `if_version` is older than `id`, `ttl_ms` is at "
        "most the tombstone retention.",
    ),
    Message(
        "read-request",
        "ReadRequest",
        ReadRequest,
        "A read a plugin publishes with routing key rpc.<plugin_id>, with reply_to (direct "
        "reply-to, or a queue of the caller's own named <prefix>.reply.<plugin_id>.<name>) "
        "and correlation_id: get, get_many, list or changes, chosen by `op`. `after` is a "
        "UUIDv7 no further ahead than a write may be; `since` is a position a changes reply "
        "gave (or null for the log's current end).",
    ),
    Message(
        "reply",
        "Reply",
        Reply,
        "What the worker sends back to reply_to, chosen by `type`: a value, values, a page, "
        "a page of changes, an applied write, or an error with a code of the contract.",
    ),
    Message(
        "change-item",
        "ChangeItem",
        ChangeItem,
        "A change of a plugin's state, as a changes reply lists it and as the worker "
        "publishes it to the exchange <prefix>.changes with routing key chg.<plugin_id> "
        "(persistent, at least once, in log order per plugin: dedupe by `position`).",
    ),
)
COMBINED_NAME: Final = "plugin-state"
COMBINED_DESCRIPTION: Final = (
    "Any message of the plugin state protocol. Each message kind is also under $defs "
    "(WriteCommand, ReadRequest, Reply, ChangeItem) and has a schema file of its own."
)


def _document(name: str, title: str, description: str, schema: dict[str, Any]) -> str:
    header = {
        "$schema": DIALECT,
        "$id": f"urn:plugin-state:{name}",
        "title": title,
        "description": description,
    }
    return json.dumps({**schema, **header}, indent=2, sort_keys=True) + "\n"


def _combined() -> dict[str, Any]:
    """One document: every struct and every message kind under ``$defs``."""
    kinds, structs = msgspec.json.schema_components(
        [message.type for message in MESSAGES], ref_template="#/$defs/{name}"
    )
    defs = dict(structs)
    for message, kind in zip(MESSAGES, kinds, strict=True):
        if kind.get("$ref") == f"#/$defs/{message.title}":
            # A message kind that is one struct, not a union: the struct is the kind.
            defs[message.title] = {**structs[message.title], "description": message.description}
        else:
            defs[message.title] = {**kind, "description": message.description}
    return {
        "anyOf": [{"$ref": f"#/$defs/{message.title}"} for message in MESSAGES],
        "$defs": defs,
    }


def render() -> dict[str, str]:
    """Every schema file: its name and its exact text."""
    files = {
        f"{message.name}.schema.json": _document(
            message.name, message.title, message.description, msgspec.json.schema(message.type)
        )
        for message in MESSAGES
    }
    files[f"{COMBINED_NAME}.schema.json"] = _document(
        COMBINED_NAME, "PluginStateMessage", COMBINED_DESCRIPTION, _combined()
    )
    return files


# ------------------------------------------------------------------------------ AsyncAPI

ASYNCAPI_VERSION: Final = "3.0.0"
AMQP_BINDING_VERSION: Final = "0.3.0"
# The wire contract's version, not the package's: it changes only when the contract does.
PROTOCOL_VERSION: Final = "1.0.0"
JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"

# The AMQP envelope of each kind of message. AsyncAPI has one `headers` schema per message,
# and its correlation-id and reply-address expressions point into it, so for requests and
# replies these describe the AMQP *properties* the protocol uses; only dead letters describe
# entries of the AMQP headers table.

ContentType = Annotated[
    Literal["application/json", "application/msgpack"],
    Meta(description="The body's encoding; absent means application/json."),
]
UserId = Annotated[
    str,
    Meta(
        description="The publisher's RabbitMQ user. RabbitMQ checks it against the "
        "connection's user; it must be mapped to the body's plugin_id or be a trusted user, "
        "else the message is `forbidden`."
    ),
]
CorrelationId = Annotated[str, Meta(description="Echoed in the reply; the caller's own choice.")]


class _Properties(msgspec.Struct, kw_only=True, omit_defaults=True):
    content_type: ContentType = "application/json"


class WriteProperties(_Properties, kw_only=True):
    """AMQP properties of a write."""

    delivery_mode: Annotated[Literal[2], Meta(description="Persistent.")]
    user_id: UserId
    reply_to: Annotated[
        str | UnsetType,
        Meta(
            description="With correlation_id, asks for one reply once the write's "
            "transaction committed; without both, the write is fire-and-forget."
        ),
    ] = UNSET
    correlation_id: CorrelationId | UnsetType = UNSET


class ReadProperties(_Properties, kw_only=True):
    """AMQP properties of a read request."""

    user_id: UserId
    reply_to: Annotated[
        str,
        Meta(description="Where the reply goes; amq.rabbitmq.reply-to is the recommended one."),
    ]
    correlation_id: CorrelationId
    expiration: (
        Annotated[
            str,
            Meta(
                pattern="^[0-9]+$",
                description="Milliseconds. A request that expired before the worker got to it "
                "is dropped; read-your-writes waits at most this long (else 5 s).",
            ),
        ]
        | UnsetType
    ) = UNSET


class ReplyProperties(_Properties, kw_only=True):
    """AMQP properties of a reply: the request's encoding and correlation id."""

    correlation_id: CorrelationId | UnsetType = UNSET


class ChangeProperties(_Properties, kw_only=True):
    """AMQP properties of a change on the feed."""

    content_type: Annotated[Literal["application/json"], Meta(description="Always JSON.")] = (
        "application/json"
    )
    delivery_mode: Annotated[Literal[2], Meta(description="Persistent.")]
    message_id: Annotated[
        str, Meta(description="<plugin_id>:<position>: the same for a change published again.")
    ]
    type: Annotated[Literal["change"], Meta(description="Always change.")]


class DeadLetterHeaders(msgspec.Struct, kw_only=True, omit_defaults=True, rename="kebab"):
    """Entries added to a dead letter's AMQP headers table; its own properties are kept."""

    x_reject_code: Annotated[
        ErrorCode | UnsetType,
        Meta(
            description="Why the worker rejected it. Absent when RabbitMQ itself "
            "dead-lettered a command after its delivery limit: that one has x-death."
        ),
    ] = UNSET
    x_reject_reason: Annotated[str | UnsetType, Meta(description="Human readable.")] = UNSET
    x_original_routing_key: Annotated[
        str | UnsetType, Meta(description="The routing key it was published with.")
    ] = UNSET
    x_original_exchange: Annotated[
        str | UnsetType, Meta(description="The exchange it was published to.")
    ] = UNSET
    x_original_user_id: Annotated[
        str | UnsetType, Meta(description="Its user_id, which a republish could not keep.")
    ] = UNSET
    x_death: Annotated[
        list[dict[str, Any]] | UnsetType,
        Meta(description="RabbitMQ's own record of dead-lettering it."),
    ] = UNSET


DeadLetterBody = Annotated[
    Any,
    Meta(
        description="The rejected message's body exactly as it was published, in its "
        "content_type; it need not be valid (invalid_message)."
    ),
]

ENVELOPES: Final = (
    WriteProperties,
    ReadProperties,
    ReplyProperties,
    ChangeProperties,
    DeadLetterHeaders,
)


class _Channel(NamedTuple):
    """A channel of the document whose messages are the kinds of one tagged union."""

    key: str
    title: str
    union: Any
    envelope: type[msgspec.Struct]


WRITES: Final = _Channel("commands", "Write commands", WriteCommand, WriteProperties)
READS: Final = _Channel("reads", "Read requests", ReadRequest, ReadProperties)
REPLIES: Final = _Channel("replies", "Replies", Reply, ReplyProperties)
WRITE_REPLIES: Final = ("applied", "error")
READ_REPLIES: Final = ("value", "values", "page", "changes", "error")
CORRELATION_ID: Final = {"$ref": "#/components/correlationIds/correlationId"}


def _tag(struct: type[msgspec.Struct]) -> str:
    return str(struct.__struct_config__.tag)


def _without_discriminators(node: Any) -> Any:
    """AsyncAPI's Schema Object has ``discriminator`` as a property name whose values must be
    schema names; msgspec emits OpenAPI's object form. Every tagged struct still pins its tag
    with an ``enum``, so a union's branches stay distinguishable without it."""
    if isinstance(node, dict):
        return {
            key: _without_discriminators(value)
            for key, value in node.items()
            if not (key == "discriminator" and isinstance(value, dict))
        }
    if isinstance(node, list):
        return [_without_discriminators(item) for item in node]
    return node


def _amqp(**binding: Any) -> dict[str, Any]:
    return {"amqp": {**binding, "bindingVersion": AMQP_BINDING_VERSION}}


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return _amqp(
        **{"is": "routingKey"},
        exchange={"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"},
    )


def _queue(name: str, queue_type: str) -> dict[str, Any]:
    return _amqp(
        **{"is": "queue", "x-queue-type": queue_type},
        queue={
            "name": name,
            "durable": True,
            "exclusive": False,
            "autoDelete": False,
            "vhost": "/",
        },
    )


def _message(struct: type[msgspec.Struct], envelope: type[msgspec.Struct]) -> dict[str, Any]:
    summary = (inspect.getdoc(struct) or struct.__name__).split("\n\n")[0].replace("\n", " ")
    return {
        "name": _tag(struct),
        "title": struct.__name__,
        "summary": summary,
        "description": f"A JSON object ({JSON}), or the same object in MessagePack "
        f"({MSGPACK}); a reply uses its request's encoding.",
        "contentType": JSON,
        "payload": {"$ref": f"#/components/schemas/{struct.__name__}"},
        "headers": {"$ref": f"#/components/schemas/{envelope.__name__}"},
        "correlationId": CORRELATION_ID,
    }


def _channel_messages(channel: _Channel) -> dict[str, Any]:
    return {
        _tag(struct): {"$ref": f"#/components/messages/{struct.__name__}"}
        for struct in get_args(channel.union)
    }


def _operation_messages(channel: _Channel, tags: tuple[str, ...] | None = None) -> list[Any]:
    chosen = tags or tuple(_channel_messages(channel))
    return [{"$ref": f"#/channels/{channel.key}/messages/{tag}"} for tag in chosen]


def _reply(tags: tuple[str, ...]) -> dict[str, Any]:
    return {
        "address": {
            "location": "$message.header#/reply_to",
            "description": "The request's reply_to: the worker publishes the reply there "
            "through the default exchange.",
        },
        "channel": {"$ref": f"#/channels/{REPLIES.key}"},
        "messages": _operation_messages(REPLIES, tags),
    }


def asyncapi() -> dict[str, Any]:
    """The whole protocol as an AsyncAPI 3 document, seen from a plugin (and an operator
    reading dead letters); the worker does the mirror image. Message schemas are msgspec's."""
    names = Names()
    broker = urlsplit(DEFAULT_AMQP_URL)
    kinds = [struct for channel in (WRITES, READS, REPLIES) for struct in get_args(channel.union)]
    (body, *_), schemas = msgspec.json.schema_components(
        [DeadLetterBody, *kinds, ChangeItem, *ENVELOPES],
        ref_template="#/components/schemas/{name}",
    )
    messages = {
        struct.__name__: _message(struct, channel.envelope)
        for channel in (WRITES, READS, REPLIES)
        for struct in get_args(channel.union)
    }
    messages["Change"] = {
        "name": "change",
        "title": "Change",
        "summary": (inspect.getdoc(ChangeItem) or "").split("\n\n")[0].replace("\n", " "),
        "contentType": JSON,
        "payload": {"$ref": "#/components/schemas/ChangeItem"},
        "headers": {"$ref": "#/components/schemas/ChangeProperties"},
    }
    messages["DeadLetter"] = {
        "name": "dead_letter",
        "title": "DeadLetter",
        "summary": "A rejected write, body and properties intact, with the reason in headers.",
        "contentType": JSON,
        "payload": body,
        "headers": {"$ref": "#/components/schemas/DeadLetterHeaders"},
    }
    plugin_id = {"$ref": "#/components/parameters/plugin_id"}
    channels = {
        WRITES.key: {
            "address": names.command_key("{plugin_id}"),
            "title": WRITES.title,
            "description": f"Writes go to the topic exchange `{names.exchange}`; the queue "
            f"`{names.commands_queue}` takes them. Publish persistent, with publisher confirms.",
            "parameters": {"plugin_id": plugin_id},
            "messages": _channel_messages(WRITES),
            "bindings": _exchange(names.exchange, "topic"),
        },
        READS.key: {
            "address": names.rpc_key("{plugin_id}"),
            "title": READS.title,
            "description": f"Reads go to the topic exchange `{names.exchange}`; the queue "
            f"`{names.rpc_queue}` takes them.",
            "parameters": {"plugin_id": plugin_id},
            "messages": _channel_messages(READS),
            "bindings": _exchange(names.exchange, "topic"),
        },
        REPLIES.key: {
            "address": None,
            "title": REPLIES.title,
            "description": "The caller's reply_to queue (RabbitMQ direct reply-to, "
            "`amq.rabbitmq.reply-to`, is the recommended one), known only at run time.",
            "messages": _channel_messages(REPLIES),
        },
        "commandsQueue": {
            "address": names.commands_queue,
            "title": "Commands queue",
            "description": f"Bound to `{names.command_key('*')}`; workers compete for it. "
            f"Dead-letters to `{names.dead}` after the delivery limit; rejects publishes "
            "past its length limit (publishers' confirms are nacked). A deployment may "
            "partition it (protocol §2; publishers see no difference): the exchange then "
            f"passes `{names.command_key('*')}` to the consistent-hash exchange "
            f"`{names.commands_hash}` (type `{CONSISTENT_HASH_EXCHANGE_TYPE}`, hashing the "
            f"`{HASH_PROPERTY}` property, which a publisher should set to the write's id), "
            f"which spreads writes over the quorum queues `{names.commands_partition(0)}` "
            "… `.N-1`; a write without it still reaches one of them.",
            "messages": _channel_messages(WRITES),
            "bindings": _queue(names.commands_queue, COMMANDS_QUEUE_TYPE),
        },
        "readsQueue": {
            "address": names.rpc_queue,
            "title": "Read requests queue",
            "description": f"Bound to `{names.rpc_key('*')}`; workers compete for it.",
            "messages": _channel_messages(READS),
            "bindings": _queue(names.rpc_queue, RPC_QUEUE_TYPE),
        },
        "changes": {
            "address": names.change_key("{plugin_id}"),
            "title": "Change feed",
            "description": f"Every committed change of a plugin's state, published to the "
            f"topic exchange `{names.changes}` after commit: at least once, in log order per "
            "plugin. Bind a queue of your own with the plugin's key; dedupe by `position`, "
            "and after any gap (a queue not bound yet, a broker restart) catch up with a "
            "changes read from the last position you have.",
            "parameters": {"plugin_id": plugin_id},
            "messages": {"change": {"$ref": "#/components/messages/Change"}},
            "bindings": _exchange(names.changes, "topic"),
        },
        "deadLetterExchange": {
            "address": names.command_key("{plugin_id}"),
            "title": "Dead-letter exchange",
            "description": f"The fanout exchange `{names.dead}`, where the worker republishes "
            "every rejected write under its original routing key.",
            "parameters": {"plugin_id": plugin_id},
            "messages": {"dead_letter": {"$ref": "#/components/messages/DeadLetter"}},
            "bindings": _exchange(names.dead, "fanout"),
        },
        "deadLetters": {
            "address": names.dead,
            "title": "Dead-letter queue",
            "description": f"Bound to the exchange `{names.dead}`: every rejected message "
            "with its reason. Nothing consumes it but operators.",
            "messages": {"dead_letter": {"$ref": "#/components/messages/DeadLetter"}},
            "bindings": _queue(names.dead, DEAD_QUEUE_TYPE),
        },
    }
    operations = {
        "sendWrite": {
            "action": "send",
            "channel": {"$ref": f"#/channels/{WRITES.key}"},
            "title": "Send a write command",
            "description": "Fire-and-forget by default. A write that carries reply_to and "
            "correlation_id gets one reply after its transaction committed: `applied` "
            "(outcome applied, superseded, or conflict when a condition did not hold) or an "
            "`error`. A rejected write is dead-lettered. Republish with the same id when a "
            "publish is not confirmed.",
            "messages": _operation_messages(WRITES),
            "bindings": _amqp(deliveryMode=2),
            "reply": _reply(WRITE_REPLIES),
        },
        "sendRead": {
            "action": "send",
            "channel": {"$ref": f"#/channels/{READS.key}"},
            "title": "Send a read request",
            "description": "RPC: get answers with `value`, get_many with `values`, list with "
            "`page`, changes with `changes` (after waiting up to wait_ms for one when there is "
            "none yet); a rejected request is answered with an `error`.",
            "messages": _operation_messages(READS),
            "reply": _reply(READ_REPLIES),
        },
        "receiveChange": {
            "action": "receive",
            "channel": {"$ref": "#/channels/changes"},
            "title": "Follow a plugin's changes",
            "messages": [{"$ref": "#/channels/changes/messages/change"}],
        },
        "receiveDeadLetter": {
            "action": "receive",
            "channel": {"$ref": "#/channels/deadLetters"},
            "title": "Inspect rejected writes",
            "messages": [{"$ref": "#/channels/deadLetters/messages/dead_letter"}],
            "bindings": _amqp(ack=True),
        },
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:plugin-state:asyncapi",
        "info": {
            "title": "Plugin state over AMQP",
            "version": PROTOCOL_VERSION,
            "description": "Plugins keep JSON values keyed by (plugin_id, scope_kind, "
            "scope_id, namespace, key). They publish writes (set, delete, batch) and read "
            "requests (get, get_many, list, changes) to RabbitMQ; workers apply writes to "
            "Postgres, last writer wins by the write's UUIDv7 id, answer reads over AMQP RPC "
            "and publish every change to a feed. Bodies "
            f"are JSON ({JSON}, the default) or the same object in MessagePack ({MSGPACK}). "
            "Operations are seen from a plugin; the worker does the mirror image.",
            "license": {"name": "MIT"},
        },
        "defaultContentType": JSON,
        "servers": {
            "local": {
                "host": f"{broker.hostname}:{broker.port}",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ on this machine (or from deploy/compose.yaml), vhost /.",
                "security": [{"$ref": "#/components/securitySchemes/rabbitmqUser"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _without_discriminators(schemas),
            "messages": messages,
            "parameters": {
                "plugin_id": {
                    "description": "The plugin's UUID; it must equal the body's plugin_id "
                    "(else `forbidden`), so RabbitMQ topic permissions can confine each "
                    "plugin's user to its own keys.",
                    "location": "$message.payload#/plugin_id",
                }
            },
            "correlationIds": {
                "correlationId": {
                    "description": "A reply carries its request's AMQP correlation_id.",
                    "location": "$message.header#/correlation_id",
                }
            },
            "securitySchemes": {
                "rabbitmqUser": {
                    "type": "userPassword",
                    "description": "A RabbitMQ user; messages carry it as user_id.",
                }
            },
        },
    }


def render_asyncapi() -> str:
    return json.dumps(asyncapi(), indent=2, sort_keys=True) + "\n"


def write(directory: Path = DIRECTORY, asyncapi_path: Path = ASYNCAPI_PATH) -> list[Path]:
    """(Re)write every schema file into ``directory``, removing ones no longer rendered, and
    the AsyncAPI document at ``asyncapi_path``."""
    files = render()
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.schema.json"):
        if old.name not in files:
            old.unlink()
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    asyncapi_path.write_text(render_asyncapi(), encoding="utf-8")
    written.append(asyncapi_path)
    return written


def main() -> None:
    for path in write():
        print(path)


if __name__ == "__main__":
    main()
