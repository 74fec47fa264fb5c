"""The wire contract as JSON Schema (draft 2020-12), generated from the msgspec structs.

Plugins in other languages validate against ``schemas/json/``. The files are never edited by
hand: ``python -m schemas.export`` rewrites them, and a test fails when they are stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec

from schemas.messages import ReadRequest, Reply, WriteCommand

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
DIRECTORY: Final = Path(__file__).parent / "json"


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
        "value holds no U+0000, NaN or Infinity and is at most 1 MiB of JSON by default.",
    ),
    Message(
        "read-request",
        "ReadRequest",
        ReadRequest,
        "A read a plugin publishes with routing key rpc.<plugin_id>, with reply_to and "
        "correlation_id: get, get_many or list, chosen by `op`.",
    ),
    Message(
        "reply",
        "Reply",
        Reply,
        "What the worker sends back to reply_to, chosen by `type`: a value, values, a page, "
        "an applied write, or an error with a code of the contract.",
    ),
)
COMBINED_NAME: Final = "plugin-state"
COMBINED_DESCRIPTION: Final = (
    "Any message of the plugin state protocol. Each message kind is also under $defs "
    "(WriteCommand, ReadRequest, Reply) and has a schema file of its own."
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


def write(directory: Path = DIRECTORY) -> list[Path]:
    """(Re)write every schema file into ``directory``, removing ones no longer rendered."""
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
    return written


def main() -> None:
    for path in write():
        print(path)


if __name__ == "__main__":
    main()
