"""Structured logs: JSON lines, request ids, the access log, the level, and no secret ever written."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.logs import JsonFormatter, bind_request, redact, subject_hash

from .support.gateway_process import ADMIN_TOKEN, GatewayProcess, gateway_config, seed_policy
from .support.tokens import HS_SECRET, hs_token
from .support.upstream import Upstream


def log_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """Every line the process wrote; each must be one JSON object."""
    lines = [line for line in gateway.log_path.read_text().splitlines() if line.strip()]
    entries = [orjson.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    return entries


async def test_access_log_and_no_secrets_in_a_debug_log(redis_url: str, upstream: Upstream) -> None:
    seed_policy(redis_url)
    config = gateway_config(upstream.url, logging={"level": "debug", "format": "json", "access_log": True})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    token = hs_token("alice")
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    fake_key = "gk_" + "Zq9" * 12
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    wrong_admin = "wrong-admin-token-0123456789"
    answered: list[tuple[str, int, str | None]] = []  # (request id, status, subject)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(
                gateway.admin_url + "/admin/v1/api-keys",
                headers=admin,
                json={"subject": "svc-1", "org": "acme", "country": "US", "tier": "partner"},
            ) as r:
                assert r.status in (200, 201), await r.text()
                api_key = (await r.json())["key"]
            async with client.get(gateway.admin_url + "/admin/v1/policy", headers=admin) as r:
                assert r.status == 200
            async with client.get(
                gateway.admin_url + "/admin/v1/policy", headers={"Authorization": f"Bearer {wrong_admin}"}
            ) as r:
                assert r.status == 401
            public = [
                (token, "alice", 200),
                (forged, None, 401),
                (fake_key, None, 401),
                (ADMIN_TOKEN, None, 401),
                (api_key, "svc-1", 200),
            ]
            for credential, subject, status in public:
                async with client.post(
                    gateway.url + "/v1/chat/completions?api_key=query-secret-123",
                    json={"model": "gpt-mock"},
                    headers={"Authorization": f"Bearer {credential}"},
                ) as r:
                    assert r.status == status, await r.text()
                    await r.read()
                    answered.append((r.headers["X-Request-Id"], status, subject))
        await asyncio.sleep(0.2)
    finally:
        gateway.stop()
    text = gateway.log_path.read_text()
    entries = log_lines(gateway)
    for secret in (
        token,
        token.rsplit(".", 1)[1],
        forged,
        fake_key,
        api_key,
        ADMIN_TOKEN,
        wrong_admin,
        HS_SECRET,
        "query-secret-123",
    ):
        assert secret not in text, f"a secret reached the log: {secret[:12]}..."

    access = [entry for entry in entries if entry["logger"] == "gateway.access"]
    assert [(a["request_id"], a["status"]) for a in access] == [(rid, status) for rid, status, _s in answered]
    for line, (_rid, status, subject) in zip(access, answered, strict=True):
        assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
        assert line["decision"] == ("allow" if status == 200 else "block")
        assert line["code"] == ("" if status == 200 else "unauthenticated")
        assert line["duration_ms"] > 0
        expected = hashlib.sha256(subject.encode()).hexdigest()[:16] if subject else None
        assert line["subject_hash"] == expected
        assert "subject" not in line
    assert any(entry["message"] == "gateway listening" for entry in entries)  # info passes at debug


async def test_level_error_writes_no_info_and_no_access_lines(redis_url: str, upstream: Upstream) -> None:
    seed_policy(redis_url)
    config = gateway_config(upstream.url, logging={"level": "error", "format": "json", "access_log": False})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {hs_token()}"}) as r,
        ):
            assert r.status == 200
    finally:
        gateway.stop()
    entries = log_lines(gateway)
    assert all(entry["level"] in ("error", "critical") for entry in entries), entries


async def test_request_id_on_every_line_logged_while_handling_a_request() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def handle(request_id: str) -> None:  # each aiohttp request runs in a task like this one
        bind_request(request_id, "POST", "/v1/x")
        await asyncio.sleep(0)
        logger.warning("upstream slow", extra={"upstream_ms": 12})

    try:
        await asyncio.gather(asyncio.create_task(handle("req-a")), asyncio.create_task(handle("req-b")))
        logger.info("not a request")
    finally:
        logger.removeHandler(handler)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted(line.get("request_id") for line in lines[:2]) == ["req-a", "req-b"]
    assert lines[0]["upstream_ms"] == 12 and lines[0]["level"] == "warning"
    assert "request_id" not in lines[2]


@pytest.mark.parametrize(
    "leak",
    [
        "Authorization: Bearer sk-abcdef0123456789",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl in a message",
        "key=gk_AbCdEf0123456789xyz",
    ],
)
def test_credential_shapes_are_masked_as_a_second_line_of_defence(leak: str) -> None:
    masked = redact(leak)
    assert "[redacted]" in masked
    for part in ("sk-abcdef0123456789", "c2lnbmF0dXJl", "gk_AbCdEf0123456789xyz"):
        assert part not in masked


def test_subject_hash_is_stable_and_not_the_subject() -> None:
    assert subject_hash("alice") == subject_hash("alice") != "alice"
    assert subject_hash("alice") != subject_hash("bob")
    assert subject_hash(None) is None
