"""Who may act for which plugin (protocol §6), decided per message.

RabbitMQ vouches for the AMQP ``user_id`` property: it refuses a publish whose ``user_id``
is not the connection's user. In strict mode (the default) every message must carry it,
and the user must be the plugin's ``amqp_user`` or a trusted user. The routing key's
plugin id must equal the body's, so topic permissions and the body never disagree.

A caller that may not act for a plugin is told ``forbidden`` whether or not the plugin
exists: nobody learns about plugins that are not theirs. Only trusted users (and, in
permissive mode, anonymous callers) hear ``unknown_plugin``.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from schemas.errors import Forbidden, StateError, UnknownPlugin

if TYPE_CHECKING:
    from worker.config import Settings

AuthMode = Literal["strict", "permissive"]
Route = Literal["cmd", "rpc"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a message (its broker-validated ``user_id``) and where they sent it."""

    user_id: str | None
    routing_key: str


@functools.lru_cache(maxsize=4096)
def routed_plugin(routing_key: str, route: Route) -> uuid.UUID | None:
    """The plugin id a routing key names (``cmd.<id>`` / ``rpc.<id>``), if it names one.

    Remembered for the last few thousand keys: every message asks, twice, and a plugin's
    messages all carry the same key (parsing the id was a tenth of a write's intake)."""
    kind, _, rest = routing_key.partition(".")
    if kind != route:
        return None
    try:
        return uuid.UUID(rest)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Authorizer:
    trusted_users: frozenset[str]
    mode: AuthMode = "strict"

    @classmethod
    def from_settings(cls, settings: Settings) -> Authorizer:
        return cls(
            settings.trusted_users, "strict" if settings.auth_mode == "strict" else "permissive"
        )

    def check(
        self,
        caller: Caller,
        plugin_id: uuid.UUID,
        owners: Mapping[uuid.UUID, str | None],
        route: Route,
    ) -> StateError | None:
        """None when ``caller`` may act for ``plugin_id``; otherwise the error to give.

        ``owners`` maps every registered plugin of interest to its ``amqp_user``.
        """
        routed = routed_plugin(caller.routing_key, route)
        if routed is None or routed.int != plugin_id.int:
            return Forbidden(
                f"routing key {caller.routing_key!r} does not name plugin {plugin_id} "
                f"(expected {route}.{plugin_id})"
            )
        user = caller.user_id
        if user is None and self.mode == "strict":
            return Forbidden("the message carries no user_id: strict mode requires it")
        if user is None or user in self.trusted_users:
            if plugin_id not in owners:
                return UnknownPlugin(f"plugin {plugin_id} is not registered")
            return None
        if owners.get(plugin_id) != user:
            return Forbidden(f"user {user!r} may not act for plugin {plugin_id}")
        return None
