"""What every command prints as data: one compact JSON object per line, its timestamps
written as the wire writes them (RFC 3339 with a ``+00:00`` offset, ``datetime.isoformat``),
whichever command prints it, so a script reads ``plugins list``, ``get``, ``watch`` and
``dead list --json`` alike."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import msgspec

_encoder: Final = msgspec.json.Encoder()


def json_line(fields: Mapping[str, Any]) -> str:
    """``fields`` as one line of compact JSON, keys in the order given."""
    return _encoder.encode({k: _as_wire(v) for k, v in fields.items()}).decode()


def _as_wire(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
