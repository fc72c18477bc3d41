"""Wiring of the two listeners over a started runtime (runtime.py): the public server, one handler for
every path (public.py), and the admin application (health.py's probes and the operator API)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .admin.api import register_admin_routes
from .admin.context import AdminContext
from .console.routes import register_console_routes
from .errors import decision_label
from .health import add_health_routes
from .impact import ImpactLimits, ImpactPreview
from .listener import JsonErrorServer
from .network import TrustedProxies
from .public import PublicPath
from .runtime import Runtime

RUNTIME_KEY: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


def create_public_server(runtime: Runtime) -> JsonErrorServer:
    """The public listener: one handler for every path, no router; nothing admin lives here.

    aiohttp's keep-alive timer also runs from a connection's start and while a
    request's head is incomplete, so it cuts slow header senders after
    ``header_read_timeout_s`` (aiohttp has no header read timeout of its own).
    """
    return request_server(
        runtime, PublicPath(runtime).handle, keepalive_timeout=runtime.settings.limits.header_read_timeout_s
    )


def request_server(
    runtime: Runtime, handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]], *, keepalive_timeout: float
) -> JsonErrorServer:
    """A listener whose one handler decides requests (the public one, the authz one): what the HTTP
    layer refuses before the handler runs is counted in the request metrics too."""
    limits = runtime.settings.limits
    metrics = runtime.metrics

    def rejected(status: int, code: str) -> None:
        metrics.request_done(
            decision=decision_label(status), code=code, model="", tier="", duration_s=0.0, upstream_s=0.0
        )

    return JsonErrorServer(
        handler,
        policy_version=runtime.policy_version,
        on_rejected=rejected,
        handler_cancellation=True,
        keepalive_timeout=keepalive_timeout,
        access_log=None,
        # Request bodies are decoded by the gateway itself (request_model.py), bounded,
        # once, and sent upstream decoded: never by the server underneath it.
        auto_decompress=False,
        max_field_size=limits.max_header_bytes,
        max_line_size=limits.max_header_bytes,
    )


def create_admin_app(runtime: Runtime) -> web.Application:
    """The admin listener: health, readiness, metrics, the operator API and the operator console."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RUNTIME_KEY] = runtime
    add_health_routes(app, watcher=runtime.watcher, metrics=runtime.metrics)
    api = register_admin_routes(app, admin_context(runtime))
    settings = runtime.settings
    register_console_routes(
        app,
        api,
        trusted=TrustedProxies(settings.network.trusted_proxies),
        metrics=lambda: runtime.metrics.render(runtime.watcher)[0].decode(),
        max_staleness_s=settings.policy.max_staleness_s,
    )
    return app


def admin_context(runtime: Runtime) -> AdminContext:
    """The components the operator API uses."""
    s = runtime.settings
    return AdminContext(
        store=runtime.store,
        policy=runtime.watcher,
        admission=runtime.admission,
        rules=runtime.rules,
        tiers=tuple(s.tiers),
        screening=s.screening,
        admin=s.admin,
        environ=runtime.environ,
        # admin.impact.hours is both a preview's default window and the longest it may ask for.
        impact=ImpactPreview(
            store=runtime.store,
            admission=runtime.admission,
            rules=runtime.rules,
            screening=s.screening,
            limits=ImpactLimits(
                hours=s.admin.impact.hours,
                max_records=s.admin.impact.max_records,
                max_callers=s.admin.impact.max_callers,
                timeout_s=s.admin.impact.timeout_s,
            ),
            clock=runtime.clock,
        ),
    )
