"""The runtime of one gateway process: its components, built by :func:`create_runtime` and closed with it.

Every component is built in an :class:`contextlib.AsyncExitStack`, so each one that has started is
closed, in reverse order, however the start or the process ends (the HTTP client session and the
store included). A :class:`Runtime` exists only started: none of its components is Optional (but
``jwks``, which only a configured ``auth.jwks_url`` has).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from .admission import Admission
from .audit import AuditLog
from .geo import GeoResolver
from .identity import Authenticator
from .inflight import InFlightRegistry
from .jwks import JwksFetcher, KeyRing
from .metrics import Metrics
from .network import TrustedProxies
from .policy.decide import Rules
from .proxy import Forwarder, Router
from .ratelimit import RateLimiter
from .request_model import RequestReader
from .settings import Settings, read_secret
from .storage.store import Store
from .upstream_client import UpstreamPool
from .watcher import PolicyWatcher


@dataclass(frozen=True, slots=True)
class Runtime:
    """One process's started components: clients, policy watcher, limiter, admission, observability."""

    settings: Settings
    clock: Callable[[], float]
    monotonic: Callable[[], float]
    environ: Mapping[str, str]
    rules: Rules
    reader: RequestReader
    metrics: Metrics
    authenticator: Authenticator
    geo: GeoResolver
    upstream_auth: str | None  # the Authorization header the upstream gets, when it wants one
    store: Store
    session: aiohttp.ClientSession
    forwarder: Forwarder
    limiter: RateLimiter
    jwks: JwksFetcher | None  # only with auth.jwks_url
    watcher: PolicyWatcher
    audit: AuditLog
    admission: Admission
    inflight: InFlightRegistry  # requests being forwarded, decided again on each new policy version

    def policy_version(self) -> int:
        """The policy version this process enforces; 0 before it has loaded a policy."""
        return self.watcher.version


def open_store(settings: Settings, redis_url: str, environ: Mapping[str, str]) -> Store:
    """The store a gateway process uses (the lean wire for its scripts)."""
    s = settings.redis
    return Store.from_url(
        redis_url,
        timeout_s=s.timeout_s,
        password=read_secret(s.password_env, environ),
        tls=s.tls_options(),
        policy_timeout_s=s.policy_timeout_s,
        lean_wire=True,
        ssl_context=s.ssl_context,
        audit_shards=settings.audit.shards,
    )


@contextlib.asynccontextmanager
async def create_runtime(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    store: Store | None = None,
    redis_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Runtime]:
    """Build and start the runtime; closed when the ``async with`` ends.

    ``store`` is used as given (and left open: its owner closes it); else one is opened on ``redis_url``
    (default ``redis.url``) and closed with the runtime.
    """
    env = os.environ if environ is None else environ
    s = settings
    async with contextlib.AsyncExitStack() as stack:
        metrics = Metrics(s)
        keyring = KeyRing.from_settings(s.auth, env)
        geo = GeoResolver(s.network.geoip_db)
        stack.callback(geo.close)
        if store is None:
            url = redis_url if redis_url is not None else s.redis.url
            if url is None:
                raise ValueError("create_runtime needs a store, a redis_url or redis.url")
            store = open_store(s, url, env)
            stack.push_async_callback(store.close)
        else:
            store.audit_shards = s.audit.shards  # a store given as it is: this config's audit shards
        store.on_error = metrics.redis_error
        # aiohttp's client for the gateway's own calls (the JWKS); the model servers get the pool.
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        stack.push_async_callback(session.close)
        pool = UpstreamPool(
            limit=s.upstream.max_connections,
            connect_timeout_s=s.upstream.connect_timeout_s,
            read_timeout_s=s.upstream.read_timeout_s,
        )
        stack.push_async_callback(pool.close)
        forwarder = Forwarder(pool, Router(s.upstream.url, s.upstream.routes), clock=time.perf_counter)
        limiter = RateLimiter(
            store,
            s.tiers,
            on_fallback=metrics.ratelimit_fallback,
            timeout_s=s.redis.timeout_s,
            lease_s=s.ratelimit.lease_ms / 1000,
            charge_flush_s=s.ratelimit.charge_flush_ms / 1000,
        )
        stack.push_async_callback(limiter.close)
        jwks: JwksFetcher | None = None
        if s.auth.jwks_url:
            jwks = JwksFetcher(
                s.auth.jwks_url, keyring, session, refresh_s=s.auth.jwks_refresh_s, cooldown_s=s.auth.jwks_cooldown_s
            )
            stack.push_async_callback(jwks.close)
            await jwks.start()
        authenticator = Authenticator(
            s.auth,
            s.tiers.keys(),
            keyring,
            clock=clock,
            on_unknown_kid=jwks.request_refresh if jwks is not None else None,
        )
        watcher = PolicyWatcher(store, s, clock=clock, monotonic=monotonic)
        watcher.on_change.append(metrics.policy_loaded)
        stack.push_async_callback(watcher.close)
        await watcher.start()
        stack.push_async_callback(metrics.close)
        metrics.start(watcher)
        audit = AuditLog(store, s.audit, metrics=metrics)
        stack.push_async_callback(audit.close)
        await audit.start()
        limits = s.limits
        reader = RequestReader(
            trusted=TrustedProxies(s.network.trusted_proxies),
            model_path_pattern=s.policy.model_path_pattern,
            max_body_bytes=limits.max_body_bytes,
            body_read_timeout_s=limits.body_read_timeout_s,
            body_gap_timeout_s=limits.header_read_timeout_s,
        )
        rules = Rules.from_settings(s)
        upstream_key = read_secret(s.upstream.api_key_env, env)
        admission = Admission(
            policy=watcher, authenticator=authenticator, geo=geo, rules=rules, clock=clock, limiter=limiter
        )
        inflight = InFlightRegistry(admission, clock=clock)
        watcher.on_change.append(inflight.policy_changed)
        yield Runtime(
            settings=s,
            clock=clock,
            monotonic=monotonic,
            environ=env,
            rules=rules,
            reader=reader,
            metrics=metrics,
            authenticator=authenticator,
            geo=geo,
            upstream_auth=f"Bearer {upstream_key}" if upstream_key else None,
            store=store,
            session=session,
            forwarder=forwarder,
            limiter=limiter,
            jwks=jwks,
            watcher=watcher,
            audit=audit,
            admission=admission,
            inflight=inflight,
        )
