"""The streaming forwarder: header hygiene both ways, chunk-by-chunk relay, usage capture.

Nothing here decides who may call; it sends a request's canonical view (see
request_model.py) that was already admitted, exactly as decided on, and reports
what happened (status, usage, errors) to its caller.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import itertools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import GatewayError, bad_request, error_body
from .upstream_client import (
    Body,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPayloadError,
    UpstreamPool,
    UpstreamResponse,
    origin,
)

if TYPE_CHECKING:
    from .policy.model import Decision
    from .request_model import CanonicalRequest

log = logging.getLogger("gateway.proxy")

# RFC 9110 §7.6.1 hop-by-hop fields plus the ones proxies traditionally drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Caller headers naming something the gateway sets or vouches for (docs/contract.md §4a): the upstream
# must learn these from the gateway only. Names are compared as an upstream may compare them: letter
# case aside and "_" as "-" (WSGI-style servers merge X_Gateway_Tier into X-Gateway-Tier).
_VOUCHED = frozenset({"forwarded", "x-real-ip", "x-original-url", "x-rewrite-url"})
_VOUCHED_PREFIXES = ("x-gateway-", "x-forwarded-", "proxy-")
# Request fields the gateway sets itself or must never pass on. The body goes upstream decoded, so its
# Content-Encoding never does; Content-Length is the decoded body's, set by the client.
_REQUEST_DROP = (
    HOP_BY_HOP | _VOUCHED | {"host", "content-length", "content-encoding", "authorization", "x-request-id", "expect"}
)
# Read by the gateway to decide: another spelling of it (Content_Type) could be read by the upstream instead.
_DECIDED_ON = frozenset({"content-type"})
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
USAGE_CAPTURE_LIMIT = 4 * 1024 * 1024
# A request-target may hold visible ASCII only; the pure-Python parser lets raw UTF-8 through, llhttp does
# not, and the two must agree. Control characters may not hide behind percent-encoding either.
_TARGET = re.compile(r"[!-~]+")
_ENCODED_CONTROL = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff])")
# Response head characters that must never reach a caller: every control except HTAB (RFC 9110 §5.5).
_HEAD_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

UsageSink = Callable[[int], Awaitable[None]]


def _connection_named(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = getall("Connection", []) if getall else [headers.get("Connection", "")]
    for value in values:
        for token in value.split(","):
            token = token.strip().lower().replace("_", "-")
            if token:
                named.add(token)
    return named


def header_key(name: str) -> str:
    """A header name as any upstream might compare it: lower case, ``_`` read as ``-``."""
    lower = name.lower()
    return lower.replace("_", "-") if "_" in lower else lower


_DROPPED_NAMES: dict[str, bool] = {}


def _dropped(name: str) -> bool:
    """Whether a caller header never goes upstream as the caller sent it (cached: names repeat)."""
    found = _DROPPED_NAMES.get(name)
    if found is None:
        key = header_key(name)
        found = (
            key in _REQUEST_DROP or key.startswith(_VOUCHED_PREFIXES) or (key in _DECIDED_ON and key != name.lower())
        )
        if len(_DROPPED_NAMES) >= 4096:
            _DROPPED_NAMES.clear()
        _DROPPED_NAMES[name] = found
    return found


@functools.lru_cache(maxsize=1024)  # most requests name one of a few targets; a refusal is not cached
def origin_form(target: str) -> str:
    """The path and query to send upstream for a caller's request-target (RFC 9112 §3.2).

    Origin-form passes unchanged. Absolute-form (``http://host/path?q``) keeps only its path and
    query: the gateway routes by its configuration, never by an authority the caller names. The
    asterisk and authority forms, fragments, bytes outside visible ASCII, and percent-encoded
    control characters in the path are refused (400), identically under both HTTP parsers.
    """
    if not _TARGET.fullmatch(target) or "#" in target:
        raise _bad_target()
    if not target.startswith("/"):
        scheme, separator, rest = target.partition("://")
        if not separator or scheme.lower() not in ("http", "https"):
            raise _bad_target()
        cut = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        target = rest[min(cut) :] if cut else "/"
        if target.startswith("?"):
            target = "/" + target
    if _ENCODED_CONTROL.search(target.split("?", 1)[0]):
        raise _bad_target()
    return target


def _bad_target() -> GatewayError:
    return bad_request(
        "The request target must be a path (origin-form) of visible ASCII, without a fragment "
        "or encoded control characters."
    )


def response_problem(status: int, reason: str | None, headers: CIMultiDictProxy[str]) -> str | None:
    """Why an upstream response head may not be relayed, or None when it may.

    The client parsers already refuse CR, LF and NUL; other controls (ESC, DEL, VT...) would pass
    to the caller raw. A status outside 200-599 (an unsolicited 101, a private 999) and differing
    Content-Length values (the pure-Python parser takes the first) are not relayed either.
    """
    if not 200 <= status <= 599:
        return f"status {status}"
    if reason and _HEAD_CONTROL.search(reason):
        return "control character in the reason phrase"
    # One scan over every name and value ("\t" cannot be one of the controls looked for).
    if _HEAD_CONTROL.search("\t".join(itertools.chain.from_iterable(headers.items()))):
        for name, value in headers.items():
            if _HEAD_CONTROL.search(name) or _HEAD_CONTROL.search(value):
                return f"control character in header {name[:40]!r}"
    lengths = headers.getall("Content-Length", ())
    if len(lengths) > 1 and len(set(lengths)) > 1:
        return "conflicting Content-Length values"
    return None


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    forwarded_for: str,
    proto: str,
    request_id: str,
    identity_headers: Iterable[tuple[str, str]],
    upstream_auth: str | None,
) -> CIMultiDict[str]:
    """Caller headers minus hop-by-hop, credentials and every name the gateway vouches for, plus its own.

    The gateway's own (``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Request-Id``, ``X-Gateway-*``,
    the upstream's ``Authorization``) are each sent exactly once.
    """
    named = _connection_named(incoming) if "Connection" in incoming else None
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if _dropped(name) or (named is not None and header_key(name) in named):
            continue
        out.add(name, value)
    # Added after the filter so a caller's "Connection: X-Forwarded-For" cannot strip them.
    if forwarded_for:
        out["X-Forwarded-For"] = forwarded_for
    out["X-Forwarded-Proto"] = proto
    out["X-Request-Id"] = request_id
    for name, value in identity_headers:
        out[name] = value
    if upstream_auth:
        out["Authorization"] = upstream_auth
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    named = _connection_named(upstream) if "Connection" in upstream else None
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower.startswith("proxy-") or (named is not None and header_key(name) in named):
            continue
        out.add(name, value)
    return out


class Router:
    """Picks the upstream base URL for a model: ``upstream.routes`` globs, else ``upstream.url``."""

    def __init__(self, default: str, routes: Mapping[str, str]) -> None:
        self.default = default
        self.routes = list(routes.items())
        self._cache: dict[str | None, str] = {}

    def base_for(self, model: str | None) -> str:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        base = self.default
        if model is not None:
            for glob, url in self.routes:
                if fnmatch.fnmatchcase(model, glob):
                    base = url
                    break
        if len(self._cache) < 10_000:
            self._cache[model] = base
        return base


def usage_tokens(document: object) -> int | None:
    """``usage.total_tokens`` (or prompt + completion) from an OpenAI-style JSON document."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")]
    numbers = [p for p in parts if isinstance(p, int) and not isinstance(p, bool) and p >= 0]
    return sum(numbers) if numbers else None


class SseUsageScanner:
    """Finds ``usage`` in SSE ``data:`` lines as they pass, without holding the stream."""

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> int | None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()[-65536:]
        found: int | None = None
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    tokens = usage_tokens(orjson.loads(line[5:].strip()))
                except orjson.JSONDecodeError:
                    continue
                if tokens is not None:
                    found = tokens
        return found


@dataclass(slots=True)
class ProxyOutcome:
    """What the relay saw, for metrics, audit and token charging.

    ``body`` is the upstream response body while it is relayed (what a revocation interrupts, see
    inflight.py); ``revoked`` the decision that ended the request, when a new policy version did.
    """

    upstream_status: int = 0
    upstream_seconds: float = 0.0
    tokens: int | None = None
    error_kind: str | None = None
    body: Body | None = None
    revoked: Decision | None = None


class StreamRevoked(Exception):
    """Raised into a response body being relayed: a new policy version refuses its request."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.code)
        self.decision = decision


def unanswered(exc: TimeoutError | UpstreamError, outcome: ProxyOutcome) -> GatewayError:
    """The error for a request to the model server that got no response: 504 when it timed out, else 502."""
    if isinstance(exc, TimeoutError):
        outcome.error_kind = "timeout"
        return GatewayError(504, "upstream_timeout", "The model server did not answer in time.")
    outcome.error_kind = "connect" if isinstance(exc, UpstreamConnectError) else "protocol"
    return GatewayError(502, "upstream_unreachable", "The model server could not be reached.")


def _sse_error_event(code: str, message: str, request_id: str, status: int | None = None) -> bytes:
    if status is None:
        status = 504 if code == "upstream_timeout" else 502
    body = error_body(status, code, message, request_id)
    return b"event: error\ndata: " + body + b"\n\n"


def _ended_by(
    exc: TimeoutError | UpstreamPayloadError | StreamRevoked,
    upstream: UpstreamResponse,
    outcome: ProxyOutcome,
) -> tuple[int, str, str]:
    """Status, code and message for a response body that stopped before its end, noted in ``outcome``."""
    if isinstance(exc, StreamRevoked):
        upstream.close()  # the model server sees the request end, and the connection is never reused
        decision = outcome.revoked = exc.decision
        return decision.status, decision.code, decision.message
    if isinstance(exc, TimeoutError):
        outcome.error_kind = "timeout"
        return 504, "upstream_timeout", "The model server stopped sending mid-response."
    outcome.error_kind = "protocol"
    return 502, "upstream_unreachable", "The model server broke off the response."


class CoalescedResponse(web.StreamResponse):
    """An answer whose head waits for its first body bytes and leaves in the same write: one send
    instead of two for most answers (aiohttp's ``web.Response`` does the same for whole bodies).
    Event streams are not held back: their head leaves at once, so the caller sees the stream open."""

    _send_headers_immediately = False


class Forwarder:
    """Relays one admitted request upstream (upstream_client.py) and the answer back, chunk by chunk."""

    def __init__(self, pool: UpstreamPool, router: Router, *, clock: Callable[[], float]) -> None:
        self.pool = pool
        self.router = router
        self.clock = clock

    async def forward(
        self,
        request: BaseRequest,
        view: CanonicalRequest,
        *,
        request_id: str,
        extra_response_headers: Iterable[tuple[str, str]],
        on_usage: UsageSink | None,
        outcome: ProxyOutcome,
    ) -> web.StreamResponse:
        """Send ``view`` (method, origin-form target, the computed headers, the decoded body) upstream and
        relay the answer to ``request``'s caller. Nothing of the request is read again here, so what
        was decided on is what is sent."""
        base = origin(self.router.base_for(view.model))
        headers = view.headers
        assert headers is not None  # RequestReader.read filled them before the request reached here
        if on_usage is not None:
            # Usage is read from the response as it passes: a compressed one would hide it, and with it
            # the token budget. Ask for the identity coding (the caller's Accept-Encoding is dropped).
            headers["Accept-Encoding"] = "identity"
        body = view.body
        started = self.clock()
        try:
            upstream = await self.pool.request(base, view.method, view.target, headers, body)
        except (TimeoutError, UpstreamError) as exc:
            raise unanswered(exc, outcome) from exc
        except asyncio.CancelledError:
            # Revoked before the response began (inflight.py cancels the task here, and only here): the
            # request is refused as admission would refuse it now. The pool closed the upstream connection.
            revoked = outcome.revoked
            task = asyncio.current_task()
            if revoked is None or task is None or task.uncancel() > 0:
                raise
            raise GatewayError(revoked.status, revoked.code, revoked.message) from None
        outcome.body = upstream.content
        try:
            return await self._relay(
                request,
                upstream,
                request_id=request_id,
                extra=extra_response_headers,
                on_usage=on_usage,
                outcome=outcome,
                started=started,
            )
        finally:
            upstream.release()
            outcome.upstream_seconds = self.clock() - started

    async def _relay(
        self,
        request: BaseRequest,
        upstream: UpstreamResponse,
        *,
        request_id: str,
        extra: Iterable[tuple[str, str]],
        on_usage: UsageSink | None,
        outcome: ProxyOutcome,
        started: float,
    ) -> web.StreamResponse:
        outcome.upstream_status = upstream.status
        problem = response_problem(upstream.status, upstream.reason, upstream.headers)
        if problem is not None:
            log.warning("malformed upstream response not relayed: %s", problem)
            outcome.error_kind = "protocol"
            upstream.close()  # never reuse a connection that carried it
            raise GatewayError(502, "upstream_unreachable", "The model server sent a malformed response.")
        content_type = upstream.headers.get("Content-Type", "")
        is_sse = content_type.startswith("text/event-stream")
        response = (web.StreamResponse if is_sse else CoalescedResponse)(
            status=upstream.status, reason=upstream.reason, headers=response_headers(upstream.headers)
        )
        response.headers["X-Request-Id"] = request_id
        for name, value in extra:
            response.headers[name] = value
        if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        is_json = "json" in content_type and on_usage is not None
        scanner = SseUsageScanner() if is_sse and on_usage is not None else None
        await response.prepare(request)
        held: list[bytes] = []  # JSON bodies: captured (bounded) to read usage before the last byte
        held_size = 0
        pending: bytes | None = None
        try:
            async for chunk in upstream.content.iter_any():
                if scanner is not None:
                    tokens = scanner.feed(chunk)
                    if tokens is not None and outcome.tokens is None:
                        outcome.tokens = tokens
                        await on_usage(tokens)  # type: ignore[misc]
                    await response.write(chunk)
                elif is_json:
                    if held_size <= USAGE_CAPTURE_LIMIT:
                        held.append(chunk)
                        held_size += len(chunk)
                    # One chunk of look-behind, so the charge can land before the last byte.
                    if pending is not None:
                        await response.write(pending)
                    pending = chunk
                else:
                    await response.write(chunk)
        except (TimeoutError, UpstreamPayloadError, StreamRevoked) as exc:
            status, code, message = _ended_by(exc, upstream, outcome)
            await self._abort_stream(response, is_sse, code, message, request_id, status)
            return response
        if is_json and held_size <= USAGE_CAPTURE_LIMIT and held:
            try:
                tokens = usage_tokens(orjson.loads(b"".join(held)))
            except orjson.JSONDecodeError:
                tokens = None
            if tokens is not None:
                outcome.tokens = tokens
                await on_usage(tokens)  # type: ignore[misc]
        # The last chunk goes with the end of the message: with the head held back, a one-chunk answer
        # leaves in one write.
        await response.write_eof(pending or b"")
        return response

    @staticmethod
    async def _abort_stream(
        response: web.StreamResponse, is_sse: bool, code: str, message: str, request_id: str, status: int | None = None
    ) -> None:
        if is_sse:
            try:
                await response.write(_sse_error_event(code, message, request_id, status))
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
            return
        # Not SSE: the status line is gone, so the only honest signal is a cut connection.
        transport = response._req.transport if response._req is not None else None
        if transport is not None:
            transport.abort()
        await asyncio.sleep(0)
