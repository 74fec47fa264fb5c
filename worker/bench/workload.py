"""Realistic write commands and read requests, reproducible from a seed.

Writes are what plugins send: ``set`` (about 80 %) and ``delete`` over a set of entries,
JSON values of 100 to 500 bytes shaped like cursors, settings and notes, each command with
a fresh UUIDv7 id. Bodies are encoded up front so that publishing measures the broker, not
the encoder.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from worker.client import MonotonicUuid7

DELETE_SHARE: Final = 0.2
VALUE_BYTES: Final = (100, 500)
_SCOPES: Final = ("issue", "project", "agent", "run")
_WORDS: Final = (
    *("cursor", "sync", "page", "token", "retry", "webhook", "label", "status", "owner"),
    *("draft", "review", "merged", "queued", "pending", "closed", "triage", "backlog"),
    *("sprint", "estimate", "comment", "mention", "digest"),
)

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class EntryName:
    """Where an entry lives; every bench entry has a scope id and the default namespace."""

    scope_kind: str
    scope_id: str
    key: str

    def as_json(self) -> dict[str, Any]:
        return {
            "scope_kind": self.scope_kind,
            "scope_id": self.scope_id,
            "namespace": "default",
            "key": self.key,
        }


def entry_names(count: int, *, key_prefix: str = "k") -> list[EntryName]:
    """``count`` distinct entries spread over scope kinds and scope ids."""
    return [
        EntryName(_SCOPES[n % len(_SCOPES)], f"S-{n // 8}", f"{key_prefix}{n}")
        for n in range(count)
    ]


def json_value(rng: random.Random, n: int) -> dict[str, Any]:
    """A JSON object whose encoding is 100 to 500 bytes, like a cursor or a small note."""
    target = rng.randint(*VALUE_BYTES)
    value: dict[str, Any] = {
        "n": n,
        "status": rng.choice(_WORDS),
        "page": rng.randrange(1000),
        "done": rng.random() < 0.5,
        "tags": rng.sample(_WORDS, 3),
        "note": "",
    }
    room = target - len(_encoder.encode(value))
    words: list[str] = []
    while room > 0:
        word = rng.choice(_WORDS)
        words.append(word)
        room -= len(word) + 1
    value["note"] = " ".join(words)[: max(0, target - len(_encoder.encode(value)))]
    return value


@dataclass
class WriteStream:
    """``count`` write commands of one plugin over ``entries``, in publishing order.

    ``final`` is each touched entry's last id: once the version register holds all of
    them, every write has been applied.
    """

    plugin_id: uuid.UUID
    count: int
    entries: list[EntryName]
    seed: int = 0
    conditional_share: float = 0.0
    """Of the writes, how many are claims: a set of an entry of its own, ``if_absent``
    (applied whatever the order, so the run ends when every final id is stored)."""
    claims_conditional: bool = True
    """False: the same claims as plain sets, the same stream otherwise: what the
    conditions cost, and nothing else, is the difference."""
    bodies: list[bytes] = field(default_factory=list)
    final: dict[EntryName, uuid.UUID] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        new_id = MonotonicUuid7()
        for n in range(self.count):
            write_id = new_id()
            if self.conditional_share and rng.random() < self.conditional_share:
                claim = EntryName("run", f"C-{n // 8}", f"claim{n}")
                value = {**json_value(rng, n), "claimed": True}
                self.bodies.append(
                    set_body(
                        self.plugin_id,
                        write_id,
                        claim,
                        value,
                        if_absent=self.claims_conditional,
                    )
                )
                self.final[claim] = write_id
                continue
            entry = rng.choice(self.entries)
            op = "delete" if rng.random() < DELETE_SHARE else "set"
            self.bodies.append(write_body(self.plugin_id, op, write_id, entry, rng, n))
            self.final[entry] = write_id


def write_body(
    plugin_id: uuid.UUID,
    op: str,
    write_id: uuid.UUID,
    entry: EntryName,
    rng: random.Random,
    n: int,
) -> bytes:
    """A ``set`` (with a fresh value) or a ``delete`` command."""
    if op == "set":
        return set_body(plugin_id, write_id, entry, json_value(rng, n))
    return _encoder.encode(
        {"op": op, "id": str(write_id), "plugin_id": str(plugin_id), **entry.as_json()}
    )


def set_body(
    plugin_id: uuid.UUID,
    write_id: uuid.UUID,
    entry: EntryName,
    value: dict[str, Any],
    *,
    if_absent: bool = False,
) -> bytes:
    condition = {"if_absent": True} if if_absent else {}
    return _encoder.encode(
        {
            "op": "set",
            "id": str(write_id),
            "plugin_id": str(plugin_id),
            **entry.as_json(),
            "value": value,
            **condition,
        }
    )


def get_body(plugin_id: uuid.UUID, entry: EntryName) -> bytes:
    return _encoder.encode({"op": "get", "plugin_id": str(plugin_id), **entry.as_json()})


def get_many_body(plugin_id: uuid.UUID, entries: list[EntryName]) -> bytes:
    return _encoder.encode(
        {
            "op": "get_many",
            "plugin_id": str(plugin_id),
            "entries": [entry.as_json() for entry in entries],
        }
    )
