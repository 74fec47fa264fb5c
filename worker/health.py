"""The worker's HTTP face: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for
orchestrators. ``/healthz`` answers while the process runs; ``/readyz`` only while the
worker reaches RabbitMQ and Postgres and consumes, so a paused or cut-off worker is taken
out of rotation (and KEDA or the operator sees why in the body).

What the pages say comes from two functions the server is given: a worker process answers
from its own registry and state; the supervisor of a split worker (``worker.supervisor``)
from its processes' own pages, which ``merged_readiness`` and ``merged_metrics`` combine.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterable, Mapping

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from worker.config import DEFAULT_HTTP_PORT, HTTP_PORT_TRIES
from worker.diagnosis import ServiceFailure

log = structlog.get_logger(__name__)

Readiness = Callable[[], Awaitable[Mapping[str, bool]]]
"""The checks of /readyz, by name: ready when every one is true."""
Exposition = Callable[[], Awaitable[bytes]]
"""The body of /metrics, in Prometheus' text format."""


class HealthServer:
    def __init__(
        self, readiness: Readiness, exposition: Exposition, host: str, port: int | None
    ) -> None:
        """``port`` None: the default port, or the next free one when another process of
        the host has it; any other port is the operator's choice, and taken it is an error."""
        self.readiness = readiness
        self.exposition = exposition
        self.host = host
        self.chosen = port is not None
        self.port = DEFAULT_HTTP_PORT if port is None else port
        self.serving = asyncio.Event()
        """Set once the server listens on ``port``."""
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
        self.serving.set()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks = dict(await self.readiness())
        ready = all(checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


def registry_exposition(registry: CollectorRegistry) -> Exposition:
    """/metrics of one process: its registry."""

    async def exposition() -> bytes:
        return generate_latest(registry)

    return exposition


def merged_readiness(checks: Iterable[Mapping[str, bool]]) -> dict[str, bool]:
    """Several processes' checks as one worker's: a check holds when it holds in every
    process that reports it (each reports true what is not its role's)."""
    merged: dict[str, bool] = {}
    for process in checks:
        for name, value in process.items():
            merged[name] = merged.get(name, True) and value
    return merged


def merged_metrics(expositions: Mapping[str, str], label: str) -> bytes:
    """Several processes' /metrics as one page: every sample gets ``label`` naming its
    process (the same metric of two processes would otherwise be one series twice), and a
    family's samples stay together, as the text format requires."""
    families: dict[str, Metric] = {}
    for process, text in expositions.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                merged.add_sample(
                    sample.name,
                    {**sample.labels, label: process},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector of metric families already made (prometheus_client's Collector protocol)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families
