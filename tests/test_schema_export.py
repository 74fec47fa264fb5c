"""The exported JSON Schema files are current and state the contract to other languages.

``jsonschema`` is not a dependency, so the schemas' meaning is checked through their
structure: the tag on ``op``, the required fields, the rules on names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas.export import DIALECT, DIRECTORY, render, write
from schemas.messages import MAX_BATCH_OPS, MAX_NAME_LENGTH, NAME_PATTERN, SCOPE_KINDS


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
    (tmp_path / "renamed-message.schema.json").write_text("{}\n", encoding="utf-8")
    written = write(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(render())
    assert all(path.read_text(encoding="utf-8") == render()[path.name] for path in written)


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
    ]
    assert document["$defs"]["WriteCommand"]["discriminator"]["propertyName"] == "op"
    assert document["$defs"]["ReadRequest"]["discriminator"]["propertyName"] == "op"
