"""The exported JSON Schema files and AsyncAPI document are current and state the contract.

``jsonschema`` is not a dependency, so the schemas' meaning is checked through their
structure: the tag on ``op``, the required fields, the rules on names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest

from schemas.errors import ErrorCode
from schemas.export import (
    ASYNCAPI_PATH,
    DIALECT,
    DIRECTORY,
    asyncapi,
    render,
    render_asyncapi,
    write,
)
from schemas.messages import (
    MAX_BATCH_OPS,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    READ_OPS,
    SCOPE_KINDS,
    WRITE_OPS,
    ReadRequest,
    Reply,
    WriteCommand,
)
from worker.config import Settings
from worker.topology import Names, commands_queue_arguments


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(render()[f"{name}.schema.json"])
    return document


def accepts(schema: dict[str, Any], instance: object, defs: dict[str, Any]) -> bool:
    """A JSON Schema validator for the keywords msgspec emits (formats are annotations)."""
    if "$ref" in schema:
        return accepts(defs[schema["$ref"].removeprefix("#/$defs/")], instance, defs)
    if "anyOf" in schema:
        return any(accepts(option, instance, defs) for option in schema["anyOf"])
    if "enum" in schema:
        return instance in schema["enum"]
    match schema.get("type"), instance:
        case "null", None:
            return True
        case "string", str():
            return schema.get("minLength", 0) <= len(instance) <= schema.get(
                "maxLength", len(instance)
            ) and bool(re.search(schema.get("pattern", ""), instance))
        case "array", list():
            return schema.get("minItems", 0) <= len(instance) <= schema.get(
                "maxItems", len(instance)
            ) and all(accepts(schema["items"], item, defs) for item in instance)
        case "object", dict():
            properties = schema.get("properties", {})
            return set(schema.get("required", ())) <= instance.keys() and all(
                accepts(properties[name], value, defs)
                for name, value in instance.items()
                if name in properties
            )
        case None, _:
            return True  # no constraint: a value may be any JSON
    return False


def refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(item) for item in node))
    return set()


def test_exported_schema_files_match_the_structs() -> None:
    expected = render()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in DIRECTORY.glob("*.json")}
    stale = sorted(
        name for name in expected.keys() | on_disk.keys() if expected.get(name) != on_disk.get(name)
    )
    assert not stale, f"schemas/json/ is stale ({', '.join(stale)}): run `python -m schemas.export`"


@pytest.mark.parametrize("file_name", sorted(render()))
def test_schema_file_is_a_stable_draft_2020_12_document(file_name: str) -> None:
    text = render()[file_name]
    document = json.loads(text)
    assert document["$schema"] == DIALECT
    assert document["$id"] == f"urn:plugin-state:{file_name.removesuffix('.schema.json')}"
    assert document["title"]
    assert document["description"]
    assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert {f"#/$defs/{name}" for name in document["$defs"]} >= refs(document)


def test_write_replaces_files_no_longer_rendered(tmp_path: Path) -> None:
    directory, asyncapi_path = tmp_path / "json", tmp_path / "asyncapi.json"
    directory.mkdir()
    (directory / "renamed-message.schema.json").write_text("{}\n", encoding="utf-8")
    written = write(directory, asyncapi_path)
    assert sorted(path.name for path in directory.iterdir()) == sorted(render())
    expected = {**render(), asyncapi_path.name: render_asyncapi()}
    assert all(path.read_text(encoding="utf-8") == expected[path.name] for path in written)
    assert asyncapi_path in written


def test_write_command_schema_is_tagged_by_op() -> None:
    document = load("write-command")
    assert document["discriminator"] == {
        "propertyName": "op",
        "mapping": {
            "set": "#/$defs/SetCommand",
            "delete": "#/$defs/DeleteCommand",
            "batch": "#/$defs/BatchCommand",
        },
    }
    batch_items = document["$defs"]["BatchCommand"]["properties"]["ops"]["items"]
    assert batch_items["discriminator"]["propertyName"] == "op"
    assert set(batch_items["discriminator"]["mapping"]) == {"set", "delete"}


def test_write_command_schema_requires_the_fields_of_each_op() -> None:
    defs = load("write-command")["$defs"]
    required = {name: set(defs[name]["required"]) for name in defs}
    assert required["SetCommand"] == {"op", "id", "plugin_id", "scope_kind", "key", "value"}
    assert required["DeleteCommand"] == {"op", "id", "plugin_id", "scope_kind", "key"}
    assert required["BatchCommand"] == {"op", "id", "plugin_id", "ops"}
    assert required["BatchSet"] == {"op", "scope_kind", "key", "value"}
    assert required["BatchDelete"] == {"op", "scope_kind", "key"}
    ops = defs["BatchCommand"]["properties"]["ops"]
    assert (ops["minItems"], ops["maxItems"]) == (1, MAX_BATCH_OPS)


def test_write_command_schema_states_the_name_rules() -> None:
    properties = load("write-command")["$defs"]["SetCommand"]["properties"]
    scope_id, null = properties["scope_id"]["anyOf"]
    assert null == {"type": "null"}
    assert sorted(properties["scope_kind"]["enum"]) == sorted(SCOPE_KINDS)
    assert properties["namespace"]["default"] == "default"
    for name in (properties["key"], properties["namespace"], scope_id):
        assert name["pattern"] == NAME_PATTERN
        assert (name["minLength"], name["maxLength"]) == (1, MAX_NAME_LENGTH)


SET_EXAMPLE = {
    "op": "set",
    "id": "01977420-dc00-7554-877c-d912671ef8db",
    "plugin_id": "5a4c1f84-6f43-4b1e-9c2e-0d9b8f0c7a11",
    "scope_kind": "issue",
    "scope_id": "ISS-42",
    "namespace": "default",
    "key": "cursor",
    "value": {"page": 3},
}


def test_write_command_schema_accepts_a_set_and_rejects_an_empty_key() -> None:
    document = load("write-command")
    assert accepts(document, SET_EXAMPLE, document["$defs"])
    assert accepts(document, {**SET_EXAMPLE, "key": "x" * MAX_NAME_LENGTH}, document["$defs"])
    assert not accepts(document, {**SET_EXAMPLE, "key": ""}, document["$defs"])


REJECTED_CHANGES = {
    "whitespace key": {"key": " \t"},
    "key with NUL": {"key": "a\x00b"},
    "reserved key": {"key": "__proto__"},
    "reserved namespace": {"namespace": "prototype"},
    "reserved scope_id": {"scope_id": "constructor"},
    "501-character key": {"key": "x" * (MAX_NAME_LENGTH + 1)},
    "unknown scope_kind": {"scope_kind": "team"},
    "unknown op": {"op": "upsert"},
    "empty batch": {"op": "batch", "ops": []},
}


@pytest.mark.parametrize("change", REJECTED_CHANGES.values(), ids=REJECTED_CHANGES.keys())
def test_write_command_schema_rejects_what_the_worker_rejects(change: dict[str, Any]) -> None:
    document = load("write-command")
    assert not accepts(document, {**SET_EXAMPLE, **change}, document["$defs"])


def test_reply_schema_is_tagged_by_type_and_always_carries_next_cursor() -> None:
    document = load("reply")
    assert document["discriminator"]["propertyName"] == "type"
    assert set(document["discriminator"]["mapping"]) == {
        "value",
        "values",
        "page",
        "changes",
        "applied",
        "error",
    }
    assert "next_cursor" in document["$defs"]["PageReply"]["required"]
    assert document["$defs"]["ValueReply"]["required"] == ["type", "found"]


def test_combined_schema_names_every_message_kind() -> None:
    document = load("plugin-state")
    assert document["anyOf"] == [
        {"$ref": "#/$defs/WriteCommand"},
        {"$ref": "#/$defs/ReadRequest"},
        {"$ref": "#/$defs/Reply"},
        {"$ref": "#/$defs/ChangeItem"},
    ]
    assert document["$defs"]["ChangeItem"]["properties"]["position"]["type"] == "string"
    assert document["$defs"]["WriteCommand"]["discriminator"]["propertyName"] == "op"
    assert document["$defs"]["ReadRequest"]["discriminator"]["propertyName"] == "op"


# ---------------------------------------------------------------------------- AsyncAPI

NAMES = Names(Settings().prefix)
REPLY_TYPES = {"value", "values", "page", "changes", "applied", "error"}


def resolve(document: dict[str, Any], ref: str) -> Any:
    """The node a local ``$ref`` (a JSON Pointer after ``#``) names; KeyError if none."""
    assert ref.startswith("#/"), f"{ref} is not a reference within the document"
    node: Any = document
    for token in ref.removeprefix("#/").split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


def tags(union: Any) -> set[str]:
    return {str(struct.__struct_config__.tag) for struct in get_args(union)}


def exchange_of(channel: dict[str, Any]) -> str | None:
    name = channel.get("bindings", {}).get("amqp", {}).get("exchange", {}).get("name")
    return None if name is None else str(name)


def channel_at(document: dict[str, Any], address: str | None) -> dict[str, Any]:
    """The channel plugins use at ``address`` on the protocol's exchange (None: replies)."""
    found: dict[str, Any]
    (found,) = [
        channel
        for channel in document["channels"].values()
        if channel["address"] == address
        and (address is None or exchange_of(channel) == NAMES.exchange)
    ]
    return found


def payload_tag(document: dict[str, Any], message_ref: str, tag_field: str) -> str:
    payload = resolve(document, resolve(document, message_ref)["payload"]["$ref"])
    (tag,) = payload["properties"][tag_field]["enum"]
    assert tag_field in payload["required"]
    return str(tag)


def test_asyncapi_document_matches_the_structs() -> None:
    assert ASYNCAPI_PATH.read_text(encoding="utf-8") == render_asyncapi(), (
        "schemas/asyncapi.json is stale: run `python -m schemas.export`"
    )


def test_asyncapi_document_is_a_stable_asyncapi_3_0_0_document() -> None:
    text = render_asyncapi()
    document = json.loads(text)
    assert document["asyncapi"] == "3.0.0"
    assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert document["info"]["title"]
    assert document["info"]["version"]
    assert document["defaultContentType"] == "application/json"
    assert set(document) <= {
        "asyncapi",
        "id",
        "info",
        "servers",
        "defaultContentType",
        "channels",
        "operations",
        "components",
    }
    (server,) = document["servers"].values()
    assert (server["host"], server["protocol"]) == ("localhost:5672", "amqp")


def test_every_ref_in_the_asyncapi_document_resolves_within_it() -> None:
    document = asyncapi()
    found = refs(document)
    assert found
    unresolved = []
    for ref in sorted(found):
        try:
            resolve(document, ref)
        except (KeyError, AssertionError):
            unresolved.append(ref)
    assert not unresolved


@pytest.mark.parametrize(
    ("address", "kinds", "tag_field"),
    [
        (NAMES.command_key("{plugin_id}"), WRITE_OPS, "op"),
        (NAMES.rpc_key("{plugin_id}"), READ_OPS, "op"),
        (None, REPLY_TYPES, "type"),
    ],
    ids=["writes", "reads", "replies"],
)
def test_asyncapi_channel_carries_every_message_kind_of_the_spec(
    address: str | None, kinds: set[str], tag_field: str
) -> None:
    document = asyncapi()
    channel = channel_at(document, address)
    found = {
        name: payload_tag(document, message["$ref"], tag_field)
        for name, message in channel["messages"].items()
    }
    assert set(found.values()) == kinds
    assert all(name == tag for name, tag in found.items())


def test_asyncapi_message_kinds_are_the_tagged_unions() -> None:
    assert tags(WriteCommand) == WRITE_OPS
    assert tags(ReadRequest) == READ_OPS
    assert tags(Reply) == REPLY_TYPES


def test_asyncapi_messages_are_json_with_msgpack_noted_and_correlated() -> None:
    document = asyncapi()
    messages = document["components"]["messages"]
    for name, message in messages.items():
        assert message["contentType"] == "application/json", name
        if name not in {"DeadLetter", "Change"}:  # neither is a request nor a reply
            assert "application/msgpack" in message["description"], name
            correlation = resolve(document, message["correlationId"]["$ref"])
            assert correlation["location"] == "$message.header#/correlation_id"
            headers = resolve(document, message["headers"]["$ref"])
            assert "correlation_id" in headers["properties"], name
            assert headers["properties"]["content_type"]["enum"] == [
                "application/json",
                "application/msgpack",
            ]


def test_asyncapi_describes_the_change_feed() -> None:
    document = asyncapi()
    channel = document["channels"]["changes"]
    assert channel["address"] == "chg.{plugin_id}"
    assert exchange_of(channel) == NAMES.changes
    assert channel["bindings"]["amqp"]["exchange"]["type"] == "topic"
    message = resolve(document, channel["messages"]["change"]["$ref"])
    payload = resolve(document, message["payload"]["$ref"])
    assert {"position", "change", "version", "updated_at"} <= set(payload["required"])
    assert sorted(payload["properties"]["change"]["enum"]) == ["delete", "expire", "set"]
    headers = resolve(document, message["headers"]["$ref"])
    assert headers["properties"]["delivery_mode"]["enum"] == [2]
    operation = document["operations"]["receiveChange"]
    assert operation["action"] == "receive"


def test_asyncapi_payloads_are_the_exported_json_schema_structs() -> None:
    """Never hand-written: each payload is the struct of schemas/json/, refs re-pointed."""
    json_schema_defs = load("plugin-state")["$defs"]
    schemas = asyncapi()["components"]["schemas"]
    union_kinds = {"WriteCommand", "ReadRequest", "Reply"}
    for name, definition in json_schema_defs.items():
        if name in union_kinds:
            continue
        if name == "ChangeItem":  # a message kind of its own: described as the feed's item
            definition = {**definition, "description": schemas[name]["description"]}  # noqa: PLW2901
        text = json.dumps(definition).replace('"#/$defs/', '"#/components/schemas/')
        expected = without_discriminator_objects(json.loads(text))
        assert schemas[name] == expected, name


def without_discriminator_objects(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: without_discriminator_objects(value)
            for key, value in node.items()
            if not (key == "discriminator" and isinstance(value, dict))
        }
    if isinstance(node, list):
        return [without_discriminator_objects(item) for item in node]
    return node


def test_asyncapi_schemas_use_asyncapi_discriminators_only() -> None:
    """AsyncAPI's Schema Object makes ``discriminator`` a string; OpenAPI's object is invalid."""
    assert without_discriminator_objects(asyncapi()) == asyncapi()


def test_asyncapi_error_codes_are_an_enum_of_the_contract() -> None:
    schemas = asyncapi()["components"]["schemas"]
    codes = sorted(get_args(ErrorCode))
    assert sorted(schemas["ErrorReply"]["properties"]["code"]["enum"]) == codes
    assert sorted(schemas["DeadLetterHeaders"]["properties"]["x-reject-code"]["enum"]) == codes


def test_asyncapi_operations_send_writes_and_reads_with_replies_to_reply_to() -> None:
    document = asyncapi()
    for key, operation in document["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), key
        if "reply" in operation:
            reply = operation["reply"]
            assert reply["address"]["location"] == "$message.header#/reply_to"
            assert resolve(document, reply["channel"]["$ref"])["address"] is None
            for message in reply["messages"]:
                assert message["$ref"].startswith(reply["channel"]["$ref"] + "/messages/")
    by_address = {
        resolve(document, operation["channel"]["$ref"])["address"]: operation
        for operation in document["operations"].values()
    }
    write_op = by_address[NAMES.command_key("{plugin_id}")]
    read_op = by_address[NAMES.rpc_key("{plugin_id}")]
    assert (write_op["action"], read_op["action"]) == ("send", "send")
    assert write_op["bindings"]["amqp"]["deliveryMode"] == 2
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in write_op["reply"]["messages"]} == {
        "applied",
        "error",
    }
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in read_op["reply"]["messages"]} == {
        "value",
        "values",
        "changes",
        "page",
        "error",
    }
    read_headers = document["components"]["schemas"]["ReadProperties"]
    assert {"reply_to", "correlation_id"} <= set(read_headers["required"])


def test_asyncapi_bindings_state_the_topology() -> None:
    document = asyncapi()
    bindings = {
        channel["address"]: channel["bindings"]["amqp"]
        for channel in document["channels"].values()
        if channel["address"] is not None and channel["address"].startswith(NAMES.prefix)
    }
    for key in (NAMES.command_key("{plugin_id}"), NAMES.rpc_key("{plugin_id}")):
        channel = channel_at(document, key)
        assert channel["parameters"]["plugin_id"]["$ref"] == "#/components/parameters/plugin_id"
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert channel["bindings"]["amqp"]["is"] == "routingKey"
        assert (exchange["name"], exchange["type"], exchange["durable"]) == (
            NAMES.exchange,
            "topic",
            True,
        )
    commands_type = commands_queue_arguments(Settings())["x-queue-type"]
    assert bindings[NAMES.commands_queue]["x-queue-type"] == commands_type == "quorum"
    assert bindings[NAMES.dead]["x-queue-type"] == "quorum"
    assert bindings[NAMES.rpc_queue]["is"] == "queue"
    for address, binding in bindings.items():
        assert binding["queue"]["name"] == address
        assert binding["queue"]["durable"] is True
    dead_exchanges = [
        channel["bindings"]["amqp"]["exchange"]
        for channel in document["channels"].values()
        if exchange_of(channel) == NAMES.dead
    ]
    assert [exchange["type"] for exchange in dead_exchanges] == ["fanout"]
    dead_headers = document["components"]["schemas"]["DeadLetterHeaders"]["properties"]
    assert {"x-reject-code", "x-reject-reason", "x-original-routing-key"} <= set(dead_headers)
