"""What the client raises of its own: failures on its side of the wire (the broker, the
connection, the clock), as opposed to the worker's answers, which are the contract's
``schemas.errors.StateError`` subclasses (``InvalidRequest``, ``WritePending``...)."""

from __future__ import annotations

import uuid


class ClientError(Exception):
    """A failure on the client's side of the wire: the broker, the connection, the clock."""


class NotConnected(ClientError):
    """The client is not connected: ``connect()`` was not called, or it was closed."""


class BrokerUnreachable(ClientError, ConnectionError):
    """No address of the broker answered (each node of a cluster was tried once)."""


class RequestTimeout(ClientError, TimeoutError):
    """No confirm or no reply before the call's deadline."""


class PublishRefused(ClientError):
    """The broker refused the message: a nack (e.g. the commands queue is full), or a
    channel error such as a ``user_id`` that is not the connection's user."""


class Unroutable(ClientError):
    """The broker could not route the message: no such exchange, or no queue bound."""


class Conflict(ClientError):
    """A conditional write's condition did not hold (protocol §7): nothing changed.
    ``failed_op`` is the index of the first failing op of a batch."""

    def __init__(self, write_id: uuid.UUID, failed_op: int | None = None) -> None:
        where = "" if failed_op is None else f" (op {failed_op} failed)"
        super().__init__(f"the condition of write {write_id} did not hold{where}")
        self.write_id = write_id
        self.failed_op = failed_op


class UnexpectedReply(ClientError):
    """The reply does not answer the request (another type, another write id)."""
