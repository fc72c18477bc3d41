"""Wiring: the runtime's clients and their lifecycle, the public request path, both listeners.

The public path runs, in order: request id -> method and client address ->
policy freshness (row 10) -> identity (row 1) -> countries -> the rest of the
request's canonical view (decoded body, model, headers to forward;
request_model.py) -> decision (rows 2-8) -> rate limit (row 9) -> streaming proxy
of that same view -> metrics and audit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_request import BaseRequest

from .admin.api import register_admin_routes
from .admin.context import AdminContext
from .audit import AuditLog
from .errors import GatewayError, decision_label, error_response, json_response
from .geo import GeoResolver
from .identity import Authenticator, AuthError, Identity
from .jwks import JwksFetcher, KeyRing
from .listener import JsonErrorServer
from .logs import bind_request, log_access, request_id_for
from .metrics import Metrics
from .model_list import forward_model_list, lists_models
from .network import TrustedProxies
from .policy.decide import Rules, clip, decide, path_model
from .policy.model import Decision
from .proxy import SKIP_AUTO_HEADERS, Forwarder, ProxyOutcome, Router
from .ratelimit import RateLimiter, RateResult
from .request_model import RequestReader
from .settings import Settings, read_secret
from .storage.store import Store
from .watcher import PolicyWatcher

log = logging.getLogger("gateway.app")

CLIENT_CLOSED = 499  # as nginx logs it: the caller closed the connection before the answer was complete
_UNSAFE_HEADER_CHARS = re.compile(r"[^\x20-\x24\x26-\x7e]+")  # all but printable ASCII, and "%" itself


@functools.lru_cache(maxsize=4096)
def identity_headers(subject: str, org: str | None, tier: str) -> tuple[tuple[str, str], ...]:
    """The ``X-Gateway-*`` headers for one caller (a hot caller's are encoded once)."""
    return (("X-Gateway-Subject", header_safe(subject)), ("X-Gateway-Org", header_safe(org)),
            ("X-Gateway-Tier", header_safe(tier)))


def header_safe(value: str | None) -> str:
    """Claims become upstream header values: printable ASCII only, and reversibly so.

    Everything else (controls, non-ASCII) and ``%`` itself become the percent-encoded UTF-8 bytes,
    as do spaces at either end (parsers strip them), so the upstream can decode a value exactly and
    two different claims never arrive as the same header value.
    """
    if not value:
        return ""
    encoded = _UNSAFE_HEADER_CHARS.sub(
        lambda m: "".join(f"%{byte:02X}" for byte in m.group().encode("utf-8", "surrogatepass")), value)
    if encoded[:1] == " " or encoded[-1:] == " ":
        core = encoded.strip(" ")
        lead = len(encoded) - len(encoded.lstrip(" "))
        trail = len(encoded) - len(encoded.rstrip(" ")) if core else 0
        encoded = "%20" * lead + core + "%20" * trail
    return encoded


@dataclass(slots=True)
class Exchange:
    """What one public request did, for metrics and the audit record."""

    request_id: str
    started: float
    identity: Identity | None = None
    ip: str = ""
    ip_country: str | None = None
    model: str | None = None
    decision: Decision | None = None
    status: int = 0
    code: str = ""
    outcome: ProxyOutcome = field(default_factory=ProxyOutcome)
    rate: RateResult | None = None


class Gateway:
    """One process's runtime: clients, policy watcher, limiter, observability."""

    def __init__(self, settings: Settings, *, redis_url: str, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.clock = clock
        self.monotonic = monotonic
        self.environ = os.environ if environ is None else environ
        self.rules = Rules.from_settings(settings)
        self.trusted = TrustedProxies(settings.network.trusted_proxies)
        limits = settings.limits
        self.reader = RequestReader(trusted=self.trusted, model_path_pattern=settings.policy.model_path_pattern,
                                    max_body_bytes=limits.max_body_bytes,
                                    body_read_timeout_s=limits.body_read_timeout_s,
                                    body_gap_timeout_s=limits.header_read_timeout_s)
        self.metrics = Metrics(settings)
        self.keyring = KeyRing.from_settings(settings.auth, self.environ)
        self.authenticator = Authenticator(settings.auth, settings.tiers.keys(), self.keyring, clock=clock,
                                           on_unknown_kid=self._on_unknown_kid)
        self.geo = GeoResolver(settings.network.geoip_db)
        upstream_key = read_secret(settings.upstream.api_key_env, self.environ)
        self.upstream_auth = f"Bearer {upstream_key}" if upstream_key else None
        self.store: Store | None = None
        self.watcher: PolicyWatcher | None = None
        self.limiter: RateLimiter | None = None
        self.session: aiohttp.ClientSession | None = None
        self.forwarder: Forwarder | None = None
        self.jwks: JwksFetcher | None = None
        self.audit: AuditLog | None = None

    def policy_version(self) -> int:
        """The policy version this process enforces; 0 before it has a watcher or a policy."""
        return self.watcher.version if self.watcher is not None else 0

    def _on_unknown_kid(self) -> None:
        if self.jwks is not None:
            self.jwks.request_refresh()

    async def start(self) -> None:
        s = self.settings
        password = read_secret(s.redis.password_env, self.environ)
        self.store = Store.from_url(self.redis_url, timeout_s=s.redis.timeout_s, password=password,
                                    tls=s.redis.tls_options(), policy_timeout_s=s.redis.policy_timeout_s,
                                    lean_wire=True, ssl_context=s.redis.ssl_context)
        self.store.on_error = self.metrics.redis_error
        connector = aiohttp.TCPConnector(limit=s.upstream.max_connections, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=SKIP_AUTO_HEADERS)
        self.forwarder = Forwarder(self.session, Router(s.upstream.url, s.upstream.routes),
                                   read_timeout_s=s.upstream.read_timeout_s,
                                   connect_timeout_s=s.upstream.connect_timeout_s, clock=time.perf_counter)
        self.limiter = RateLimiter(self.store, s.tiers, on_fallback=self.metrics.ratelimit_fallback,
                                   timeout_s=s.redis.timeout_s)
        if s.auth.jwks_url:
            self.jwks = JwksFetcher(s.auth.jwks_url, self.keyring, self.session,
                                    refresh_s=s.auth.jwks_refresh_s, cooldown_s=s.auth.jwks_cooldown_s)
            await self.jwks.start()
        self.watcher = PolicyWatcher(self.store, s, clock=self.clock, monotonic=self.monotonic)
        self.watcher.on_change.append(self.metrics.policy_loaded)
        await self.watcher.start()
        self.metrics.start(self.watcher)
        self.audit = AuditLog(self.store, s.audit, metrics=self.metrics)
        await self.audit.start()

    async def close(self) -> None:
        await self.metrics.close()
        if self.watcher is not None:
            await self.watcher.close()
        if self.jwks is not None:
            await self.jwks.close()
        if self.audit is not None:
            await self.audit.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.session is not None:
            await self.session.close()
        if self.store is not None:
            await self.store.close()
        self.geo.close()

    # --- the public request path ----------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        exchange = Exchange(request_id=request_id_for(request.headers.get("X-Request-Id")),
                            started=time.perf_counter())
        bind_request(exchange.request_id, request.method, request.path)
        self.metrics.in_flight.inc()
        try:
            response = await self._admit_counting_refusals(request, exchange)
        except GatewayError as err:
            exchange.code = err.code
            response = self._error(err, exchange)
            exchange.status = response.status  # what the caller got (block_style may change it)
        except (asyncio.CancelledError, ConnectionResetError):
            # The caller went away mid-request; the decision still gets its audit record.
            exchange.status = CLIENT_CLOSED
            self._finish(exchange)
            raise
        finally:
            self.metrics.in_flight.dec()
        self._finish(exchange)
        return response

    async def _admit_counting_refusals(self, request: BaseRequest, exchange: Exchange) -> web.StreamResponse:
        try:
            return await self._admit_and_forward(request, exchange)
        except GatewayError as err:
            if err.status not in _BLOCKED_STATUSES:
                raise
            raise await self._limit_blocked(err, exchange) from err.__cause__

    async def _limit_blocked(self, err: GatewayError, exchange: Exchange) -> GatewayError:
        """Refusals count too (tier ``blocked_per_minute``): past it a caller gets 429, so refusing is not free
        for the caller. With no verified caller (401), its client address is the key, under the tier a
        credential without one gets (``auth.default_tier``)."""
        limiter = self.limiter
        if limiter is None:
            return err
        identity = exchange.identity
        if identity is not None:
            key, tier = f"s:{identity.subject}", identity.tier
        else:
            key, tier = f"ip:{exchange.ip}", self.settings.auth.default_tier
        rate = await limiter.check_blocked(key, tier)
        if rate.allowed:
            return err
        name = f"{tier}-refused"
        return GatewayError(429, "rate_limited",
                            f"Too many refused requests ({rate.limit} per minute); retry after "
                            f"{rate.retry_after_s} s.", headers=tuple(rate.headers(name)))

    def _error(self, err: GatewayError, exchange: Exchange) -> web.Response:
        assert self.watcher is not None
        reason = err.code
        if err.code == "country_denied" and self.settings.policy.block_style == "openai":
            err = GatewayError(403, "unsupported_country_region_territory",
                               "Country, region, or territory not supported",
                               headers=err.headers, error_type="request_forbidden")
        headers = err.headers
        if err.status == 451 and self.settings.policy.blocked_by_url:
            headers = (*headers, ("Link", f'<{self.settings.policy.blocked_by_url}>; rel="blocked-by"'))
        if exchange.rate is not None and err.status != 429:
            headers = (*headers, *exchange.rate.headers(exchange.identity.tier if exchange.identity else ""))
        err.headers = headers
        response = error_response(err, request_id=exchange.request_id, policy_version=self.watcher.version,
                                  reason=reason)
        if err.status == 408:
            response.force_close()  # the rest of a body that came too slowly is not waited for
        return response

    async def _admit_and_forward(self, request: BaseRequest, exchange: Exchange) -> web.StreamResponse:
        watcher, limiter, forwarder = self.watcher, self.limiter, self.forwarder
        assert watcher is not None and limiter is not None and forwarder is not None
        # The request's one canonical view (request_model.py): read here, decided on, and sent as read.
        # Its address part first, so every audit record (401s and 503s too) names the client address.
        view = self.reader.begin(request)
        exchange.ip = view.client_ip
        snapshot = watcher.snapshot
        if snapshot is None or watcher.stale():
            raise GatewayError(503, "policy_stale",
                               "The gateway cannot confirm its export-control policy; no request is "
                               "admitted until it can.")
        try:
            identity = self.authenticator.authenticate(request.headers.get("Authorization"),
                                                       snapshot.api_keys)
        except AuthError as exc:
            raise GatewayError(401, "unauthenticated", exc.message) from exc
        exchange.identity = identity
        ip = view.client_ip
        ip_country, ip_subdivision = self.geo.resolve(ip, snapshot.ip_ranges)
        exchange.ip_country = ip_subdivision or ip_country
        await self.reader.read(view, request, request_id=exchange.request_id,
                               identity_headers=identity_headers(identity.subject, identity.org, identity.tier),
                               upstream_auth=self.upstream_auth)
        method, path = view.method, view.target.partition("?")[0]
        if view.model is None:  # GET /v1/models/<name> is about model <name> (row 3a)
            view.model = path_model(method, path, self.rules)
        model = view.model
        exchange.model = model
        caller = identity.to_caller(ip, ip_country, ip_subdivision)
        decision = decide(snapshot, caller, model, self.clock(), self.rules, method=method, path=path)
        exchange.decision = decision
        if not decision.allowed:
            raise GatewayError(decision.status, decision.code, decision.message)
        budget = limiter.budget()  # one wait on Redis for the check and the charge together
        rate = await limiter.check(identity.subject, model, identity.tier, budget=budget)
        exchange.rate = rate
        rate_headers = rate.headers(identity.tier)
        if not rate.allowed:
            raise GatewayError(429, rate.code, _rate_message(rate, model), headers=tuple(rate_headers))

        async def charge(tokens: int) -> None:
            await limiter.charge(identity.subject, model, identity.tier, tokens, budget=budget)

        if lists_models(method, path, self.rules):  # whatever model a body names: the list is cut down
            now, rules = self.clock(), self.rules
            assert view.headers is not None
            return await forward_model_list(
                forwarder, view.target, headers=view.headers, request_id=exchange.request_id,
                extra_response_headers=rate_headers, outcome=exchange.outcome,
                allowed=lambda name: decide(snapshot, caller, name, now, rules).allowed)
        tiers = self.settings.tiers
        needs_usage = tiers[identity.tier].tokens_per_minute is not None
        return await forwarder.forward(request, view, request_id=exchange.request_id,
                                       extra_response_headers=rate_headers,
                                       on_usage=charge if needs_usage else None, outcome=exchange.outcome)

    def _finish(self, exchange: Exchange) -> None:
        duration = time.perf_counter() - exchange.started
        outcome = exchange.outcome
        if exchange.status == 0:
            exchange.status = outcome.upstream_status or 502
        upstream_answered = outcome.upstream_status != 0
        if outcome.error_kind is not None:
            self.metrics.upstream_errors.labels(outcome.error_kind).inc()
        decision = "allow" if exchange.code == "" and upstream_answered else decision_label(exchange.status)
        snapshot = self.watcher.snapshot if self.watcher else None
        identity = exchange.identity
        tier = identity.tier if identity else ""
        self.metrics.request_done(decision=decision, code=exchange.code,
                                  model=self.metrics.model_label(exchange.model, snapshot), tier=tier,
                                  duration_s=duration, upstream_s=outcome.upstream_seconds)
        log_access(status=exchange.status, decision=decision, code=exchange.code, duration_s=duration,
                   subject=identity.subject if identity else None)
        if self.audit is not None:
            self.audit.record(self._audit_record(exchange, decision, duration))

    def _audit_record(self, exchange: Exchange, decision: str, duration: float) -> dict[str, Any]:
        """One decision's audit record; no field holds more than 256 characters of anything a caller sent."""
        identity = exchange.identity
        screening = exchange.decision.screening if exchange.decision is not None else None
        record: dict[str, Any] = {
            "time": _rfc3339(self.clock()),
            "request_id": exchange.request_id,
            "subject": _bounded(identity.subject) if identity else None,
            "org": _bounded(identity.org) if identity else None,
            "tier": _bounded(identity.tier) if identity else None,
            "claimed_country": _bounded(identity.country) if identity else None,
            "client_ip": exchange.ip or None,
            "ip_country": exchange.ip_country,
            "model": _bounded(exchange.model),
            "decision": decision,
            "code": exchange.code,
            "policy_version": self.policy_version(),
            "status": exchange.status,
            "upstream_status": exchange.outcome.upstream_status or None,
            "duration_ms": round(duration * 1000, 3),
        }
        if screening:
            record["screening"] = {name: _bounded(value) if isinstance(value, str) else value
                                   for name, value in screening.items()}
        return record


_BLOCKED_STATUSES = frozenset({401, 403, 451})
AUDIT_FIELD_CHARS = 256


def _bounded(value: str | None) -> str | None:
    """At most :data:`AUDIT_FIELD_CHARS` characters: a caller's long name must not grow every record."""
    return value[:AUDIT_FIELD_CHARS] if value is not None and len(value) > AUDIT_FIELD_CHARS else value


def _rate_message(rate: RateResult, model: str | None) -> str:
    target = f"model '{clip(model)}'" if model else "this gateway"
    if rate.code == "token_rate_limited":
        return (f"Token budget for {target} is spent ({rate.token_limit} tokens per minute); "
                f"retry after {rate.retry_after_s} s.")
    return (f"Rate limit for {target} reached ({rate.limit} requests per minute); "
            f"retry after {rate.retry_after_s} s.")


_second_cache: list[Any] = [-1, ""]


def _rfc3339(epoch: float) -> str:
    """UTC RFC 3339 with milliseconds; the formatted second is reused (one audit record per request)."""
    second = int(epoch)
    if second != _second_cache[0]:
        _second_cache[0], _second_cache[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_cache[1]}.{int((epoch - second) * 1000):03d}Z"


# --- applications ---------------------------------------------------------------------------

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def create_public_server(gateway: Gateway) -> JsonErrorServer:
    """The public listener: one handler for every path, no router; nothing admin lives here.

    aiohttp's keep-alive timer also runs from a connection's start and while a
    request's head is incomplete, so it cuts slow header senders after
    ``header_read_timeout_s`` (aiohttp has no header read timeout of its own).
    """
    limits = gateway.settings.limits

    def rejected(status: int, code: str) -> None:
        gateway.metrics.request_done(decision=decision_label(status), code=code, model="", tier="",
                                     duration_s=0.0, upstream_s=0.0)

    return JsonErrorServer(gateway.handle, policy_version=gateway.policy_version,
                           on_rejected=rejected, handler_cancellation=True,
                           keepalive_timeout=limits.header_read_timeout_s, access_log=None,
                           # Request bodies are decoded by the gateway itself (request_model.py), bounded,
                           # once, and sent upstream decoded: never by the server underneath it.
                           auto_decompress=False,
                           max_field_size=limits.max_header_bytes, max_line_size=limits.max_header_bytes)


def create_admin_app(gateway: Gateway) -> web.Application:
    """The admin listener: health, readiness, metrics, and the operator API."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[GATEWAY_KEY] = gateway

    async def healthz(_request: BaseRequest) -> web.Response:
        return json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(_request: BaseRequest) -> web.Response:
        watcher = gateway.watcher
        ready = watcher is not None and not watcher.stale()
        body = {"ready": ready, "policy_version": gateway.policy_version(),
                "policy_age_s": round(watcher.age_s(), 3) if watcher and watcher.confirmed_at else None,
                "last_reload_ms": round(watcher.last_reload_s * 1000, 1) if watcher else None}
        return json_response(body, status=200 if ready else 503)

    async def metrics(_request: BaseRequest) -> web.Response:
        body, content_type = gateway.metrics.render(gateway.watcher)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    register_admin_routes(app, admin_context(gateway))
    return app


def admin_context(gateway: Gateway) -> AdminContext:
    """The components the operator API uses, from a started runtime."""
    if gateway.store is None or gateway.watcher is None:
        raise RuntimeError("the admin API is built from a started gateway (start() first)")
    s = gateway.settings
    return AdminContext(store=gateway.store, policy=gateway.watcher, geo=gateway.geo, clock=gateway.clock,
                        rules=gateway.rules, tiers=tuple(s.tiers), screening=s.screening, admin=s.admin,
                        environ=gateway.environ)
