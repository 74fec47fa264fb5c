"""Where the tests find RabbitMQ and Postgres.

``PLUGIN_STATE_TEST_DATABASE_URL`` (a database the tests may create others from) and
``PLUGIN_STATE_TEST_AMQP_URL`` win; without them, testcontainers starts both where a Docker
engine answers; otherwise the services on localhost are used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

LOCAL_DATABASE = "postgresql://postgres@localhost:5432/postgres"
LOCAL_AMQP = "amqp://guest:guest@localhost:5672/"


@dataclass(frozen=True)
class ServiceUrls:
    admin_database_url: str
    amqp_url: str


def _docker_available() -> bool:
    try:
        import docker  # noqa: PLC0415 - testcontainers' dependency, optional here

        docker.from_env().ping()
    except Exception:  # noqa: BLE001 - any failure means "no usable engine"
        return False
    return True


@contextlib.contextmanager
def service_urls() -> Iterator[ServiceUrls]:
    db = os.environ.get("PLUGIN_STATE_TEST_DATABASE_URL")
    amqp = os.environ.get("PLUGIN_STATE_TEST_AMQP_URL")
    if db and amqp:
        yield ServiceUrls(db, amqp)
        return
    if not _docker_available():
        yield ServiceUrls(db or LOCAL_DATABASE, amqp or LOCAL_AMQP)
        return
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415
    from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        if not db:
            pg = stack.enter_context(PostgresContainer("postgres:16", driver=None))
            db = pg.get_connection_url()
        if not amqp:
            mq = stack.enter_context(RabbitMqContainer("rabbitmq:3.13"))
            params = mq.get_connection_params()
            amqp = f"amqp://guest:guest@{params.host}:{params.port}/"
        yield ServiceUrls(db, amqp)
