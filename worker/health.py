"""The worker's HTTP face: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for
orchestrators. ``/healthz`` answers while the process runs; ``/readyz`` only while the
worker reaches RabbitMQ and Postgres and consumes, so a paused or cut-off worker is taken
out of rotation (and KEDA or the operator sees why in the body)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.config import DEFAULT_HTTP_PORT, HTTP_PORT_TRIES
from worker.diagnosis import ServiceFailure

log = structlog.get_logger(__name__)

Readiness = Callable[[], Mapping[str, bool]]


class HealthServer:
    def __init__(
        self, registry: CollectorRegistry, readiness: Readiness, host: str, port: int | None
    ) -> None:
        """``port`` None: the default port, or the next free one when another process of
        the host has it; any other port is the operator's choice, and taken it is an error."""
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.chosen = port is not None
        self.port = DEFAULT_HTTP_PORT if port is None else port
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        wanted = self.port
        candidates = [wanted] if self.chosen else [*range(wanted, wanted + HTTP_PORT_TRIES), 0]
        for port in candidates:
            try:
                await web.TCPSite(self._runner, self.host, port).start()
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if self.chosen:
                    raise ServiceFailure(
                        f"cannot serve HTTP on {self.host}:{port}: another process has that "
                        "port; set PLUGIN_STATE_HTTP_PORT to a free one (0 picks any), or "
                        "leave it unset to let the worker find one",
                        permanent=True,
                    ) from None
        # With port 0 the system picked one: report the real one.
        for address in self._runner.addresses:
            self.port = int(address[1])
            break
        if wanted and self.port != wanted:
            log.info("http_port_moved", wanted=wanted, port=self.port, reason="in use")
        log.info("http_serving", host=self.host, port=self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks = dict(self.readiness())
        ready = all(checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)
