"""The request-side findings of the second review, each reproduced through a running gateway.

Setting: ``frontier-x`` may be used from the US only (``allowed_countries: [US]``); the caller's token
says CN. Before the fixes, each of these requests reached the recording upstream naming ``frontier-x``
(or with headers the gateway vouches for spelled by the caller). Whatever the gateway answers now, the
assertion that matters is that the upstream never received ``frontier-x``; and a refusal is the
contract's JSON error, never a 5xx. 127.0.0.1 is a trusted proxy here, so ``X-Forwarded-For`` is read.
"""

from __future__ import annotations

import copy
import gzip
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import pytest

from gateway.redis_server import RedisServer

from .support.gateway_process import BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.rawhttp import RawConnection, RawResponse, exchange, request
from .support.tokens import hs_token
from .support.upstream import Seen, Upstream

RESTRICTED, OPEN = "frontier-x", "gpt-mock"
CN = hs_token("cn-caller", country="CN", tier="partner", org="acme")
US = hs_token("us-caller", country="US", tier="partner", org="acme")
CHAT = "/v1/chat/completions"
MAX_BODY = 65536
BODY_TIMEOUT_S = 2.0
GAP_TIMEOUT_S = 1.5


def findings_policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["models"][RESTRICTED] = {
        "stage": "general",
        "timeline": [],
        "allowed_countries": ["US"],
        "export_suspended": False,
    }
    document["lists"]["ip-ranges"] = {"198.51.100.0/24": {"reason": "test range", "source": "test", "country": "CN"}}
    return document


@pytest.fixture(scope="module")
def gw(upstream: Upstream) -> Iterator[GatewayProcess]:
    with RedisServer() as redis:
        seed_policy(redis.url, findings_policy())
        config = gateway_config(
            upstream.url,
            network={"trusted_proxies": ["127.0.0.1/32"]},
            limits={
                "max_body_bytes": MAX_BODY,
                "body_read_timeout_s": BODY_TIMEOUT_S,
                "header_read_timeout_s": GAP_TIMEOUT_S,
            },
        )
        gateway = GatewayProcess(config, redis_url=redis.url)
        gateway.start()
        try:
            yield gateway
        finally:
            gateway.stop()


def send(
    gw: GatewayProcess,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    method: str = "POST",
    path: str = CHAT,
    token: str = CN,
) -> RawResponse:
    data = request(
        method, path, [("Authorization", f"Bearer {token}"), ("Connection", "close"), *(headers or [])], body
    )
    responses, _ = exchange(int(gw.config["listen"]["port"]), data)
    assert len(responses) == 1, responses
    return responses[0]


def refused(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, (response.status, response.body[:300])
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (code, "invalid_request_error"), error
    assert error["request_id"] == response.header("X-Request-Id")
    assert response.header("X-Gateway-Reason") == code


def never_served_restricted(upstream: Upstream) -> None:
    """The bypass question: did the upstream receive the restricted model in any way it could read it?"""
    for seen in upstream.seen:
        assert RESTRICTED.encode() not in seen.body.lower(), seen
        assert RESTRICTED.encode() not in _maybe_decompressed(seen.body), seen
        assert RESTRICTED not in seen.raw_path, seen


def _maybe_decompressed(body: bytes) -> bytes:
    for decode in (gzip.decompress, zlib.decompress, brotli.decompress):
        try:
            return _maybe_decompressed(decode(body))
        except Exception:  # not that coding
            continue
    return body


def header_values(seen: Seen, name: str) -> list[str]:
    """Values of ``name`` as an upstream that folds case and "_" would see them."""
    key = name.lower().replace("_", "-")
    return [v for k, v in seen.headers if k.lower().replace("_", "-") == key]


def chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


JSON = ("Content-Type", "application/json")


def test_the_setting_blocks_cn_and_serves_us(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    response = send(gw, chat(RESTRICTED), [JSON])
    assert (response.status, response.json()["error"]["code"]) == (451, "export_restricted")
    assert send(gw, chat(OPEN), [JSON]).status == 200
    assert send(gw, chat(RESTRICTED), [JSON], token=US).status == 200
    assert [json.loads(s.body)["model"] for s in clean_upstream.seen] == [OPEN, RESTRICTED]


# --- 1: a JSON body under another media type ---------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        None,
        "text/plain",
        "application/x-www-form-urlencoded; charset=utf-8",
        "text/json",
        "application/octet-stream",
    ],
)
def test_1_a_json_body_labelled_otherwise_is_415(
    gw: GatewayProcess, clean_upstream: Upstream, content_type: str | None
) -> None:
    """``curl -d`` labels JSON as a form: it used to be read as a form, name no model, and be served."""
    headers = [("Content-Type", content_type)] if content_type else []
    for body in (
        chat(RESTRICTED),
        # A decoy form field inside a JSON string made the audit record gpt-mock.
        b'{"model": "frontier-x", "messages": [{"role": "user", "content": "&model=gpt-mock&"}]}',
    ):
        refused(send(gw, body, headers), 415, "unsupported_media_type")
    never_served_restricted(clean_upstream)
    assert clean_upstream.seen == []


# --- 2 and 4: content codings ---------------------------------------------------------------------------


def test_2_a_body_compressed_twice_under_one_coding_is_415(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress)):
        for inner in (gzip.compress, zlib.compress):
            refused(
                send(gw, compress(inner(chat(RESTRICTED))), [JSON, ("Content-Encoding", coding)]),
                415,
                "unsupported_media_type",
            )
    never_served_restricted(clean_upstream)
    assert clean_upstream.seen == []


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-15)),
        ("br", brotli.compress),
        ("identity", lambda b: b),
    ],
)
def test_2_a_single_coding_is_decided_decoded_and_forwarded_decoded(
    gw: GatewayProcess, clean_upstream: Upstream, coding: str, compress: Any
) -> None:
    response = send(gw, compress(chat(RESTRICTED)), [JSON, ("Content-Encoding", coding)])
    assert (response.status, response.json()["error"]["code"]) == (451, "export_restricted")
    assert send(gw, compress(chat(OPEN)), [JSON, ("Content-Encoding", coding)]).status == 200
    [seen] = clean_upstream.seen
    # The upstream reads exactly what was decided on: the decoded body, no Content-Encoding, its own length.
    assert seen.body == chat(OPEN)
    assert header_values(seen, "Content-Encoding") == []
    assert header_values(seen, "Content-Length") == [str(len(chat(OPEN)))]


def test_2_a_compression_bomb_is_413(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    bomb = b'{"model": "gpt-mock", "pad": "' + b"a" * (MAX_BODY * 4) + b'"}'
    for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress)):
        refused_body = compress(bomb)
        assert len(refused_body) < MAX_BODY
        response = send(gw, refused_body, [JSON, ("Content-Encoding", coding)])
        assert (response.status, response.json()["error"]["code"]) == (413, "request_too_large")
    assert clean_upstream.seen == []


@pytest.mark.parametrize(
    "codings",
    [
        ["x-gzip"],
        ["gzip, identity"],
        ["gzip, gzip"],
        ["gzip", "gzip"],
        ["gzip", "identity"],
        ["zstd"],
        ["compress"],
        ["identity, gzip"],
        [""],
        ["gzip;q=1"],
        ["x-deflate"],
    ],
)
def test_4_other_or_stacked_codings_are_415(gw: GatewayProcess, clean_upstream: Upstream, codings: list[str]) -> None:
    """These were forwarded undecoded, with no model decision, for the upstream to decode."""
    body = gzip.compress(chat(RESTRICTED)) if codings != [""] else chat(RESTRICTED)
    if codings == ["gzip, gzip"] or codings == ["gzip", "gzip"]:
        body = gzip.compress(body)
    refused(send(gw, body, [JSON, *(("Content-Encoding", c) for c in codings)]), 415, "unsupported_media_type")
    never_served_restricted(clean_upstream)
    assert clean_upstream.seen == []


# --- 3: the model key in another letter case -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-mock", "MODEL": "frontier-x"}',
        b'{"model": "gpt-mock", "Model": "frontier-x"}',
        b'{"model": "gpt-mock", "moDel": "frontier-x"}',
        b'{"MODEL": "frontier-x", "model": "gpt-mock"}',
        b'{"model": "gpt-mock", "MOD\\u0045L": "frontier-x"}',
        b'{"model": "gpt-mock", "mod\\u0065l": "frontier-x"}',
        b'{"Model": "frontier-x"}',
        b'{"model": "gpt-mock", "model": "frontier-x"}',
        b'[{"model": "frontier-x"}]',
        b'{"model": "gpt-mock"} {"model": "frontier-x"}',
    ],
)
def test_3_a_model_key_read_two_ways_is_ambiguous(gw: GatewayProcess, clean_upstream: Upstream, body: bytes) -> None:
    """Case-insensitive decoders (Go's encoding/json) read MODEL as model: decided gpt-mock, served frontier-x."""
    refused(send(gw, body, [JSON]), 400, "ambiguous_request")
    assert clean_upstream.seen == []


def test_3_multipart_with_two_model_fields_is_ambiguous(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    boundary = "b0undary"
    for names in (("model", "model"), ("model", "Model"), ("MODEL",)):
        body = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + (OPEN if i == 0 else RESTRICTED).encode()
            + b"\r\n"
            for i, name in enumerate(names)
        )
        body += f"--{boundary}--\r\n".encode()
        refused(
            send(gw, body, [("Content-Type", f"multipart/form-data; boundary={boundary}")]), 400, "ambiguous_request"
        )
    assert clean_upstream.seen == []


# --- 6: headers the gateway sets or vouches for ------------------------------------------------------------


def test_6_caller_spellings_of_vouched_headers_never_reach_the_upstream(
    gw: GatewayProcess, clean_upstream: Upstream
) -> None:
    spoofed = [
        ("X_Gateway_Subject", "admin"),
        ("X_Gateway_Tier", "internal"),
        ("x-gateway-org", "evil"),
        ("X-GATEWAY-TIER", "internal"),
        ("X_GATEWAY_ORG", "evil"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Real_IP", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X_Original_URL", "/admin"),
        ("Content_Type", "text/plain"),
        ("X-Kept", "kept"),
    ]
    assert send(gw, chat(OPEN), [JSON, *spoofed]).status == 200
    [seen] = clean_upstream.seen
    for name, value in spoofed:
        if name != "X-Kept":
            assert value not in header_values(seen, name), (name, seen.headers)
    # The gateway's own, each exactly once however an upstream folds the names.
    assert header_values(seen, "X-Gateway-Subject") == ["cn-caller"]
    assert header_values(seen, "X-Gateway-Org") == ["acme"]
    assert header_values(seen, "X-Gateway-Tier") == ["partner"]
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "Content-Type") == ["application/json"]
    for name in ("Forwarded", "X-Real-IP", "X-Forwarded-Host", "X-Original-URL", "X-Rewrite-URL"):
        assert header_values(seen, name) == [], name
    assert header_values(seen, "X-Kept") == ["kept"]


# --- 8: a body that trickles --------------------------------------------------------------------------------


def test_8_a_trickled_body_is_cut_at_the_total_deadline(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    """A byte every 0.25 s never trips the gap timer (1.5 s); the whole body gets 2 s, then 408."""
    body = chat(RESTRICTED)
    head = request("POST", CHAT, [("Authorization", f"Bearer {US}"), JSON], body)[: -len(body)]
    with RawConnection(int(gw.config["listen"]["port"])) as conn:
        conn.send(head)
        started = time.monotonic()
        sent = 0
        response: RawResponse | None = None
        while sent < len(body) and time.monotonic() - started < BODY_TIMEOUT_S + 3:
            try:
                conn.send(body[sent : sent + 1])
            except OSError:
                break  # closed after its answer
            sent += 1
            try:
                response = conn.read_response(timeout=0.25)
                break
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
    assert response is not None and sent < len(body)
    refused(response, 408, "request_timeout")
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 1.5, elapsed
    assert clean_upstream.seen == []


# --- 9: an unreadable X-Forwarded-For hop behind a trusted proxy ------------------------------------------


@pytest.mark.parametrize("hop", ["garbage", "198.51.100.007", "3325256711", "198.51.100.7:443", "[198.51.100.7]"])
def test_9_an_unreadable_rightmost_hop_is_400(gw: GatewayProcess, clean_upstream: Upstream, hop: str) -> None:
    """It used to fall back to the proxy's own address (loopback: no country), so a caller in CN (by its
    address) holding a US token was served frontier-x."""
    blocked = send(gw, chat(RESTRICTED), [JSON, ("X-Forwarded-For", "198.51.100.7")], token=US)
    assert (blocked.status, blocked.json()["error"]["code"]) == (451, "export_restricted")
    for xff in (hop, f"198.51.100.7, {hop}"):
        response = send(gw, chat(RESTRICTED), [JSON, ("X-Forwarded-For", xff)], token=US)
        refused(response, 400, "invalid_request")
        assert hop.encode() not in response.body
    assert clean_upstream.seen == []


# --- 10: TRACE and CONNECT ----------------------------------------------------------------------------------


def test_10_trace_and_connect_are_405(gw: GatewayProcess, clean_upstream: Upstream) -> None:
    for method, target in (("TRACE", CHAT), ("TRACE", "/"), ("CONNECT", "upstream.example:443")):
        response = send(gw, method=method, path=target)
        refused(response, 405, "method_not_allowed")
        assert CN.encode() not in response.body  # nothing echoed, the credential least of all
    assert clean_upstream.seen == []


# --- model names --------------------------------------------------------------------------------------------


def test_model_names_over_256_bytes_or_with_controls_are_400_and_never_echoed(
    gw: GatewayProcess, clean_upstream: Upstream
) -> None:
    long_name = RESTRICTED + "-" + "x" * 5000
    for model in (long_name, "é" * 129, RESTRICTED + "\n", RESTRICTED + "\x00", "gpt-mock\x1b[31m", "a\u0085b"):
        response = send(gw, chat(model), [JSON])
        refused(response, 400, "invalid_request")
        assert b"x" * 257 not in response.body
        assert len(response.body) < 600
    # At the bound: 256 bytes is a name (unknown here, so 403), and the answer echoes at most 256 bytes of it.
    at_bound = "m" * 256
    response = send(gw, chat(at_bound), [JSON])
    assert (response.status, response.json()["error"]["code"]) == (403, "model_unknown")
    assert b"m" * 257 not in response.body
    assert clean_upstream.seen == []


# --- the model value in another spelling -----------------------------------------------------------------


def test_another_spelling_of_a_registered_model_is_refused_even_when_unknown_models_pass(
    upstream: Upstream, clean_upstream: Upstream
) -> None:
    """With ``unknown_model: allow``, ``FRONTIER-X`` was an unregistered model and passed, though a model
    server that folds case or white space serves ``frontier-x`` for it."""
    with RedisServer() as redis:
        seed_policy(redis.url, findings_policy())
        config = gateway_config(upstream.url, policy={"unknown_model": "allow"})
        gateway = GatewayProcess(config, redis_url=redis.url)
        gateway.start()
        try:
            for spelling in ("FRONTIER-X", "Frontier-X", " frontier-x", "frontier-x ", "\uff46rontier-x"):
                refused(send(gateway, chat(spelling), [JSON]), 400, "ambiguous_request")
            assert send(gateway, chat("some-unregistered-model"), [JSON]).status == 200
        finally:
            gateway.stop()
    never_served_restricted(clean_upstream)
    assert not any(RESTRICTED in json.loads(seen.body)["model"].casefold().strip() for seen in clean_upstream.seen)
