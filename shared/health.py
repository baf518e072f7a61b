"""The HTTP side of every service: /healthz, /readyz, /metrics (aiohttp).

/healthz answers 503 once the process is dead inside (a consumer died): it is about to
exit, and an orchestrator that only probes restarts it all the same.

Services may add routes of their own (the ingest door, profile lookups) before start.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import __version__
from shared.metrics import ServiceMetrics

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else the reason it is not."""


class HealthServer:
    def __init__(
        self,
        service: str,
        metrics: ServiceMetrics,
        readiness: ReadinessCheck,
        host: str,
        port: int,
        *,
        liveness: Callable[[], str | None] | None = None,
        details: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.service = service
        self._details = details or dict
        self.app = web.Application()
        self._metrics = metrics
        self._readiness = readiness
        self._liveness = liveness or (lambda: None)
        self._host = host
        self._port = port
        self._started = time.monotonic()
        self._runner: web.AppRunner | None = None
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics_view)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0: any free port)."""
        if self._runner is None or not self._runner.addresses:
            return self._port
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, _request: web.Request) -> web.Response:
        dead = self._liveness()
        return web.json_response(
            {
                "service": self.service,
                "version": __version__,
                "status": "alive" if dead is None else "dead",
                "uptime_s": round(time.monotonic() - self._started, 3),
                **({} if dead is None else {"reason": dead}),
            },
            status=200 if dead is None else 503,
        )

    async def _readyz(self, _request: web.Request) -> web.Response:
        reason = await self._readiness()
        extra = self._details()
        if reason is None:
            return web.json_response({"service": self.service, "ready": True, **extra})
        return web.json_response(
            {"service": self.service, "ready": False, "reason": reason, **extra}, status=503
        )

    async def _metrics_view(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
