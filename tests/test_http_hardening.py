"""HTTP and proxying on a raw socket (docs/hardening.md 11, 12, 14, 15, 16, 17), under both aiohttp HTTP parsers.

Every test runs twice: against a gateway on llhttp (aiohttp's C extension, the default) and against one
with ``AIOHTTP_NO_EXTENSIONS=1`` (the pure-Python parser). Both gateways share one Redis of this module's
own and the session's loopback upstream, which records every request it is sent (``clean_upstream.seen``):
the corpus checks what the gateway answered *and* what reached the upstream.

The gateways use ``policy.model_path_pattern`` ``^/v1/models/(?P<model>[^/]+)/infer$``; the caller's tier
``bulk`` may use ``open-model`` (stage general) but not ``secret-model`` (stage internal: 403 not_released).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.redis_server import RedisServer

from .support.gateway_process import BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.rawhttp import AsyncRawConnection, RawConnection, RawResponse, chunked, exchange, request
from .support.tokens import hs_token
from .support.upstream import Seen, Upstream

PATTERN = r"^/v1/models/(?P<model>[^/]+)/infer$"
OPEN, SECRET = "open-model", "secret-model"
UPSTREAM_KEY = "upstream-own-credential-for-hardening"
HEADER_TIMEOUT_S = 2.0
MAX_BODY = 4096
TIERS: dict[str, Any] = {
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
    "partner": {"requests_per_minute": 600, "burst": 60, "stages": ["partners", "general"]},
    "internal": {"requests_per_minute": 6000, "burst": 600, "stages": ["internal", "partners", "general"]},
    # Enough for thousands of pipelined requests from one subject.
    "bulk": {"requests_per_minute": 10_000_000, "burst": 1_000_000, "stages": ["partners", "general"]},
}
PARSERS = {"llhttp": {}, "python": {"AIOHTTP_NO_EXTENSIONS": "1"}}


def hardening_policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    for name, stage in ((OPEN, "general"), (SECRET, "internal")):
        document["models"][name] = {
            "stage": stage,
            "timeline": [],
            "allowed_countries": None,
            "export_suspended": False,
        }
    return document


TOKEN = hs_token("hardening", tier="bulk", country="US", org="acme")
IR_TOKEN = hs_token("hardening-ir", tier="bulk", country="IR", org="acme")
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
MODEL_BODY = b'{"model": "open-model"}'  # a request to any path but the model list names its model


@pytest.fixture(scope="module")
def module_redis() -> Iterator[str]:
    with RedisServer() as server:
        seed_policy(server.url, hardening_policy())
        yield server.url


@pytest.fixture(scope="module", params=list(PARSERS))
def gw(request: pytest.FixtureRequest, module_redis: str, upstream: Upstream) -> Iterator[GatewayProcess]:
    config = gateway_config(
        upstream.url,
        tiers=TIERS,
        policy={"model_path_pattern": PATTERN},
        limits={"max_body_bytes": MAX_BODY, "header_read_timeout_s": HEADER_TIMEOUT_S},
        upstream={"api_key_env": "TEST_UPSTREAM_KEY"},
    )
    gateway = GatewayProcess(
        config, redis_url=module_redis, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **PARSERS[request.param]}
    )
    gateway.start()
    try:
        # The environment really selects the parser: aiohttp._http_parser is llhttp, aiohttp.http_parser Python.
        expected = {"llhttp": "aiohttp._http_parser", "python": "aiohttp.http_parser"}[request.param]
        assert _parser_of(gateway) == f"{expected}.HttpRequestParser"
        yield gateway
    finally:
        gateway.stop()


def _parser_of(gateway: GatewayProcess) -> str:
    import subprocess
    import sys

    code = (
        "import aiohttp.web_protocol as p; print(p.HttpRequestParser.__module__ + '.' + p.HttpRequestParser.__name__)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=gateway.env, capture_output=True, text=True, check=True
    ).stdout.strip()


def port_of(gateway: GatewayProcess) -> int:
    return int(gateway.config["listen"]["port"])


def assert_contract_error(response: RawResponse, status: int, code: str) -> None:
    """A gateway-made answer: the contract's JSON body and headers, nothing of the request echoed."""
    assert response.status == status, (response.status, response.body[:300])
    body = response.json()
    assert body["error"]["code"] == code, body
    assert (
        body["error"]["type"]
        == {
            400: "invalid_request_error",
            405: "invalid_request_error",
            408: "invalid_request_error",
            413: "invalid_request_error",
            415: "invalid_request_error",
            403: "permission_error",
            451: "legal_block",
        }[status]
    )
    assert body["error"]["message"]
    assert body["error"]["request_id"] == response.header("X-Request-Id")
    assert response.header("X-Gateway-Reason") == code
    assert response.header("X-Gateway-Policy-Version") is not None
    assert response.header(
        "Content-Type",
    ).startswith("application/json")


def seen_paths(upstream: Upstream) -> list[str]:
    return [seen.raw_path for seen in upstream.seen]


def seen_header(seen: Seen, name: str) -> str | None:
    values = [v for k, v in seen.headers if k.lower() == name.lower()]
    return values[0] if values else None


# --- case 11: request smuggling ----------------------------------------------------------------------

BODY = b'{"model": "open-model"}'
N = str(len(BODY)).encode()
HEX = f"{len(BODY):x}".encode()
CHUNKED_BODY = HEX + b"\r\n" + BODY + b"\r\n0\r\n\r\n"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n" + AUTH
# What a smuggler hides behind the malformed request: a complete, authorised request of its own.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gateway\r\n" + AUTH + b"\r\n"

SMUGGLING: dict[str, bytes] = {
    "cl_then_te": HEAD + b"Content-Length: " + N + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
    "te_then_cl": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: " + N + b"\r\n\r\n" + CHUNKED_BODY,
    "te_then_cl_zero": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n" + CHUNKED_BODY,
    "duplicate_cl_same": HEAD + b"Content-Length: " + N + b"\r\nContent-Length: " + N + b"\r\n\r\n" + BODY,
    "duplicate_cl_different": HEAD + b"Content-Length: " + N + b"\r\nContent-Length: 4\r\n\r\n" + BODY,
    "cl_list": HEAD + b"Content-Length: " + N + b", " + N + b"\r\n\r\n" + BODY,
    "te_xchunked": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n" + CHUNKED_BODY,
    "te_chunked_identity": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n" + CHUNKED_BODY,
    "te_twice": HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
    "te_space_before_colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n" + CHUNKED_BODY,
    "te_kelvin_sign": HEAD + "Transfer-Encoding: chun\u212aed\r\n\r\n".encode() + CHUNKED_BODY,
    "te_vertical_tab": HEAD + b"Transfer-Encoding: \x0bchunked\r\n\r\n" + CHUNKED_BODY,
    "obs_fold": HEAD + b"X-Folded: a\r\n b\r\nContent-Length: " + N + b"\r\n\r\n" + BODY,
    "obs_fold_te": HEAD + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + CHUNKED_BODY,
    "bare_lf_one_header": (HEAD + b"X-Bare: lf\nContent-Length: " + N + b"\r\n\r\n" + BODY),
    "bare_lf_everywhere": (HEAD + b"Content-Length: " + N + b"\r\n\r\n").replace(b"\r\n", b"\n") + BODY,
    "bare_cr": HEAD + b"X-Bare: cr\rContent-Length: 0\r\nContent-Length: " + N + b"\r\n\r\n" + BODY,
    "nul_in_value": HEAD + b"X-Nul: a\x00b\r\nContent-Length: " + N + b"\r\n\r\n" + BODY,
    "nul_in_name": HEAD + b"X-N\x00ul: ab\r\nContent-Length: " + N + b"\r\n\r\n" + BODY,
    "control_in_value": HEAD + b"X-Ctl: a\x01b\r\nContent-Length: " + N + b"\r\n\r\n" + BODY,
    "cl_plus": HEAD + b"Content-Length: +" + N + b"\r\n\r\n" + BODY,
    "cl_minus_one": HEAD + b"Content-Length: -1\r\n\r\n" + BODY,
    "cl_fullwidth_digits": HEAD + "Content-Length: \uff12\uff13\r\n\r\n".encode() + BODY,
    "cl_arabic_indic_digits": HEAD + "Content-Length: \u0662\u0663\r\n\r\n".encode() + BODY,
    "cl_superscript_digits": HEAD + "Content-Length: \u00b2\u00b3\r\n\r\n".encode() + BODY,
    "cl_hex": HEAD + b"Content-Length: 0x17\r\n\r\n" + BODY,
    "cl_underscore": HEAD + b"Content-Length: 2_3\r\n\r\n" + BODY,
    "cl_inner_space": HEAD + b"Content-Length: 2 3\r\n\r\n" + BODY,
    "chunk_size_plus": HEAD + b"Transfer-Encoding: chunked\r\n\r\n+" + CHUNKED_BODY,
    "chunk_size_0x": HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x" + CHUNKED_BODY,
    "chunk_size_underscore": HEAD + b"Transfer-Encoding: chunked\r\n\r\n1_7\r\n" + BODY + b"\r\n0\r\n\r\n",
    "chunk_size_overflow": HEAD + b"Transfer-Encoding: chunked\r\n\r\n1" + b"0" * 20 + b"17\r\n" + BODY,
    "chunk_extension_lf": HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + HEX + b";a\nb\r\n" + BODY + b"\r\n0\r\n\r\n",
    "chunk_bare_lf": HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + HEX + b"\n" + BODY + b"\n0\n\n",
    "chunk_data_overrun": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n" + BODY + b"\r\n0\r\n\r\n",
    "trailer_bare_lf": HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + HEX + b"\r\n" + BODY + b"\r\n0\r\nX: y\n",
    "space_in_header_name": HEAD + b"Content Length: " + N + b"\r\n\r\n" + BODY,
    "duplicate_host": b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nHost: evil.example\r\n" + AUTH + b"\r\n",
    "missing_host": b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n",
    "bad_version": b"GET /v1/models HTTP/1.1x\r\nHost: gateway\r\n" + AUTH + b"\r\n",
    "space_in_target": b"GET /v1/mo dels HTTP/1.1\r\nHost: gateway\r\n" + AUTH + b"\r\n",
}


# The pure-Python parser reads a chunk size past 2**64 as a number (llhttp refuses it at once): the bytes
# after it are body, never a request, and the body never completes. Answered 400 when the body read times
# out, then closed when the lingering read (as long as the header timeout) ends.
BODY_NEVER_ENDS = {("python", "chunk_size_overflow")}
JSON = ("Content-Type", "application/json")


def parser_of(gw: GatewayProcess) -> str:
    return "python" if gw.env.get("AIOHTTP_NO_EXTENSIONS") else "llhttp"


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_smuggling_corpus_is_400_and_close_and_nothing_reaches_upstream(
    gw: GatewayProcess, clean_upstream: Upstream, case: str
) -> None:
    slow = (parser_of(gw), case) in BODY_NEVER_ENDS
    started = time.monotonic()
    responses, closed = exchange(port_of(gw), SMUGGLING[case] + SMUGGLED, timeout=3 * HEADER_TIMEOUT_S + 3)
    # Exactly one answer: the smuggled request behind the malformed one is never parsed as a request (a
    # body that never ends is answered 408 when its read times out).
    status, code = (408, "request_timeout") if slow else (400, "invalid_request")
    assert [r.status for r in responses] == [status], [(r.status, r.body[:120]) for r in responses]
    assert_contract_error(responses[0], status, code)
    assert closed
    if slow:
        assert time.monotonic() - started < 2 * HEADER_TIMEOUT_S + 1.5
    else:  # refused by the parser: answered "Connection: close" and closed at once, not by a timer
        assert responses[0].closes
        assert time.monotonic() - started < HEADER_TIMEOUT_S, time.monotonic() - started
    assert clean_upstream.seen == []


def test_parser_error_answers_never_echo_the_request(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    secret = b"Bearer tok-" + uuid.uuid4().hex.encode()
    data = b"POST /v1/x HTTP/1.1\r\nHost: g\r\nAuthorization: " + secret + b"\r\nContent-Length: +5\r\n\r\n"
    responses, _ = exchange(port_of(gw), data)
    assert_contract_error(responses[0], 400, "invalid_request")
    assert secret not in responses[0].head + responses[0].body
    assert b"+5" not in responses[0].body
    assert clean_upstream.seen == []


def test_upstream_sees_exactly_the_requests_the_gateway_accepted(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    ids = [f"acc-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    valid = [
        request(
            "POST", "/v1/chat/completions", [("Authorization", f"Bearer {TOKEN}"), ("X-Request-Id", rid), JSON], BODY
        )
        for rid in ids
    ]
    # Two valid requests answered first, then two more with a smuggling attempt behind them in one write.
    with RawConnection(port_of(gw)) as conn:
        conn.send(valid[0] + valid[1])
        first = conn.read_responses(2)
        conn.send(valid[2] + valid[3] + SMUGGLING["cl_then_te"] + SMUGGLED)
        rest: list[RawResponse] = []
        while not conn.eof:
            try:
                rest.append(conn.read_response(timeout=HEADER_TIMEOUT_S + 2))
            except ConnectionError:
                break
    assert [r.status for r in first] == [200, 200]
    # llhttp drops the valid requests that shared a read with the malformed one (the pure-Python parser
    # answers them): either way, what was answered 200 is exactly what reached the upstream.
    statuses = [r.status for r in rest]
    assert statuses in ([400], [200, 400], [200, 200, 400]), statuses
    accepted = [r.header("X-Request-Id") for r in first + rest if r.status == 200]
    assert accepted == ids[: len(accepted)]
    assert [seen_header(s, "X-Request-Id") for s in clean_upstream.seen] == accepted
    assert all(s.body == BODY and s.raw_path == "/v1/chat/completions" for s in clean_upstream.seen)


def test_malformed_chunk_after_good_chunks_is_answered_once(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for bad in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n", b"0\r\nX: y\n" + SMUGGLED):
        with RawConnection(port_of(gw)) as conn:
            conn.send(HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n')
            time.sleep(0.1)  # the handler is now reading the body
            conn.send(bad + SMUGGLED)
            started = time.monotonic()
            response = conn.read_response()
            assert_contract_error(response, 400, "invalid_request")
            assert conn.closed_within(HEADER_TIMEOUT_S / 2), "a second answer or an open connection"
            assert time.monotonic() - started < HEADER_TIMEOUT_S / 2
    assert clean_upstream.seen == []


def test_upgrade_does_not_tunnel_the_bytes_behind_it(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    """GHSA-mfx4-hv73-q22v: after an Upgrade request, what follows is still parsed and decided."""
    upgrade = (
        b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + AUTH + b"\r\n"
    )
    unauthorised = b"GET /smuggled HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
    responses, _ = exchange(port_of(gw), upgrade + unauthorised, timeout=HEADER_TIMEOUT_S + 3)
    assert [r.status for r in responses] == [200, 401]
    assert_contract_error_401(responses[1])
    assert seen_paths(clean_upstream) == ["/v1/models"]
    seen = {k.lower(): v for k, v in clean_upstream.seen[0].headers}
    assert "upgrade" not in seen and "connection" not in seen


def assert_contract_error_401(response: RawResponse) -> None:
    assert response.status == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert response.header("WWW-Authenticate") == 'Bearer error="invalid_token"'


# --- case 12: Connection-named headers cannot strip the gateway's own ---------------------------------


def test_connection_header_cannot_strip_headers_the_gateway_adds(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    named = (
        "close, X-Forwarded-For, X-Forwarded-Proto, X-Request-Id, X-Gateway-Subject, X-Gateway-Org, "
        "X-Gateway-Tier, Authorization, Host, X-Caller-Private"
    )
    data = request(
        "POST",
        "/v1/chat/completions",
        [
            ("Authorization", f"Bearer {TOKEN}"),
            ("Connection", named),
            ("X-Caller-Private", "drop me"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Request-Id", "conn-close-1"),
            ("X-Kept", "kept"),
            JSON,
        ],
        BODY,
    )
    responses, closed = exchange(port_of(gw), data)
    assert [r.status for r in responses] == [200] and closed
    headers = clean_upstream.seen[0].headers
    names = [k.lower() for k, _ in headers]
    values = {k.lower(): v for k, v in headers}
    for own, expected in (
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "conn-close-1"),
        ("x-gateway-subject", "hardening"),
        ("x-gateway-org", "acme"),
        ("x-gateway-tier", "bulk"),
        ("authorization", f"Bearer {UPSTREAM_KEY}"),
    ):
        assert names.count(own) == 1, (own, headers)
        assert values[own] == expected, (own, values[own])
    assert "x-caller-private" not in names and "connection" not in names
    assert values["x-kept"] == "kept"
    assert values["host"] == f"127.0.0.1:{clean_upstream.port}"


# --- case 14: Host and absolute-form targets change nothing -------------------------------------------


def test_absolute_form_target_is_proxied_to_the_configured_upstream_only(
    gw: GatewayProcess, clean_upstream: Upstream
) -> None:
    admin_port = gw.config["admin"]["port"]
    for target, path in (
        (b"http://evil.example/v1/models?x=1", "/v1/models?x=1"),
        (b"HTTP://evil.example:8443/v1/models", "/v1/models"),
        (b"https://user:pass@evil.example/v1/models", "/v1/models"),
        (b"http://evil.example", "/"),
        (f"http://127.0.0.1:{admin_port}/metrics".encode(), "/metrics"),
    ):
        clean_upstream.reset()
        body = b"" if path.startswith("/v1/models") else MODEL_BODY
        head = (b"POST " if body else b"GET ") + target + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        framing = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode() if body else b""
        data = head + AUTH + framing + b"\r\n" + body
        responses, _ = exchange(port_of(gw), data)
        assert [r.status for r in responses] == [200], (target, responses[0].body[:200])
        assert seen_paths(clean_upstream) == [path], target
        host = {k.lower(): v for k, v in clean_upstream.seen[0].headers}["host"]
        assert host == f"127.0.0.1:{clean_upstream.port}"
        assert b"gateway_requests_total" not in responses[0].body  # never the admin listener's metrics


def test_absolute_form_model_path_is_decided_on_its_path(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for model, status in ((SECRET, 403), (OPEN, 200)):
        data = (
            b"POST http://evil.example/v1/models/"
            + model.encode()
            + b"/infer HTTP/1.1\r\nHost: gateway\r\n"
            + AUTH
            + b"Connection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        responses, _ = exchange(port_of(gw), data)
        assert [r.status for r in responses] == [status]
    assert seen_paths(clean_upstream) == [f"/v1/models/{OPEN}/infer"]


@pytest.mark.parametrize(
    "target",
    [
        b"*",
        b"evil.example:443",
        b"ftp://evil.example/v1/models",
        b"/v1/models#frag",
        b"/v1/models/%00",
        "/v1/mod\u00e9ls".encode(),
    ],
)
def test_other_request_target_forms_are_refused(gw: GatewayProcess, clean_upstream: Upstream, target: bytes) -> None:
    method = b"CONNECT" if target == b"evil.example:443" else b"OPTIONS" if target == b"*" else b"GET"
    data = method + b" " + target + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n" + AUTH + b"\r\n"
    responses, _ = exchange(port_of(gw), data)
    assert len(responses) == 1
    if method == b"CONNECT":  # never tunnelled, whatever its target
        assert_contract_error(responses[0], 405, "method_not_allowed")
    else:
        assert_contract_error(responses[0], 400, "invalid_request")
    assert clean_upstream.seen == []


def test_hostile_host_headers_change_nothing(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    admin_port = gw.config["admin"]["port"]
    for host in (
        "x/#@evil.example",
        "evil.example",
        f"127.0.0.1:{admin_port}",
        "localhost:9901",
        "[::1]",
        "evil.example/v1/models/secret-model/infer",
    ):
        clean_upstream.reset()
        for path, status in (("/metrics", 200), ("/admin/v1/policy", 200), (f"/v1/models/{SECRET}/infer", 403)):
            method, body = ("GET", b"") if path.endswith("/infer") else ("POST", MODEL_BODY)
            framing = [JSON] if body else []
            data = request(
                method, path, [("Authorization", f"Bearer {TOKEN}"), ("Connection", "close"), *framing], body, host=host
            )
            responses, _ = exchange(port_of(gw), data)
            assert [r.status for r in responses] == [status], (host, path, responses[0].body[:200])
            # Proxied like any other path, never answered by the admin listener.
            assert b"gateway_requests_total" not in responses[0].body and b'"lists"' not in responses[0].body
        assert seen_paths(clean_upstream) == ["/metrics", "/admin/v1/policy"], host
        for seen in clean_upstream.seen:
            assert {k.lower(): v for k, v in seen.headers}["host"] == f"127.0.0.1:{clean_upstream.port}"


# --- case 15: the model decided on is the model served ---------------------------------------------------

# Each of these could reach the secret model on a server that normalises paths; each must be refused.
AMBIGUOUS_PATHS = [
    "//v1/models/secret-model/infer",
    "/v1//models/secret-model/infer",
    "/v1/models//secret-model/infer",
    "/v1/models/secret-model//infer",
    "/v1/models/secret-model/infer/",
    "/v1/models/secret-model/infer//",
    "/v1/models/open-model/../secret-model/infer",
    "/v1/models/open-model/infer/../../secret-model/infer",
    "/v1/models/./secret-model/infer",
    "/v1/models/open-model/%2e%2e/secret-model/infer",
    "/v1/models/open-model/%2E%2E/secret-model/infer",
    "/v1/models/open-model/.%2e/secret-model/infer",
    "/v1/models/%2e/secret-model/infer",
    "/v1/models/secret-model%2Finfer",
    "/v1/models/secret-model%2finfer",
    "/v1%2Fmodels%2Fsecret-model%2Finfer",
    "/v1/models/secret-model%5Cinfer",
    "/v1/models/%73ecret-model/infer",
    "/v1/models/secret%2Dmodel/infer",
    "/v1/models/secret-model%252Finfer",
    "/v1/models/%2573ecret-model/infer",
    "/V1/models/secret-model/infer",
    "/v1/MODELS/secret-model/infer",
    "/v1/models/secret-model/INFER",
    "/v1/models/secret-model;v=1/infer",
    "/v1/models/secret-model/infer;jsessionid=1",
    "/v1;x/models/secret-model/infer",
    "/v1/models/secret-model%3B/infer%3B",
    "/v1/models/secret-model%00/infer",
    "/v1/models/secret-model/infer%00",
    "/v1/models/secret-model/infer%00.json",
    "/v1/models/%FF/infer",
    # Percent-encoding anywhere in a model path: decoded by one server, taken literally by another.
    "/v1/models/secret-model%20/infer",
    "/v1/models/secret-model%C3%A9/infer",
    "/v1/models/a%2Bb/infer",
]


@pytest.mark.parametrize("path", AMBIGUOUS_PATHS)
def test_path_tricks_are_refused_never_guessed(gw: GatewayProcess, clean_upstream: Upstream, path: str) -> None:
    data = request(
        "POST", path + "?stream=false", [("Authorization", f"Bearer {TOKEN}"), ("Connection", "close")], b"{}"
    )
    responses, _ = exchange(port_of(gw), data)
    assert len(responses) == 1
    assert_contract_error(responses[0], 400, "invalid_request")
    assert clean_upstream.seen == []


def test_canonical_model_paths_are_decided_and_served_as_named(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    cases = [
        (f"/v1/models/{SECRET}/infer", 403, "not_released"),
        (f"/v1/models/{SECRET}/infer?model={OPEN}", 403, "not_released"),  # the query names nothing
        ("/v1/models/SECRET-MODEL/infer", 400, "ambiguous_request"),  # another spelling of a registered name
        (f"/v1/models/{OPEN}/infer", 200, ""),
        (f"/v1/models/{OPEN}/infer?x=%2F..%2F", 200, ""),
        ("/v1/models", 200, ""),
        ("/v1/models/", 200, ""),
        (f"/v1/files/{SECRET}%2Finfer", 200, ""),
        (f"/v1/other/{SECRET}/infer", 200, ""),
        (f"/v1/other/{SECRET}/infer", 400, "model_required"),
    ]
    for index, (path, status, code) in enumerate(cases):
        # Paths that name no model are sent with a body that does (the last case without: refused).
        body = b"{}" if ("/infer" in path and "/other/" not in path) or index == len(cases) - 1 else MODEL_BODY
        data = request("POST", path, [("Authorization", f"Bearer {TOKEN}"), ("Connection", "close"), JSON], body)
        responses, _ = exchange(port_of(gw), data)
        assert [r.status for r in responses] == [status], (path, responses[0].body[:200])
        if code:
            assert_contract_error(responses[0], status, code)
    # Forwarded exactly as sent: nothing is rewritten on the way.
    assert seen_paths(clean_upstream) == [
        f"/v1/models/{OPEN}/infer",
        f"/v1/models/{OPEN}/infer?x=%2F..%2F",
        "/v1/models",
        "/v1/models/",
        f"/v1/files/{SECRET}%2Finfer",
        f"/v1/other/{SECRET}/infer",
    ]


def test_path_and_body_naming_different_models_is_refused(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for body, status in ((json.dumps({"model": SECRET}).encode(), 400), (json.dumps({"model": OPEN}).encode(), 200)):
        data = request(
            "POST",
            f"/v1/models/{OPEN}/infer",
            [("Authorization", f"Bearer {TOKEN}"), ("Connection", "close"), JSON],
            body,
        )
        responses, _ = exchange(port_of(gw), data)
        assert [r.status for r in responses] == [status]
    assert len(clean_upstream.seen) == 1


def _post(
    gw: GatewayProcess, body: bytes, *, content_type: str | None = "application/json", token: str = TOKEN
) -> RawResponse:
    headers = [("Authorization", f"Bearer {token}"), ("Connection", "close")]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    responses, _ = exchange(port_of(gw), request("POST", "/v1/chat/completions", headers, body))
    assert len(responses) == 1
    return responses[0]


# Read two ways by different parsers: 400 ambiguous_request (docs/contract.md §4a).
AMBIGUOUS = {
    "duplicate_key",
    "duplicate_key_reversed",
    "duplicate_escaped_key",
    "duplicate_fully_escaped_key",
    "trailing_second_document",
    "other_case_key",
    "escaped_other_case_key",
    "only_other_case_key",
    "top_level_list",
}
JSON_TRICKS: dict[str, bytes] = {
    "other_case_key": b'{"model": "open-model", "MODEL": "secret-model"}',
    "escaped_other_case_key": b'{"model": "open-model", "MOD\\u0045L": "secret-model"}',
    "only_other_case_key": b'{"Model": "secret-model"}',
    "top_level_list": b'[{"model": "secret-model"}]',
    "duplicate_key": b'{"model": "open-model", "model": "secret-model"}',
    "duplicate_key_reversed": b'{"model": "secret-model", "model": "open-model"}',
    "duplicate_escaped_key": b'{"model": "open-model", "mod\\u0065l": "secret-model"}',
    "duplicate_fully_escaped_key": b'{"\\u006d\\u006f\\u0064\\u0065\\u006c": "secret-model", "model": "open-model"}',
    "model_number": b'{"model": 7}',
    "model_null": b'{"model": null}',
    "model_list": b'{"model": ["open-model", "secret-model"]}',
    "model_object": b'{"model": {"name": "secret-model"}}',
    "model_bool": b'{"model": true}',
    "model_empty": b'{"model": ""}',
    "utf8_bom": b'\xef\xbb\xbf{"model": "secret-model"}',
    "utf16_be": '{"model": "secret-model"}'.encode("utf-16-be"),
    "utf16_le_bom": '{"model": "secret-model"}'.encode("utf-16"),
    "utf32": '{"model": "secret-model"}'.encode("utf-32"),
    "trailing_second_document": b'{"model": "open-model"} {"model": "secret-model"}',
    "nan": b'{"model": "open-model", "x": NaN}',
    "invalid_utf8_in_model": b'{"model": "secret\xff-model"}',
    "lone_surrogate_model": b'{"model": "\\ud800"}',
    "deep_nesting_then_duplicate": b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b', "model": "open-model", '
    b'"model": "secret-model"}',
    "too_deep": b'{"a": ' + b"[" * 1500 + b"]" * 1500 + b', "model": "open-model"}',
}


@pytest.mark.parametrize("case", list(JSON_TRICKS))
def test_json_body_tricks_are_refused(gw: GatewayProcess, clean_upstream: Upstream, case: str) -> None:
    assert_contract_error(
        _post(gw, JSON_TRICKS[case]), 400, "ambiguous_request" if case in AMBIGUOUS else "invalid_request"
    )
    assert clean_upstream.seen == []


def test_model_only_in_a_nested_object_names_no_model(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for body in (
        b'{"input": {"model": "secret-model"}}',
        b'{"messages": [{"role": "user", "content": "\\"model\\": \\"secret-model\\""}]}',
    ):
        # A request that names no model is refused (row 3a), after rows 1-3: a denied country still hears so.
        assert_contract_error(_post(gw, body), 400, "model_required")
        assert_contract_error(_post(gw, body, token=IR_TOKEN), 451, "country_denied")
    assert clean_upstream.seen == []


def test_multipart_bodies_name_their_model_and_other_media_types_are_refused(
    gw: GatewayProcess, clean_upstream: Upstream
) -> None:
    boundary = "----FormBoundaryXyZ09"  # mixed case, as browsers make them
    multipart = "multipart/form-data; boundary=" + boundary

    def form(*parts: tuple[str, bytes]) -> bytes:
        out = b""
        for disposition, content in parts:
            head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n"
            out += head.encode() + content + b"\r\n"
        return out + f"--{boundary}--\r\n".encode()

    audio = ('name="file"; filename="a.wav"', b"RIFF....WAVEfmt ")
    assert_contract_error(
        _post(gw, form(('name="model"', SECRET.encode()), audio), content_type=multipart), 403, "not_released"
    )
    assert _post(gw, form(('name="model"', OPEN.encode()), audio), content_type=multipart).status == 200
    for refused, code in (
        (form(('name="model"', OPEN.encode()), ('name="model"', SECRET.encode())), "ambiguous_request"),
        (form(('name="Model"', SECRET.encode())), "ambiguous_request"),
        (form(('name="model"; filename="m.txt"', SECRET.encode())), "invalid_request"),
        (form(("name*=utf-8''model", SECRET.encode())), "invalid_request"),
        (form(('name="x"; name="model"', SECRET.encode())), "invalid_request"),
        (form(('name="model"', SECRET.encode()))[:-4], "invalid_request"),
    ):  # no closing delimiter
        assert_contract_error(_post(gw, refused, content_type=multipart), 400, code)
    # A URL-encoded form is not a media type the model is read from (docs/contract.md §4a): refused on a path
    # that needs a model, whatever it holds, as is a body with no media type or another one.
    for body, content_type in (
        (b"model=secret-model&x=1", "application/x-www-form-urlencoded"),
        (b"x=1&model=open-model", "application/x-www-form-urlencoded"),
        (b'{"model": "secret-model"}', None),
        (b'{"model": "secret-model"}', "text/plain"),
        (b'{"model": "open-model"}', "text/json"),
    ):
        assert_contract_error(_post(gw, body, content_type=content_type), 415, "unsupported_media_type")
    two_types = request(
        "POST",
        "/v1/chat/completions",
        [
            ("Authorization", f"Bearer {TOKEN}"),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ],
        b'{"model": "secret-model"}',
    )
    responses, _ = exchange(port_of(gw), two_types)
    assert_contract_error(responses[0], 400, "invalid_request")  # the HTTP parser refuses a second one
    assert len(clean_upstream.seen) == 1


# --- case 16: body limits, pipelining, tiny chunks, dribbled headers -------------------------------------


def test_chunked_body_over_the_limit_is_413_while_streaming(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for size in (1, 100):  # 1-byte chunks and 100-byte chunks, no Content-Length anywhere
        with RawConnection(port_of(gw)) as conn:
            conn.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
            body = chunked(b"x" * (MAX_BODY + 500), size)
            sent = 0
            try:
                for i in range(0, len(body), 8192):
                    conn.send(body[i : i + 8192])
                    sent += 1
            except OSError:
                pass  # the gateway may stop reading once it has answered
            response = conn.read_response()
            assert_contract_error(response, 413, "request_too_large")
    declared = HEAD + b"Content-Length: " + str(MAX_BODY + 1).encode() + b"\r\nConnection: close\r\n\r\n"
    responses, _ = exchange(port_of(gw), declared)  # refused before a byte of the body is read
    assert_contract_error(responses[0], 413, "request_too_large")
    assert clean_upstream.seen == []


def test_thousands_of_one_byte_chunks_arrive_whole(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    body = b'{"model": "open-model", "pad": "' + b"p" * 3000 + b'"}'
    data = HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(body, 1)
    with RawConnection(port_of(gw)) as conn:
        for i in range(0, len(data), 997):  # in odd-sized pieces, so chunks straddle segments
            conn.send(data[i : i + 997])
        response = conn.read_response()
    assert response.status == 200
    assert [seen.body for seen in clean_upstream.seen] == [body]


def test_pipelined_requests_are_all_answered_in_order(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    _pipeline(gw, clean_upstream, 2000)


def _pipeline(gw: GatewayProcess, upstream: Upstream, count: int) -> None:
    ids = [f"pipe-{i:05d}" for i in range(count)]
    with RawConnection(port_of(gw), timeout=120) as conn:
        data = b"".join(
            request("GET", f"/v1/models?i={i}", [("Authorization", f"Bearer {TOKEN}"), ("X-Request-Id", rid)])
            for i, rid in enumerate(ids)
        )
        conn.send(data)
        responses = conn.read_responses(count, timeout=120)
    assert [r.status for r in responses] == [200] * count
    assert [r.header("X-Request-Id") for r in responses] == ids
    assert [json.loads(r.body)["path"] for r in responses] == [f"/v1/models?i={i}" for i in range(count)]
    assert [s.raw_path for s in upstream.seen] == [f"/v1/models?i={i}" for i in range(count)]


def test_headers_dribbled_a_byte_at_a_time_are_still_served(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    data = request(
        "POST", f"/v1/models/{OPEN}/infer", [("Authorization", f"Bearer {TOKEN}"), ("Connection", "close"), JSON], b"{}"
    )
    head_end = data.index(b"\r\n\r\n") + 4
    pause = (HEADER_TIMEOUT_S * 0.6) / head_end  # the whole head within 60% of the timeout
    started = time.monotonic()
    with RawConnection(port_of(gw)) as conn:
        for i in range(head_end):
            conn.send(data[i : i + 1])
            time.sleep(pause)
        conn.send(data[head_end:])
        response = conn.read_response()
    assert response.status == 200, response.body[:200]
    assert time.monotonic() - started > HEADER_TIMEOUT_S * 0.5
    assert seen_paths(clean_upstream) == [f"/v1/models/{OPEN}/infer"]


def test_a_body_that_stalls_is_cut_after_the_read_timeout(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    with RawConnection(port_of(gw)) as conn:
        conn.send(HEAD + b'Content-Length: 100\r\n\r\n{"model":')
        started = time.monotonic()
        response = conn.read_response(timeout=HEADER_TIMEOUT_S + 3)
        assert_contract_error(response, 408, "request_timeout")
        assert HEADER_TIMEOUT_S * 0.9 <= time.monotonic() - started < HEADER_TIMEOUT_S + 2
    assert clean_upstream.seen == []


# --- case 17: slowloris ------------------------------------------------------------------------------------


async def test_slowloris_sockets_are_cut_while_others_are_served(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    await _slowloris(gw, sockets=300, byte_every_s=0.5, timeout_s=HEADER_TIMEOUT_S)


async def _slowloris(
    gw: GatewayProcess, *, sockets: int, byte_every_s: float, timeout_s: float, token: str = TOKEN
) -> None:
    port = port_of(gw)
    started = asyncio.get_running_loop().time()
    conns = await asyncio.gather(*(AsyncRawConnection.open(port) for _ in range(sockets)))
    opened = asyncio.get_running_loop().time()
    for conn in conns:
        await conn.send(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")

    async def dribble(conn: AsyncRawConnection) -> float | None:
        """Seconds until the gateway closed this socket, or None if it never did."""
        deadline = opened + timeout_s + 4 * max(1.0, byte_every_s)
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            if await conn.wait_closed_by_peer(byte_every_s):
                return loop.time() - started
            if not await conn.send(b"a"):
                if await conn.wait_closed_by_peer(1):
                    return loop.time() - started
        return None

    async def normal_callers() -> list[tuple[int, float]]:
        results = []
        async with aiohttp.ClientSession() as client:
            for _ in range(int(timeout_s / 0.2)):
                t0 = asyncio.get_running_loop().time()
                async with client.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {token}"}) as r:
                    await r.read()
                    results.append((r.status, asyncio.get_running_loop().time() - t0))
                await asyncio.sleep(0.2)
        return results

    closed_after, served = await asyncio.gather(asyncio.gather(*(dribble(c) for c in conns)), normal_callers())
    for conn in conns:
        conn.close()
    assert all(t is not None for t in closed_after), f"{sum(t is None for t in closed_after)} sockets left open"
    # Cut by the header timer: not before it, and not long after it (the timer runs from the connection's start).
    assert min(closed_after) >= timeout_s * 0.9, min(closed_after)  # type: ignore[type-var]
    assert max(closed_after) < (opened - started) + timeout_s + 2.5, max(closed_after)  # type: ignore[type-var]
    assert all(not c.parser.buffer for c in conns), "a half-sent request was answered"
    assert [status for status, _ in served] == [200] * len(served)
    assert max(latency for _, latency in served) < 1.0, served


def test_gateway_is_healthy_after_the_corpus(gw: GatewayProcess) -> None:
    """After everything above: no handler is stuck, and no error went unhandled (no 500 was ever made)."""
    with urllib.request.urlopen(gw.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    in_flight = [line for line in text.splitlines() if line.startswith("gateway_in_flight_requests ")]
    assert in_flight and float(in_flight[0].split()[1]) == 0.0
    assert "unhandled error" not in gw.log_path.read_text(errors="replace")
