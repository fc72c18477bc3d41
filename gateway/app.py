"""Wiring: the runtime's clients and their lifecycle, the public request path, both listeners.

The public path runs, in order: request id -> policy freshness (row 10) ->
identity (row 1) -> client IP and countries -> body and model -> decision (rows
2-8) -> rate limit (row 9) -> streaming proxy -> metrics and audit.
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
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest

from .admin import register_admin_routes
from .audit import AuditLog
from .errors import GatewayError, bad_request, decision_label, error_response, json_response
from .geo import GeoResolver
from .identity import Authenticator, AuthError, Identity
from .jwks import JwksFetcher, KeyRing
from .listener import JsonErrorServer
from .logs import bind_request, log_access, request_id_for
from .metrics import Metrics
from .network import TrustedProxies, client_ip
from .policy import Decision, Rules, decide
from .proxy import SKIP_AUTO_HEADERS, Forwarder, ProxyOutcome, Router, origin_form, upstream_request_headers
from .ratelimit import RateLimiter, RateResult
from .redis_wire import RespConnection
from .settings import Settings, read_secret
from .store import Store
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


class ModelExtractor:
    """The model a request names: JSON body ``model``, a form field ``model``, or ``policy.model_path_pattern``'s group.

    The model decided on must be the model the upstream serves, however the upstream parses the request.
    So an input that parsers could read in more than one way is refused (400), never guessed:

    * the request-target must be origin-form (absolute-form is reduced to its path and query);
    * with a path pattern, a path that a normalising server (percent-decoding, dot segments, ``//``,
      ``;params``, ``\\``, NUL, letter case, a trailing slash) could route to a model must already be in
      canonical form (none of those, nothing percent-encoded), or it is refused; a canonical path is
      matched exactly as written;
    * a path model and a body model that differ are refused;
    * JSON bodies: a duplicate ``model`` key (however escaped), a non-string or empty model, a byte order
      mark or UTF-16/32 text (which lenient parsers accept and strict ones do not) are refused; a
      ``model`` inside a nested object names no model;
    * ``multipart/form-data`` and ``application/x-www-form-urlencoded`` bodies name their model in a
      ``model`` field (OpenAI's audio and image endpoints do); a repeated or ambiguous one is refused.
    """

    def __init__(self, pattern: str | None) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        # What a lenient upstream might route on is matched without regard to letter case.
        self.loose_pattern = re.compile(pattern, re.IGNORECASE) if pattern else None

    def extract(self, request: BaseRequest, body: bytes) -> str | None:
        target = origin_form(request.raw_path)
        path_model = self.model_from_path(target.split("?", 1)[0]) if self.pattern is not None else None
        body_model = self.model_from_body(body, request.headers.getall("Content-Type", ())) if body else None
        if path_model is not None and body_model is not None and path_model != body_model:
            raise bad_request(f"The request path names model '{path_model}' and its body names "
                              f"'{body_model}'.")
        return path_model if path_model is not None else body_model

    # --- the path ---------------------------------------------------------------------------------

    def model_from_path(self, path: str) -> str | None:
        """``path`` is the raw (percent-encoded) path of an origin-form target, without the query."""
        assert self.pattern is not None and self.loose_pattern is not None
        if self._canonical(path):
            match = self.pattern.search(path)
            if match and match.group("model"):
                return match.group("model")
        for candidate in self._loosened(path):
            loose = self.loose_pattern.search(candidate)
            if loose and loose.group("model"):
                raise bad_request("The request path could name a model in more than one way (encoded characters, "
                                  "dot segments, empty segments, ';' parameters, backslashes, letter case or a "
                                  "trailing slash); send the canonical path.")
        return None

    @staticmethod
    def _canonical(path: str) -> bool:
        """True when no server reads ``path`` other than as written: nothing percent-encoded (a server may
        decode it or not), no ``//``, dot segments, ``;`` parameters or ``\\``."""
        if "%" in path or "//" in path or ";" in path or "\\" in path:
            return False
        return not any(segment in (".", "..") for segment in path.split("/"))

    def _loosened(self, path: str) -> list[str]:
        """``path`` as lenient servers might read it, decoded zero to three times: ``\\`` as ``/``, cut at
        NUL, empty and dot segments resolved, no trailing slash; ``;params`` dropped before the dot
        segments are resolved (``/a;x/..`` -> ``/``) and, as other servers do, after (``/a/;x/..`` -> ``/a``)."""
        readings: list[str] = []
        text = path
        for _ in range(4):
            cut = text.split("\x00", 1)[0].replace("\\", "/").split("/")
            readings.append(self._resolved([segment.split(";", 1)[0] for segment in cut]))
            if ";" in text:
                readings.append(self._resolved(cut, strip_params=True))
            decoded = unquote(text, errors="replace")
            if decoded == text:
                break
            text = decoded
        return readings

    @staticmethod
    def _resolved(segments: list[str], *, strip_params: bool = False) -> str:
        kept: list[str] = []
        for segment in segments:
            if segment in ("", "."):
                continue
            if segment == "..":
                if kept:
                    kept.pop()
                continue
            kept.append(segment)
        if strip_params:
            kept = [part for part in (segment.split(";", 1)[0] for segment in kept) if part]
        return "/" + "/".join(kept)

    # --- the body ---------------------------------------------------------------------------------

    def model_from_body(self, body: bytes, content_types: list[str]) -> str | None:
        if len(content_types) > 1:
            raise bad_request("The request has more than one Content-Type header.")
        content_type = content_types[0] if content_types else ""
        lowered = content_type.lower()
        if "multipart/" not in lowered and "urlencoded" not in lowered:
            return self._json_model(body)  # the common case, without parsing the media type
        media, params = self._media_type(content_type)  # the boundary is case-sensitive
        if media == "multipart/form-data":
            return self._multipart_model(body, params.get("boundary"))
        if media == "application/x-www-form-urlencoded":
            return self._form_model(body)
        return self._json_model(body)

    @staticmethod
    def _media_type(value: str) -> tuple[str, dict[str, str]]:
        from email.message import Message

        if not value:
            return "", {}
        message = Message()
        message["Content-Type"] = value
        params = {str(k).lower(): str(v) for k, v in message.get_params(failobj=[])[1:]}
        return message.get_content_type().lower(), params

    def _json_model(self, body: bytes) -> str | None:
        if body.lstrip()[:1] != b"{":
            self._refuse_disguised_json(body)
            return None
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request("The request body is not valid JSON.") from exc
        if not isinstance(document, dict) or "model" not in document:
            return None
        model = document["model"]
        if not isinstance(model, str) or not model:
            raise bad_request("The request's 'model' must be a non-empty string.")
        # A key may be spelled with escapes ("mod\\u0065l"); only then, or with several "model" strings,
        # can the body name the key twice. Parsers disagree on which one wins: refuse.
        if (body.count(b'"model"') > 1 or b"\\u" in body) and self._top_level_model_count(body) > 1:
            raise bad_request("The request names 'model' more than once.")
        return model

    @staticmethod
    def _top_level_model_count(body: bytes) -> int:
        import json

        counts: list[int] = []

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            counts.append(sum(1 for key, _ in pairs if key == "model"))
            return dict(pairs)

        try:
            json.loads(body, object_pairs_hook=hook)
        except (ValueError, RecursionError) as exc:  # orjson read it; a stricter look did not
            raise bad_request("The request body is not valid JSON.") from exc
        return counts[-1] if counts else 0  # the outermost object is finished last

    @staticmethod
    def _refuse_disguised_json(body: bytes) -> None:
        """A byte order mark or UTF-16/32 text: strict parsers see no JSON, lenient ones (Python's
        ``json.loads`` on bytes) read an object and its model. JSON must be UTF-8 without a BOM (RFC 8259)."""
        if not (body[:3] == b"\xef\xbb\xbf" or body[:2] in (b"\xfe\xff", b"\xff\xfe") or b"\x00" in body[:4]):
            return
        import json

        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return  # not JSON in any encoding: binary content
        if isinstance(document, (dict, list)):
            raise bad_request("A JSON request body must be UTF-8 without a byte order mark.")

    @staticmethod
    def _form_model(body: bytes) -> str | None:
        from urllib.parse import parse_qsl

        def values(text: str) -> list[str]:
            return [v for k, v in parse_qsl(text, keep_blank_values=True, errors="strict") if k == "model"]

        try:
            text = body.decode("ascii")
            found = values(text)
            # Servers split pairs on "&", and some on ";" too: both readings must agree.
            if found != values(text.replace(";", "&")):
                raise bad_request("The form's 'model' field reads differently when ';' separates fields.")
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad_request("The form body is not ASCII URL-encoded UTF-8 text.") from exc
        if len(found) > 1:
            raise bad_request("The request names 'model' more than once.")
        if found == [""]:
            raise bad_request("The request's 'model' must be a non-empty string.")
        return found[0] if found else None

    _NAME_PARAM = re.compile(r"(?i)(?:^|;)\s*name\*?\s*=")

    @classmethod
    def _multipart_model(cls, body: bytes, boundary: str | None) -> str | None:
        from email.message import Message

        if not boundary or len(boundary) > 70 or not boundary.isascii():
            raise bad_request("A multipart body needs a boundary of at most 70 ASCII characters.")
        parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
        if len(parts) < 2 or not parts[-1].startswith(b"--"):
            raise bad_request("The multipart body is not complete.")
        found: list[bytes] = []
        for part in parts[1:-1]:
            padding, newline, rest = part.partition(b"\r\n")
            if not newline or padding.strip(b" \t"):
                raise bad_request("The multipart body is malformed.")
            if rest.startswith(b"\r\n"):
                head, content = b"", rest[2:]
            else:
                head, separator, content = rest.partition(b"\r\n\r\n")
                if not separator:
                    raise bad_request("The multipart body is malformed.")
            fields = [line.partition(b":") for line in head.split(b"\r\n") if line]
            dispositions = [v.decode("latin-1") for k, _, v in fields if k.strip().lower() == b"content-disposition"]
            encodings = [v.strip().lower() for k, _, v in fields if k.strip().lower() == b"content-transfer-encoding"]
            if len(dispositions) != 1:
                raise bad_request("Each multipart part needs exactly one Content-Disposition.")
            disposition = dispositions[0]
            if len(cls._NAME_PARAM.findall(disposition)) > 1:
                raise bad_request("A multipart part names itself more than once.")
            message = Message()
            message["Content-Disposition"] = disposition
            name = message.get_param("name", header="content-disposition")
            if isinstance(name, tuple):  # the RFC 2231 form (name*=): never matched, refused if it is "model"
                name = str(name[2]) + "*"
            if not isinstance(name, str) or name.rstrip("*").casefold() != "model":
                continue
            if (name != "model" or "filename" in disposition.lower()
                    or any(e not in (b"7bit", b"8bit", b"binary") for e in encodings)):
                raise bad_request("The multipart 'model' field is a file, transfer-encoded, or not named exactly "
                                  "'model'.")
            found.append(content)
        if not found:
            return None
        if len(found) > 1:
            raise bad_request("The request names 'model' more than once.")
        try:
            model = found[0].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request("The multipart 'model' field is not UTF-8.") from exc
        if not model:
            raise bad_request("The request's 'model' must be a non-empty string.")
        return model


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
        self.models = ModelExtractor(settings.policy.model_path_pattern)
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
                                    tls=s.redis.tls_options(), policy_timeout_s=s.redis.policy_timeout_s)
        self.store.on_error = self.metrics.redis_error
        if self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            tls = s.redis.ssl_context() if self.redis_url.startswith("rediss://") else None
            self.store.use_wire(RespConnection(self.redis_url, deadline_s=s.redis.timeout_s, password=password,
                                               ssl_context=tls))
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
            response = await self._admit_and_forward(request, exchange)
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
        return error_response(err, request_id=exchange.request_id, policy_version=self.watcher.version,
                              reason=reason)

    async def _admit_and_forward(self, request: BaseRequest, exchange: Exchange) -> web.StreamResponse:
        watcher, limiter, forwarder = self.watcher, self.limiter, self.forwarder
        assert watcher is not None and limiter is not None and forwarder is not None
        # Resolved first, so every audit record (401s and 503s too) names the client address.
        exchange.ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", ()), self.trusted)
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
        ip = exchange.ip
        ip_country, ip_subdivision = self.geo.resolve(ip, snapshot.ip_ranges)
        exchange.ip, exchange.ip_country = ip, ip_subdivision or ip_country
        body = await self._read_body(request)
        model = self.models.extract(request, body)
        exchange.model = model
        caller = identity.to_caller(ip, ip_country, ip_subdivision)
        decision = decide(snapshot, caller, model, self.clock(), self.rules)
        exchange.decision = decision
        if not decision.allowed:
            raise GatewayError(decision.status, decision.code, decision.message)
        budget = limiter.budget()  # one wait on Redis for the check and the charge together
        rate = await limiter.check(identity.subject, model, identity.tier, budget=budget)
        exchange.rate = rate
        rate_headers = rate.headers(identity.tier)
        if not rate.allowed:
            raise GatewayError(429, rate.code, _rate_message(rate, model), headers=tuple(rate_headers))
        headers = upstream_request_headers(
            request.headers, forwarded_for=self._forwarded_for(request),
            proto=request.scheme, request_id=exchange.request_id,
            identity_headers=identity_headers(identity.subject, identity.org, identity.tier),
            upstream_auth=self.upstream_auth)

        async def charge(tokens: int) -> None:
            await limiter.charge(identity.subject, model, identity.tier, tokens, budget=budget)

        tiers = self.settings.tiers
        needs_usage = tiers[identity.tier].tokens_per_minute is not None
        return await forwarder.forward(request, body=body, model=model, headers=headers,
                                       request_id=exchange.request_id, extra_response_headers=rate_headers,
                                       on_usage=charge if needs_usage else None, outcome=exchange.outcome)

    def _forwarded_for(self, request: BaseRequest) -> str:
        raw_peer = request.remote or ""
        # The peer as the decision saw it (IPv4-mapped IPv6 as IPv4), so the upstream learns the same address.
        address, trusted = self.trusted.classify_peer(raw_peer) if raw_peer else (None, False)
        peer = address or raw_peer
        if trusted:
            chain = ", ".join(v.strip() for v in request.headers.getall("X-Forwarded-For", ()) if v.strip())
            return f"{chain}, {peer}" if chain else peer
        return peer

    async def _read_body(self, request: BaseRequest) -> bytes:
        limit = self.settings.limits.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise GatewayError(413, "request_too_large",
                               f"The request body exceeds the limit of {limit} bytes.")
        if not request.body_exists:
            return b""
        content = request.content
        if content.is_eof() and content.exception() is None:
            # The whole body came with the head (the common small request): no waiting, no timer.
            body = content.read_nowait()
            if len(body) > limit:
                raise GatewayError(413, "request_too_large",
                                   f"The request body exceeds the limit of {limit} bytes.")
            return body
        chunks: list[bytes] = []
        size = 0
        timeout = self.settings.limits.header_read_timeout_s
        try:
            while True:
                async with asyncio.timeout(timeout):
                    chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise GatewayError(413, "request_too_large",
                                       f"The request body exceeds the limit of {limit} bytes.")
                chunks.append(chunk)
        except TimeoutError as exc:
            raise bad_request("The request body arrived too slowly.") from exc
        except aiohttp.web.HTTPException:
            raise
        except (aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError, web.RequestPayloadError,
                ValueError) as exc:
            # Bad chunking or a body cut short: the parser's errors arrive here, on the body stream.
            raise bad_request("The request body is malformed.") from exc
        return b"".join(chunks)

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
        identity = exchange.identity
        screening = exchange.decision.screening if exchange.decision is not None else None
        record: dict[str, Any] = {
            "time": _rfc3339(self.clock()),
            "request_id": exchange.request_id,
            "subject": identity.subject if identity else None,
            "org": identity.org if identity else None,
            "tier": identity.tier if identity else None,
            "claimed_country": identity.country if identity else None,
            "client_ip": exchange.ip or None,
            "ip_country": exchange.ip_country,
            "model": exchange.model,
            "decision": decision,
            "code": exchange.code,
            "policy_version": self.policy_version(),
            "status": exchange.status,
            "upstream_status": exchange.outcome.upstream_status or None,
            "duration_ms": round(duration * 1000, 3),
        }
        if screening:
            record["screening"] = screening
        return record


def _rate_message(rate: RateResult, model: str | None) -> str:
    target = f"model '{model}'" if model else "this gateway"
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
    register_admin_routes(app, gateway)
    return app
