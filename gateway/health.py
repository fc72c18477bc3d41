"""The admin listener's probes and scrape: ``/healthz`` (the process runs), ``/readyz`` (its policy is
confirmed, so the public listener admits requests) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import os

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .errors import json_response
from .metrics import Metrics
from .watcher import PolicyWatcher


class Health:
    """The three handlers, over the policy watcher and the metrics they report on."""

    def __init__(self, watcher: PolicyWatcher, metrics: Metrics) -> None:
        self.watcher = watcher
        self.metrics = metrics

    async def healthz(self, _request: BaseRequest) -> web.Response:
        return json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(self, _request: BaseRequest) -> web.Response:
        watcher = self.watcher
        ready = not watcher.stale()
        body = {
            "ready": ready,
            "policy_version": watcher.version,
            "policy_age_s": round(watcher.age_s(), 3) if watcher.confirmed_at else None,
            "last_reload_ms": round(watcher.last_reload_s * 1000, 1),
        }
        return json_response(body, status=200 if ready else 503)

    async def metrics_page(self, _request: BaseRequest) -> web.Response:
        body, content_type = self.metrics.render(self.watcher)
        return web.Response(body=body, headers={"Content-Type": content_type})


def add_health_routes(app: web.Application, *, watcher: PolicyWatcher, metrics: Metrics) -> None:
    """Mount ``/healthz``, ``/readyz`` and ``/metrics``."""
    health = Health(watcher, metrics)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics_page)
