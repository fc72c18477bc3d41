"""``GET /v1/models``: the upstream's model list, cut down to the models this caller may use now.

A caller must not learn of a model the policy would refuse it (docs/contract.md §4): the list is
fetched whole (uncompressed, bounded), every entry's ``id`` is decided as a request for that model
would be, and only the allowed entries are answered. An answer that is not the expected list
(another status, another media type or coding, not JSON, entries without a string ``id``, too large)
is 502 rather than an unfiltered list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .errors import GatewayError
from .policy.decide import Rules
from .proxy import Forwarder, ProxyOutcome, response_headers, response_problem, unanswered
from .upstream_client import UpstreamError, UpstreamPayloadError, origin

MAX_LIST_BYTES = 4 * 1024 * 1024
# Upstream response fields that describe the body as the upstream sent it, not the filtered one.
_BODY_FIELDS = (
    "Content-Type",
    "Content-Encoding",
    "ETag",
    "Content-MD5",
    "Digest",
    "Content-Range",
    "Accept-Ranges",
    "Last-Modified",
    "Cache-Control",
    "Expires",
    "Age",
)
_CONDITIONAL_FIELDS = ("If-None-Match", "If-Match", "If-Modified-Since", "If-Unmodified-Since", "Range", "If-Range")


def lists_models(method: str, path: str, rules: Rules) -> bool:
    """True for a ``GET`` or ``HEAD`` to a modelless path that lists models (one ending in ``/models``).

    A ``HEAD`` is answered from the filtered list too (its body left out): the upstream's own headers
    would give away the whole list's length."""
    return method in ("GET", "HEAD") and path in rules.modelless_paths and path.endswith("/models")


def _unreadable(outcome: ProxyOutcome, why: str) -> GatewayError:
    outcome.error_kind = "protocol"
    return GatewayError(
        502, "upstream_unreachable", f"The model server's model list could not be read ({why}), so no list is answered."
    )


def filter_models(body: bytes, allowed: Callable[[str], bool]) -> bytes:
    """The list document with only the ``data`` entries whose ``id`` is ``allowed``; ValueError if it is no list."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError("not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError('not an object with a "data" list')
    kept = []
    for entry in document["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ValueError('an entry without a string "id"')
        if allowed(entry["id"]):
            kept.append(entry)
    document["data"] = kept
    return orjson.dumps(document)


async def forward_model_list(
    forwarder: Forwarder,
    target: str,
    *,
    headers: CIMultiDict[str],
    request_id: str,
    extra_response_headers: Iterable[tuple[str, str]],
    allowed: Callable[[str], bool],
    outcome: ProxyOutcome,
) -> web.Response:
    """``GET target`` (origin-form, as admitted) upstream with ``headers``; answer the entries ``allowed``
    keeps. The only other answer is an error (502, or 504 when the upstream is silent)."""
    # Filtering reads the body, so it must come uncompressed; the caller's Accept-Encoding is not passed.
    headers["Accept-Encoding"] = "identity"
    # The answer is a new body: the caller's validators and ranges refer to the upstream's, not to it.
    for name in _CONDITIONAL_FIELDS:
        headers.popall(name, None)
    base = origin(forwarder.router.base_for(None))
    started = time.perf_counter()
    try:
        upstream = await forwarder.pool.request(base, "GET", target, headers, b"")
    except (TimeoutError, UpstreamError) as exc:
        raise unanswered(exc, outcome) from exc
    try:
        outcome.upstream_status = upstream.status
        if response_problem(upstream.status, upstream.reason, upstream.headers) is not None:
            upstream.close()
            raise _unreadable(outcome, "a malformed response")
        if upstream.status != 200:
            raise _unreadable(outcome, f"status {upstream.status}")
        coding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
        if coding != "identity" or "json" not in upstream.headers.get("Content-Type", "").lower():
            raise _unreadable(outcome, "not uncompressed JSON")
        if (upstream.content_length or 0) > MAX_LIST_BYTES:
            raise _unreadable(outcome, "too large")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in upstream.content.iter_any():
                size += len(chunk)
                if size > MAX_LIST_BYTES:
                    raise _unreadable(outcome, "too large")
                chunks.append(chunk)
        except TimeoutError as exc:
            outcome.error_kind = "timeout"
            raise GatewayError(504, "upstream_timeout", "The model server stopped sending mid-response.") from exc
        except UpstreamPayloadError as exc:
            raise _unreadable(outcome, "a broken body") from exc
        try:
            body = filter_models(b"".join(chunks), allowed)
        except ValueError as exc:
            raise _unreadable(outcome, str(exc)) from exc
        kept = response_headers(upstream.headers)
        for name in _BODY_FIELDS:
            kept.popall(name, None)
    finally:
        upstream.release()
        outcome.upstream_seconds = time.perf_counter() - started
    # web.Response sets Content-Length from the filtered body; nothing compresses it on the way out.
    response = web.Response(status=200, body=body, headers=kept, content_type="application/json")
    # One caller's list, as the policy stands now: no cache may keep it or give it to another caller.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Request-Id"] = request_id
    for name, value in extra_response_headers:
        response.headers[name] = value
    return response
