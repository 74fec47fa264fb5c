"""One connection to a broker with several addresses (the nodes of a cluster): it starts on
any live node and, when that node goes down, moves to another.

``connect`` tries the addresses in a random order (so that many clients and workers spread
over the nodes), each once, and returns the first connection that opens; when none opens
it raises ``BrokerUnreachable``, naming every node and why. The connection is aio-pika's
robust one, so channels, declared queues and consumers come back after a reconnect as
before; what changes is where it reconnects: every attempt takes the next address of the
rotation, and after a whole round of them failed the pause before the next round doubles,
up to ``retry_max``. So a connection whose node died is on another node about as soon as
that node answers, and one whose every node is down waits a bounded time between rounds.

The worker uses it too (``worker.app``, ``worker.dead_letters``): the server may import
the client, never the other way round.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from schemas.brokers import host_of, redact, split_urls

from .errors import BrokerUnreachable
from .log import get_logger

log = get_logger(__name__)

RETRY_INITIAL: Final = 0.2
"""The pause between two addresses of a round, and the first pause after a failed round."""
RETRY_MAX: Final = 10.0
"""The longest pause between two rounds."""


class FailoverConnection(RobustConnection):
    """A robust connection that reconnects to the next of its addresses each time.

    aio-pika's robust connection makes every (re)connection attempt through one private
    method, which this class wraps to pick the address first; the pause aio-pika takes
    after a failed attempt is ``reconnect_interval``, which it sets to the back-off."""

    def __init__(
        self,
        urls: Sequence[str],
        start: int = 0,
        *,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        **kwargs: Any,
    ) -> None:
        self.urls = tuple(urls)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._current = start % len(self.urls)
        self._failed_in_round = 0
        self._round_pause = retry_initial
        self._attempts = 0
        self._ever_connected = False
        super().__init__(URL(self.urls[self._current]), reconnect_interval=retry_initial, **kwargs)

    @property
    def node(self) -> str:
        """``host:port`` of the address in use (or being tried): safe to log."""
        return host_of(self.urls[self._current])

    async def _RobustConnection__connect_transport(self) -> None:
        # After the first attempt, each one takes the next address: a node that went down
        # is not tried again until the others were.
        if self._attempts:
            self._current = (self._current + 1) % len(self.urls)
            self.url = URL(self.urls[self._current])
        self._attempts += 1
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except CONNECTION_EXCEPTIONS as exc:
            self._failed_in_round += 1
            if self._failed_in_round >= len(self.urls):
                # Every node refused: wait longer before the next round.
                self._failed_in_round = 0
                self.reconnect_interval = self._round_pause
                self._round_pause = min(self._round_pause * 2, self.retry_max)
            else:
                self.reconnect_interval = self.retry_initial
            # A first connection's failures are its caller's to tell (it tries every
            # node, then raises BrokerUnreachable): only a lost node's are news here.
            report = log.warning if self._ever_connected else log.debug
            report(
                "broker_node_unreachable",
                node=self.node,
                error=redact(repr(exc)),
                retry_in=self.reconnect_interval,
            )
            raise
        self._failed_in_round = 0
        self._round_pause = self.retry_initial
        self.reconnect_interval = self.retry_initial
        self._ever_connected = True
        log.info("broker_connected", node=self.node, nodes=len(self.urls))


C = TypeVar("C")


async def any_node(
    urls: str | Sequence[str],
    open_node: Callable[[tuple[str, ...], int], Awaitable[C]],
    *,
    shuffle: bool = True,
) -> C:
    """``open_node(addresses, i)`` for each address in a random order (so that clients
    spread over the nodes) until one opens; ``BrokerUnreachable`` when none does."""
    addresses = split_urls(urls)
    order = list(range(len(addresses)))
    if shuffle:
        random.shuffle(order)
    failures: list[str] = []
    last: BaseException | None = None
    for start in order:
        try:
            return await open_node(addresses, start)
        except CONNECTION_EXCEPTIONS as exc:
            failures.append(f"{host_of(addresses[start])}: {redact(str(exc) or repr(exc))}")
            last = exc
    raise BrokerUnreachable(f"no RabbitMQ node answered ({'; '.join(failures)})") from last


async def connect(
    urls: str | Sequence[str],
    *,
    timeout: float | None = None,
    connection_name: str | None = None,
    retry_initial: float = RETRY_INITIAL,
    retry_max: float = RETRY_MAX,
    shuffle: bool = True,
) -> FailoverConnection:
    """A robust connection to any of ``urls`` (a comma-separated string or a sequence; see
    ``schemas.brokers``) that moves to another when its node goes down."""

    async def open_node(addresses: tuple[str, ...], start: int) -> FailoverConnection:
        connection = FailoverConnection(
            addresses,
            start,
            retry_initial=retry_initial,
            retry_max=retry_max,
            client_properties=None
            if connection_name is None
            else {"connection_name": connection_name},
        )
        try:
            await connection.connect(timeout=timeout)
        except BaseException:
            await connection.close()
            raise
        return connection

    return await any_node(urls, open_node, shuffle=shuffle)
