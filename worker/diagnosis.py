"""What an operator is told when Postgres or RabbitMQ cannot be reached or refuses: one
line saying what failed, where (the URL, password masked) and what to do, and whether
waiting can cure it.

``run`` waits out what may pass (a service not up yet) and stops at once on what cannot (a
refused login, an unknown role or virtual host); one-shot commands report either as their
one line. A failure not recognised here is not an operator's problem: it is left to raise.
"""

from __future__ import annotations

import errno
import socket
from typing import Final

import aiormq
import asyncpg

from worker.client.errors import BrokerUnreachable
from worker.config import redact_url

DATABASE_SETTING: Final = "--database-url (PLUGIN_STATE_DATABASE_URL)"
AMQP_SETTING: Final = "--amqp-url (PLUGIN_STATE_AMQP_URL)"


class ServiceFailure(Exception):
    """A service failed in a way an operator must hear about; ``str`` is the one line."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent
        """Waiting cannot cure it: the configuration or the service's setup must change."""


def _unreachable(service: str, url: str, exc: OSError, setting: str) -> ServiceFailure:
    if isinstance(exc, socket.gaierror):
        why = "its host name does not resolve"
    elif isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        why = "connection refused"
    elif isinstance(exc, TimeoutError):
        why = "no answer in time"
    else:
        why = exc.strerror or str(exc) or type(exc).__name__
    return ServiceFailure(
        f"cannot reach {service} at {redact_url(url)} ({why}): start {service} there, "
        f"or point {setting} at it",
        permanent=False,
    )


def database_failure(exc: BaseException, url: str) -> ServiceFailure | None:
    """The operator's line for a failure to connect to Postgres, or None."""
    where = redact_url(url)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ServiceFailure(
            f"Postgres at {where} has no such database ({exc}): run `plugin-state-worker "
            f"migrate` to create it, or fix the name in {DATABASE_SETTING}",
            permanent=True,
        )
    if isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return ServiceFailure(
            f"Postgres at {where} refused the login ({exc}): fix the user or password in "
            f"{DATABASE_SETTING}, or create that role",
            permanent=True,
        )
    if isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.TooManyConnectionsError):
        return ServiceFailure(
            f"Postgres at {where} does not take connections now ({exc}): wait, or raise its "
            "max_connections",
            permanent=False,
        )
    if isinstance(exc, OSError):
        return _unreachable("Postgres", url, exc, DATABASE_SETTING)
    return None


def broker_failure(exc: BaseException, url: str) -> ServiceFailure | None:
    """The operator's line for a failure to connect to RabbitMQ, or None. When no node of
    several answered, the last one's reason is the one told (each was tried)."""
    if isinstance(exc, BrokerUnreachable) and exc.__cause__ is not None:
        exc = exc.__cause__
    where = redact_url(url)
    if isinstance(
        exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
    ):
        return ServiceFailure(
            f"RabbitMQ at {where} refused the login: fix the user or password in {AMQP_SETTING}",
            permanent=True,
        )
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return ServiceFailure(
            f"RabbitMQ at {where} closed the connection before opening it (an unknown "
            f"virtual host, or one the user may not use): fix the vhost in {AMQP_SETTING}, or "
            "grant the user access to it",
            permanent=True,
        )
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and exc.args:
        code, *_ = exc.args
        if isinstance(code, int):
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError(code, "")
            if code == socket.EAI_NONAME or isinstance(exc.__cause__, socket.gaierror):
                cause = socket.gaierror(code, "")
            return _unreachable("RabbitMQ", url, cause, AMQP_SETTING)
    if isinstance(exc, OSError):
        return _unreachable("RabbitMQ", url, exc, AMQP_SETTING)
    return None
