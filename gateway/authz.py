"""The decision service: the gateway's decision, rate limits and audit for a data plane that proxies by itself.

Envoy (``ext_authz`` with ``http_service``), nginx (``auth_request``) and Caddy (``forward_auth``) ask
the ``authz`` listener about each request before they send it to the model server; the gateway
answers and the data plane proxies. The answer is the public path's: the same :class:`Admission`
steps (policy freshness, identity, countries, model, decide, rate), the same refusals rendered by the
same :class:`~gateway.errors.Presentation`, the same metrics and the same audit record, marked
``"via": "authz"``. Only how the original request is read, and how the answer is shaped for the data
plane, are this module's:

* ``/authz/envoy<original path>``: Envoy's HTTP service with ``path_prefix: /authz/envoy``. Method and
  path are the original's, with the caller's headers; the body when Envoy sends it
  (``with_request_body``), so the model can come from it. Any answer but 200 Envoy passes to the caller
  as it is (status, the allowed headers, body).
* ``/authz/nginx``: ``auth_request``. The original method and URI in ``X-Original-Method`` and
  ``X-Original-URI``; no body. nginx passes only 401 and 403 from an auth subrequest (anything else
  becomes its own 500), so every refusal is answered 401 or 403 with the real status in
  ``X-Gateway-Status`` and the contract body in ``X-Gateway-Error``; deploy/nginx turns them back
  into the caller's answer.
* ``/authz/caddy``: ``forward_auth``. The original method and URI in ``X-Forwarded-Method`` and
  ``X-Forwarded-Uri``; no body. Caddy passes every non-2xx answer to the caller as it is.

Without a body the model comes from the path (``policy.model_path_pattern``) or from the header named
by ``authz.model_header``, which the data plane sets from the body it read. An allowed request is
answered 200 with the identity headers for the upstream, the rate-limit headers for the caller and,
for a tier with a token budget, ``X-Gateway-Usage-Key``: the data plane reports the tokens the
response used with ``POST /authz/usage`` (the gateway does not see the response in this mode).

The client address: the data plane is the listener's peer and is believed; the caller is the
right-most ``X-Forwarded-For`` hop it sent that is not in ``network.trusted_proxies``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest

from .admission import rate_refused
from .app import request_server
from .errors import GatewayError, bad_request, invalid, json_response, method_not_allowed, not_found
from .listener import JsonErrorServer
from .logs import request_id_for
from .network import TrustedProxies, UnreadableHop, client_chain
from .proxy import origin_form, usage_tokens
from .public import Exchange, PublicPath, identity_headers
from .request_model import REFUSED_METHODS, check_model, decode_body
from .runtime import Runtime

ENVOY_PREFIX = "/authz/envoy"
NGINX_PATH = "/authz/nginx"
CADDY_PATH = "/authz/caddy"
USAGE_PATH = "/authz/usage"
VIA = "authz"
# The headers an allowed answer carries for the upstream request (the data plane sets them, replacing
# any a caller sent) and the one it keeps for the usage callback.
UPSTREAM_HEADERS = ("X-Gateway-Subject", "X-Gateway-Org", "X-Gateway-Tier", "X-Request-Id")
USAGE_KEY_HEADER = "X-Gateway-Usage-Key"
# nginx: the real status and the body of a refusal it can only be told as 401 or 403.
STATUS_HEADER = "X-Gateway-Status"
ERROR_HEADER = "X-Gateway-Error"
MAX_USAGE_BODY = 64 * 1024


class AuthzPath(PublicPath):
    """The ``authz`` listener's handler: the public path's admission, metrics and audit, without proxying."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        authz = runtime.settings.authz
        self.model_header = authz.model_header if authz is not None else None
        self.trusted = TrustedProxies(runtime.settings.network.trusted_proxies)
        self.models = runtime.reader.models

    async def serve(self, request: BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == USAGE_PATH:
            return await self._usage(request)
        if path == NGINX_PATH:
            return _for_nginx(await self.handle(request))
        if path == CADDY_PATH or path.startswith(ENVOY_PREFIX + "/") or path == ENVOY_PREFIX:
            return await self.handle(request)
        err = not_found(
            f"No such decision endpoint; the data plane asks {ENVOY_PREFIX}/<path> (Envoy), "
            f"{NGINX_PATH} (nginx) or {CADDY_PATH} (Caddy)."
        )
        return self.presentation.response(
            err, request_id=request_id_for(request.headers.get("X-Request-Id")), policy_version=self.watcher.version
        )

    # --- the decision -------------------------------------------------------------------------------

    async def _admit_and_forward(self, request: BaseRequest, exchange: Exchange) -> web.StreamResponse:
        exchange.via = VIA
        admission = self.admission
        method, target = self._original(request)
        exchange.ip = ip = self._client_ip(request)
        snapshot = admission.enforced()
        identity = admission.identify(request.headers.get("Authorization"), snapshot)
        exchange.identity = identity
        caller = admission.caller(identity, ip, snapshot)
        exchange.ip_country = caller.ip_subdivision or caller.ip_country
        path = target.partition("?")[0]
        model = admission.model(await self._model(request, path), method, path)
        exchange.model = model
        decision = admission.decide(snapshot, caller, model, method=method, path=path)
        exchange.decision = decision
        if not decision.allowed:
            raise GatewayError(decision.status, decision.code, decision.message)
        rate = await admission.rate(identity, model, self.limiter.budget())
        exchange.rate = rate
        rate_headers = rate.headers(identity.tier)
        if not rate.allowed:
            raise rate_refused(rate, model, tuple(rate_headers))
        exchange.status = 200
        headers = [
            *identity_headers(identity.subject, identity.org, identity.tier),
            ("X-Request-Id", exchange.request_id),
            ("X-Gateway-Policy-Version", str(self.watcher.version)),
            *rate_headers,
        ]
        if self.settings.tiers[identity.tier].tokens_per_minute is not None:
            headers.append((USAGE_KEY_HEADER, usage_key(identity.subject, identity.tier, model)))
        return web.Response(status=200, headers=headers)

    def _original(self, request: BaseRequest) -> tuple[str, str]:
        """The original request's method and origin-form target, as the data plane reports them."""
        headers = request.headers
        path = request.path
        if path == NGINX_PATH:
            method, target = headers.get("X-Original-Method"), headers.get("X-Original-URI")
            names = "X-Original-Method and X-Original-URI"
        elif path == CADDY_PATH:
            method, target = headers.get("X-Forwarded-Method"), headers.get("X-Forwarded-Uri")
            names = "X-Forwarded-Method and X-Forwarded-Uri"
        else:  # Envoy sends the original method, and the original path after its path_prefix
            method, target = request.method, request.raw_path[len(ENVOY_PREFIX) :] or "/"
            names = ""
        if not method or not target:
            raise bad_request(f"The data plane must send the original request's {names}.")
        method = method.upper()
        if method in REFUSED_METHODS:
            raise method_not_allowed(method)
        return method, origin_form(target)

    def _client_ip(self, request: BaseRequest) -> str:
        """The caller's address: the data plane (the peer) is believed, and so are trusted proxies before it."""
        hops = request.headers.getall("X-Forwarded-For", ())
        if not hops:
            return client_chain(request.remote, (), self.trusted)[0]
        try:
            return client_chain(None, hops, self.trusted)[0]
        except UnreadableHop as exc:
            raise bad_request(
                "An X-Forwarded-For hop from a trusted proxy is not an IP address in canonical "
                "form; the caller's address cannot be vouched for."
            ) from exc

    async def _model(self, request: BaseRequest, path: str) -> str | None:
        """The model named by the body (when the data plane sent it), the model header, or the path; two
        that differ are refused, as the public listener refuses a path and a body that differ."""
        models = self.models
        named: list[tuple[str, str]] = []
        if request.body_exists:
            if request.headers.get("x-envoy-auth-partial-body", "").lower() == "true":
                raise GatewayError(
                    413,
                    "request_too_large",
                    "The data plane sent only part of the request body; the model cannot be vouched for "
                    "(raise its body limit to the gateway's limits.max_body_bytes).",
                )
            body = await self.reader.body(request)
            encodings = request.headers.getall("Content-Encoding", ())
            if encodings:
                body = decode_body(body, encodings, self.reader.max_body_bytes)
            if body:
                found = models.read_body(body, request.headers.getall("Content-Type", ()))[0]
                if found is not None:
                    named.append(("body", found))
        if self.model_header is not None:
            values = request.headers.getall(self.model_header, ())
            if len(values) > 1:
                raise bad_request(f"The request has more than one {self.model_header} header.")
            if values and values[0]:
                named.append((self.model_header, check_model(values[0])))
        if models.pattern is not None:
            found = models.model_from_path(path)
            if found is not None:
                named.append(("path", found))
        if len({model for _, model in named}) > 1:
            where = " and ".join(f"its {source} names '{model[:100]}'" for source, model in named)
            raise bad_request(f"The request names more than one model: {where}.")
        return named[0][1] if named else None

    # --- token usage -------------------------------------------------------------------------------

    async def _usage(self, request: BaseRequest) -> web.StreamResponse:
        """``POST /authz/usage`` ``{"usage_key": ..., "tokens": N}`` (or ``"usage": {...}`` as the model
        server answered it): the tokens an allowed response used, charged to its caller's budget."""
        request_id = request_id_for(request.headers.get("X-Request-Id"))
        try:
            if request.method != "POST":
                raise GatewayError(405, "method_not_allowed", f"{USAGE_PATH} takes POST.", headers=(("Allow", "POST"),))
            subject, tier, model, tokens = await self._usage_input(request)
            await self.limiter.charge(subject, model, tier, tokens, budget=self.limiter.budget())
        except GatewayError as err:
            return self.presentation.response(err, request_id=request_id, policy_version=self.watcher.version)
        return json_response({"charged": tokens})

    async def _usage_input(self, request: BaseRequest) -> tuple[str, str, str | None, int]:
        if request.content_length is not None and request.content_length > MAX_USAGE_BODY:
            raise GatewayError(413, "request_too_large", f"A usage report is at most {MAX_USAGE_BODY} bytes.")
        raw = await request.content.read(MAX_USAGE_BODY + 1)
        if len(raw) > MAX_USAGE_BODY:
            raise GatewayError(413, "request_too_large", f"A usage report is at most {MAX_USAGE_BODY} bytes.")
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise invalid("body", "must be a JSON object") from None
        if not isinstance(document, dict):
            raise invalid("body", "must be a JSON object")
        key = document.get("usage_key")
        if not isinstance(key, str):
            raise invalid("usage_key", f"the {USAGE_KEY_HEADER} header of the allowed answer is required")
        subject, tier, model = read_usage_key(key)
        if tier not in self.settings.tiers:
            raise invalid("usage_key", "names no configured tier")
        if "tokens" in document:
            tokens = document["tokens"]
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                raise invalid("tokens", "must be a whole number of at least 0")
        elif "usage" in document:
            counted = usage_tokens(document)
            if counted is None:
                raise invalid("usage", "must hold total_tokens (or prompt_tokens and completion_tokens)")
            tokens = counted
        else:
            raise invalid("tokens", "required (or usage, as the model server answered it)")
        return subject, tier, model, tokens


def usage_key(subject: str, tier: str, model: str | None) -> str:
    """The opaque key a data plane hands back with a response's token usage."""
    return base64.urlsafe_b64encode(orjson.dumps([subject, tier, model])).decode("ascii").rstrip("=")


def read_usage_key(key: str) -> tuple[str, str, str | None]:
    try:
        decoded: Any = orjson.loads(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)))
    except (ValueError, binascii.Error):
        raise invalid("usage_key", "is not a key this gateway issued") from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 3
        or not all(isinstance(part, str) for part in decoded[:2])
        or not (decoded[2] is None or isinstance(decoded[2], str))
    ):
        raise invalid("usage_key", "is not a key this gateway issued")
    return decoded[0], decoded[1], decoded[2]


def _for_nginx(response: web.StreamResponse) -> web.StreamResponse:
    """nginx's ``auth_request`` passes 2xx, 401 and 403 only: a refusal travels as 401 or 403, with its
    own status and body in headers for deploy/nginx's ``error_page`` to answer the caller with."""
    if not isinstance(response, web.Response) or response.status < 300:
        return response
    status = response.status
    body = response.body if isinstance(response.body, bytes) else b""
    # A header value must be ASCII: the same JSON, every other character escaped.
    error = json.dumps(orjson.loads(body), ensure_ascii=True, separators=(",", ":"))
    headers = [(name, value) for name, value in response.headers.items() if name.lower() != "content-length"]
    headers += [(STATUS_HEADER, str(status)), (ERROR_HEADER, error)]
    return web.Response(status=401 if status == 401 else 403, body=body, headers=headers)


def create_authz_server(runtime: Runtime) -> JsonErrorServer:
    """The ``authz`` listener (docs/contract.md §15): only data planes should reach it."""
    keepalive = max(runtime.settings.limits.header_read_timeout_s, 75.0)  # data planes keep their connections
    return request_server(runtime, AuthzPath(runtime).serve, keepalive_timeout=keepalive)
