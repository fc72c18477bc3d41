"""The public request path: every request on the public listener, admitted and proxied, then counted.

In order: request id -> method and client address -> policy freshness (row 10) -> identity (row 1) ->
countries -> the rest of the request's canonical view (decoded body, model, headers to forward;
request_model.py) -> decision (rows 2-8) -> rate limit (row 9) -> streaming proxy of that same view ->
metrics and audit. The admission steps are admission.py's; errors become responses in errors.py.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .admission import rate_refused
from .errors import GatewayError, Presentation, decision_label
from .identity import Identity
from .inflight import InFlight
from .logs import bind_request, log_access, request_id_for
from .model_list import forward_model_list, lists_models
from .policy.decide import differs
from .policy.model import Caller, Decision, Snapshot
from .proxy import ProxyOutcome
from .ratelimit import RateResult
from .runtime import Runtime

CLIENT_CLOSED = 499  # as nginx logs it: the caller closed the connection before the answer was complete
_UNSAFE_HEADER_CHARS = re.compile(r"[^\x20-\x24\x26-\x7e]+")  # all but printable ASCII, and "%" itself


@functools.lru_cache(maxsize=4096)
def identity_headers(subject: str, org: str | None, tier: str) -> tuple[tuple[str, str], ...]:
    """The ``X-Gateway-*`` headers for one caller (a hot caller's are encoded once)."""
    return (
        ("X-Gateway-Subject", header_safe(subject)),
        ("X-Gateway-Org", header_safe(org)),
        ("X-Gateway-Tier", header_safe(tier)),
    )


def header_safe(value: str | None) -> str:
    """Claims become upstream header values: printable ASCII only, and reversibly so.

    Everything else (controls, non-ASCII) and ``%`` itself become the percent-encoded UTF-8 bytes,
    as do spaces at either end (parsers strip them), so the upstream can decode a value exactly and
    two different claims never arrive as the same header value.
    """
    if not value:
        return ""
    encoded = _UNSAFE_HEADER_CHARS.sub(
        lambda m: "".join(f"%{byte:02X}" for byte in m.group().encode("utf-8", "surrogatepass")), value
    )
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
    shadow: Decision | None = None  # the decision under the shadow policy, when it differs
    status: int = 0
    code: str = ""
    outcome: ProxyOutcome = field(default_factory=ProxyOutcome)
    rate: RateResult | None = None
    via: str | None = None  # "authz": decided for a data plane that proxies by itself (authz.py)


class PublicPath:
    """The public listener's one handler, over a started :class:`Runtime` (its parts resolved once)."""

    def __init__(self, runtime: Runtime) -> None:
        s = runtime.settings
        self.settings = s
        self.clock = runtime.clock
        self.rules = runtime.rules
        self.reader = runtime.reader
        self.metrics = runtime.metrics
        self.admission = runtime.admission
        self.watcher = runtime.watcher
        self.limiter = runtime.limiter
        self.forwarder = runtime.forwarder
        self.audit = runtime.audit
        self.inflight = runtime.inflight
        self.upstream_auth = runtime.upstream_auth
        self.policy_version = runtime.policy_version
        self.presentation = Presentation(block_style=s.policy.block_style, blocked_by_url=s.policy.blocked_by_url)
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the public request path ----------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        exchange = Exchange(request_id=request_id_for(request.headers.get("X-Request-Id")), started=time.perf_counter())
        bind_request(exchange.request_id, request.method, request.path)
        self.metrics.request_started()
        try:
            try:
                response = await self._admit_and_forward(request, exchange)
            except GatewayError as err:
                if err.status not in _BLOCKED_STATUSES:
                    raise
                # Refusals count too (one await level less than a method of its own: every resumption
                # of the request's task passes through each level).
                raise await self._limit_blocked(err, exchange) from err.__cause__
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
            self.metrics.request_ended()
        self._finish(exchange)
        return response

    async def _limit_blocked(self, err: GatewayError, exchange: Exchange) -> GatewayError:
        """Refusals count too (tier ``blocked_per_minute``): past it a caller gets 429, so refusing is not free
        for the caller. With no verified caller (401), its client address is the key, under the tier a
        credential without one gets (``auth.default_tier``)."""
        limiter = self.limiter
        identity = exchange.identity
        if identity is not None:
            key, tier = f"s:{identity.subject}", identity.tier
        else:
            key, tier = f"ip:{exchange.ip}", self.settings.auth.default_tier
        rate = await limiter.check_blocked(key, tier)
        if rate.allowed:
            return err
        name = f"{tier}-refused"
        return GatewayError(
            429,
            "rate_limited",
            f"Too many refused requests ({rate.limit} per minute); retry after {rate.retry_after_s} s.",
            headers=tuple(rate.headers(name)),
        )

    def _error(self, err: GatewayError, exchange: Exchange) -> web.Response:
        rate = exchange.rate
        rate_headers = None
        if rate is not None and err.status != 429:  # a 429 carries the headers of the limit it is over
            rate_headers = rate.headers(exchange.identity.tier if exchange.identity else "")
        return self.presentation.response(
            err, request_id=exchange.request_id, policy_version=self.watcher.version, rate_headers=rate_headers
        )

    async def _admit_and_forward(self, request: BaseRequest, exchange: Exchange) -> web.StreamResponse:
        admission, limiter, forwarder = self.admission, self.limiter, self.forwarder
        # The request's one canonical view (request_model.py): read here, decided on, and sent as read.
        # Its address part first, so every audit record (401s and 503s too) names the client address.
        view = self.reader.begin(request)
        exchange.ip = view.client_ip
        snapshot = admission.enforced()
        identity = admission.identify(request.headers.get("Authorization"), snapshot)
        exchange.identity = identity
        caller = admission.caller(identity, view.client_ip, snapshot)
        exchange.ip_country = caller.ip_subdivision or caller.ip_country
        await self.reader.read(
            view,
            request,
            request_id=exchange.request_id,
            identity_headers=identity_headers(identity.subject, identity.org, identity.tier),
            upstream_auth=self.upstream_auth,
        )
        method, path = view.method, view.target.partition("?")[0]
        if view.model is None:  # GET /v1/models/<name> is about model <name> (row 3a)
            view.model = admission.model(None, method, path)
        model = view.model
        exchange.model = model
        decision = admission.decide(snapshot, caller, model, method=method, path=path)
        exchange.decision = decision
        if snapshot.shadow is not None:  # shadow entries held: decide alongside, never enforced
            self._decide_shadow(snapshot, exchange, caller, model, method, path)
        if not decision.allowed:
            raise GatewayError(decision.status, decision.code, decision.message)
        budget = limiter.budget()  # one wait on Redis for the check and the charge together
        rate = await admission.rate(identity, model, budget)
        exchange.rate = rate
        rate_headers = rate.headers(identity.tier)
        if not rate.allowed:
            raise rate_refused(rate, model, tuple(rate_headers))

        if lists_models(method, path, self.rules):  # whatever model a body names: the list is cut down
            assert view.headers is not None
            now = self.clock()
            return await forward_model_list(
                forwarder,
                view.target,
                headers=view.headers,
                request_id=exchange.request_id,
                extra_response_headers=rate_headers,
                outcome=exchange.outcome,
                allowed=lambda name: admission.decide(snapshot, caller, name, now=now).allowed,
            )
        charge = None
        if self.settings.tiers[identity.tier].tokens_per_minute is not None:
            # The limiter's charge itself, not a coroutine around it: one fewer when the usage arrives.
            charge = functools.partial(limiter.charge, identity.subject, model, identity.tier, budget=budget)
        # In flight until forwarded: a new policy version that refuses it ends it (inflight.py).
        loop = self._loop
        if loop is None:  # the runtime's loop, the one every request runs on
            loop = self._loop = asyncio.get_running_loop()
        live = InFlight(
            identity,
            request.headers.get("Authorization") if identity.key_id is not None else None,  # API keys: looked up again
            request.transport,
            view.client_ip,
            model,
            method,
            path,
            exchange.outcome,
            asyncio.current_task(loop),
        )
        inflight = self.inflight
        inflight.add(live)
        try:
            return await forwarder.forward(
                request,
                view,
                request_id=exchange.request_id,
                extra_response_headers=rate_headers,
                on_usage=charge,
                outcome=exchange.outcome,
            )
        finally:
            inflight.discard(live)

    def _decide_shadow(
        self, snapshot: Snapshot, exchange: Exchange, caller: Caller, model: str | None, method: str, path: str
    ) -> None:
        """Rows 2-8 under the shadow policy; a different outcome is kept for the audit record and counted."""
        shadow = snapshot.shadow
        assert shadow is not None and exchange.decision is not None and exchange.identity is not None
        admission = self.admission
        if shadow.ip_ranges is not snapshot.ip_ranges:  # shadow ip-ranges entries may place the caller elsewhere
            caller = admission.caller(exchange.identity, exchange.ip, shadow)
        decision = admission.decide(shadow, caller, model, method=method, path=path)
        if differs(exchange.decision, decision):
            exchange.shadow = decision
            self.metrics.shadow_decision(decision.code)

    def _finish(self, exchange: Exchange) -> None:
        duration = time.perf_counter() - exchange.started
        outcome = exchange.outcome
        if exchange.status == 0:
            exchange.status = outcome.upstream_status or 502
        upstream_answered = outcome.upstream_status != 0
        if outcome.error_kind is not None:
            self.metrics.upstream_errors.labels(outcome.error_kind).inc()
        if outcome.revoked is not None:
            # Ended by a new policy version: blocked with its code; the status is what the caller got.
            exchange.code = outcome.revoked.code
            if exchange.status == CLIENT_CLOSED and upstream_answered:
                exchange.status = outcome.upstream_status
            decision = "block"
            self.metrics.request_revoked(exchange.code)
        elif exchange.code == "" and (upstream_answered or exchange.via is not None):
            # A decision service's allow is complete without an upstream: the data plane proxies it.
            decision = "allow"
        else:
            decision = decision_label(exchange.status)
        snapshot = self.watcher.snapshot
        identity = exchange.identity
        tier = identity.tier if identity else ""
        screened = exchange.decision.screening if exchange.decision is not None else None
        if screened is not None and not screened.get("blocked"):
            self.metrics.screening_review.inc()
        self.metrics.request_done(
            decision=decision,
            code=exchange.code,
            model=self.metrics.model_label(exchange.model, snapshot),
            tier=tier,
            duration_s=duration,
            upstream_s=outcome.upstream_seconds,
        )
        log_access(
            status=exchange.status,
            decision=decision,
            code=exchange.code,
            duration_s=duration,
            subject=identity.subject if identity else None,
        )
        self.audit.record(self._audit_record(exchange, decision, duration, snapshot.version if snapshot else 0))

    def _audit_record(self, exchange: Exchange, decision: str, duration: float, version: int) -> dict[str, Any]:
        """One decision's audit record; no field holds more than 256 characters of anything a caller sent."""
        identity = exchange.identity
        if identity is not None:
            subject, org, org_name, tier, country = _identity_fields(identity)
        else:
            subject = org = org_name = tier = country = None
        model = exchange.model
        outcome = exchange.outcome
        record: dict[str, Any] = {
            "time": _rfc3339(self.clock()),
            "request_id": exchange.request_id,
            "subject": subject,
            "org": org,
            "org_name": org_name,
            "tier": tier,
            "claimed_country": country,
            "client_ip": exchange.ip or None,
            "ip_country": exchange.ip_country,
            "model": model if model is None or len(model) <= AUDIT_FIELD_CHARS else model[:AUDIT_FIELD_CHARS],
            "decision": decision,
            "code": exchange.code,
            "policy_version": version,
            "status": exchange.status,
            "upstream_status": outcome.upstream_status or None,
            "duration_ms": round(duration * 1000, 3),
        }
        if identity is not None and identity.key_id is not None:
            record["key_id"] = identity.key_id
        if outcome.revoked is not None:
            record["revoked"] = True
        decided = exchange.decision
        screening = None
        if decided is not None:
            if decided.licence is not None:
                record["licence"] = decided.licence
            screening = decided.screening
        shadow = exchange.shadow
        if shadow is not None:
            record["shadow"] = {"decision": "allow" if shadow.allowed else "block", "code": shadow.code}
        if exchange.via is not None:
            record["via"] = exchange.via
        if screening:
            record["screening"] = {
                name: _bounded(value) if isinstance(value, str) else value for name, value in screening.items()
            }
        return record


_BLOCKED_STATUSES = frozenset({401, 403, 451})
AUDIT_FIELD_CHARS = 256


def _bounded(value: str | None) -> str | None:
    """At most :data:`AUDIT_FIELD_CHARS` characters: a caller's long name must not grow every record."""
    return value[:AUDIT_FIELD_CHARS] if value is not None and len(value) > AUDIT_FIELD_CHARS else value


IdentityFields = tuple[str | None, str | None, str | None, str | None, str | None]
# id(identity) -> (identity, its bounded subject, org, org name, tier, claimed country). The
# authenticator hands out the same Identity for a cached token, so a busy caller's fields are bounded
# once, not on every record; holding the identity keeps its id from being reused while cached.
_identity_cache: dict[int, tuple[Identity, IdentityFields]] = {}
IDENTITY_CACHE_SIZE = 4096


def _identity_fields(identity: Identity) -> IdentityFields:
    cached = _identity_cache.get(id(identity))
    if cached is not None and cached[0] is identity:
        return cached[1]
    fields = (
        _bounded(identity.subject),
        _bounded(identity.org),
        _bounded(identity.org_name),
        _bounded(identity.tier),
        _bounded(identity.country),
    )
    if len(_identity_cache) >= IDENTITY_CACHE_SIZE:
        _identity_cache.clear()
    _identity_cache[id(identity)] = (identity, fields)
    return fields


_cached_second = -1  # the second the audit records' times are in, and its formatting
_cached_prefix = ""
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a record's time ends in one of these


def _rfc3339(epoch: float) -> str:
    """UTC RFC 3339 with milliseconds; the formatted second is reused (one audit record per request)."""
    global _cached_second, _cached_prefix
    second = int(epoch)
    if second != _cached_second:
        _cached_second, _cached_prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    ms = int((epoch - second) * 1000)
    if 0 <= ms < 1000:
        return _cached_prefix + _MILLIS[ms]
    return f"{_cached_prefix}.{ms:03d}Z"  # before 1970 (a test's clock): formatted as it always was
