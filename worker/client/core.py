"""What every part of the client shares: the wire, the contract's names and encoding, the
write id clock, the memory of this client's writes, and the near cache (when it has one).

``StateClient`` is assembled from parts that each read top to bottom: ``writes``
(``set``, ``delete``, ``batch``, ``update``), ``reads`` (``get``, ``get_many``, ``list``,
``changes``), ``watch`` (following the change log), over ``connection`` (the wire) and
``cache`` (the near cache).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from schemas.codec import Codec
from schemas.topology import Names

from .connection import Connection
from .ids import LastWrites, MonotonicUuid7
from .models import EntryKey

if TYPE_CHECKING:
    from .cache import NearCache
    from .coalesce import Coalescer


class ClientCore:
    """The state the parts of ``StateClient`` share (set up by ``StateClient.__init__``)."""

    plugin_id: uuid.UUID
    timeout: float
    _wire: Connection
    _names: Names
    _codec: Codec
    _new_id: MonotonicUuid7
    _last_writes: LastWrites[EntryKey]
    _cache: NearCache | None
    _coalescer: Coalescer | None
