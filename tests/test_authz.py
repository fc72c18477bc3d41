"""The decision service (docs/contract.md §15): Envoy ext_authz, nginx auth_request and Caddy forward_auth
ask a real gateway process's ``authz`` listener; real nginx and Caddy stand in front of the recording
model server. Each decision is the public path's (status, ``X-Gateway-Reason``, body), audited with
``"via": "authz"`` and counted in the same metrics.

Envoy itself is not run: its requests are replayed from fixtures written to the shape Envoy's
documentation gives for the HTTP authorization service (``path_prefix`` before the original path,
the original method and headers, the body with ``with_request_body``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from gateway.authz import read_usage_key, usage_key
from gateway.redis_server import RedisServer, free_port
from gateway.settings import ConfigError, parse_settings

from .support.dataplanes import running_caddy, running_nginx
from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, GatewayProcess, gateway_config, running_gateway
from .support.gateway_process import seed_policy as seed
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

TIERS: dict[str, Any] = {
    "public": {"requests_per_minute": 6000, "burst": 1000, "stages": ["general"]},
    "partner": {"requests_per_minute": 6000, "burst": 1000, "stages": ["partners", "general"]},
    "tight": {"requests_per_minute": 1, "burst": 1, "stages": ["general"], "blocked_per_minute": 1000},
    "metered": {"requests_per_minute": 6000, "burst": 1000, "tokens_per_minute": 100, "stages": ["general"]},
}
POLICY: dict[str, Any] = {
    "lists": BASE_POLICY["lists"],
    "models": {
        **BASE_POLICY["models"],
        "held-back": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": True},
    },
}
# Azure-style paths name the model, for data planes that send no body.
PATH_PATTERN = r"^/openai/deployments/(?P<model>[^/]+)/"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
UNKNOWN_KEY = "gk_" + "A1b2" * 10


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, redis: RedisServer) -> Iterator[GatewayProcess]:
    seed(redis.url, POLICY)
    config = gateway_config(
        upstream.url,
        tiers=TIERS,
        policy={"max_staleness_s": 3, "poll_interval_s": 0.1, "model_path_pattern": PATH_PATTERN},
        authz={"host": "127.0.0.1", "port": free_port(), "model_header": "X-Gateway-Model"},
    )
    with running_gateway(config, redis_url=redis.url) as process:
        yield process


def authz_url(gateway: GatewayProcess) -> str:
    return f"http://127.0.0.1:{gateway.config['authz']['port']}"


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


async def audit_records(gateway: GatewayProcess, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The audit records of ``request_ids``, once all are there."""
    found: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession(headers=auth(ADMIN_TOKEN)) as admin:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            async with admin.get(gateway.admin_url + "/admin/v1/audit?limit=500") as response:
                for record in (await response.json())["records"]:
                    if record["request_id"] in request_ids:
                        found[record["request_id"]] = record
            if set(found) == request_ids:
                return found
            await asyncio.sleep(0.05)
    raise AssertionError(f"no audit record for {request_ids - set(found)}")


# --- Envoy: ext_authz http_service, replayed from the documented request shape --------------------------


def envoy_check(
    token: str | None,
    *,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    body: dict[str, Any] | None = None,
    client: str = "198.51.100.7",
    request_id: str | None = None,
    partial: bool = False,
) -> tuple[str, str, dict[str, str], bytes]:
    """One check request as Envoy's HTTP authorization client sends it with ``path_prefix: /authz/envoy``,
    ``with_request_body`` and ``allowed_headers`` matching authorization, content-type, x-forwarded-for
    and x-request-id: the original method, the prefix before the original path, the original host in
    Host, the caller's allowed headers, and the buffered body with its length."""
    raw = orjson.dumps(body) if body is not None else b""
    headers = {
        "Host": "models.example.com",
        "Content-Type": "application/json",
        "Content-Length": str(len(raw)),
        "X-Forwarded-For": client,
        "X-Request-Id": request_id or _unique("envoy"),
        "X-Envoy-Expected-Rq-Timeout-Ms": "250",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if partial:
        headers["x-envoy-auth-partial-body"] = "true"
    return method, "/authz/envoy" + path, headers, raw


class Answer(NamedTuple):
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def ask(gateway: GatewayProcess, check: tuple[str, str, dict[str, str], bytes]) -> Answer:
    method, path, headers, body = check
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, authz_url(gateway) + path, headers=headers, data=body) as response,
    ):
        return Answer(response.status, response.headers, await response.read())


async def test_envoy_allowed_check_answers_200_with_identity_and_rate_headers(gateway: GatewayProcess) -> None:
    token = hs_token("env-ok", org="acme", tier="public", country="US")
    response = await ask(gateway, envoy_check(token, body={"model": "gpt-mock", **CHAT}, request_id="envoy-ok-1"))
    assert response.status == 200
    headers = response.headers
    assert (headers["X-Gateway-Subject"], headers["X-Gateway-Org"], headers["X-Gateway-Tier"]) == (
        "env-ok",
        "acme",
        "public",
    )
    assert headers["X-Request-Id"] == "envoy-ok-1"  # Envoy's own request id is kept
    assert headers["x-ratelimit-limit-requests"] == "6000" and "RateLimit" in headers
    assert "X-Gateway-Usage-Key" not in headers  # the public tier here has no token budget
    record = (await audit_records(gateway, {"envoy-ok-1"}))["envoy-ok-1"]
    assert record["via"] == "authz" and record["decision"] == "allow" and record["status"] == 200
    assert record["model"] == "gpt-mock" and record["client_ip"] == "198.51.100.7"
    assert record["upstream_status"] is None


@pytest.mark.parametrize(
    ("token", "body", "status", "code"),
    [
        (hs_token("env-ir", country="IR", tier="public"), {"model": "gpt-mock"}, 451, "country_denied"),
        (hs_token("env-held", country="DE", tier="public"), {"model": "held-back"}, 451, "export_suspended"),
        (UNKNOWN_KEY, {"model": "gpt-mock"}, 401, "unauthenticated"),
        (hs_token("env-none", tier="public"), {"messages": []}, 400, "model_required"),
        (hs_token("env-twice", tier="public"), {"model": "gpt-mock", "MODEL": "held-back"}, 400, "ambiguous_request"),
    ],
)
async def test_envoy_refusal_is_the_contract_answer_envoy_passes_on(
    gateway: GatewayProcess, token: str, body: dict[str, Any], status: int, code: str
) -> None:
    request_id = _unique("envoy-no")
    response = await ask(gateway, envoy_check(token, body={**body, **CHAT}, request_id=request_id))
    assert response.status == status
    assert response.headers["X-Gateway-Reason"] == code
    assert response.headers["X-Request-Id"] == request_id
    error = orjson.loads(response.body)["error"]
    assert error["code"] == code and error["request_id"] == request_id
    record = (await audit_records(gateway, {request_id}))[request_id]
    assert (record["via"], record["code"], record["status"]) == ("authz", code, status)


async def test_envoy_partial_body_is_refused_not_guessed(gateway: GatewayProcess) -> None:
    token = hs_token("env-part", tier="public")
    response = await ask(gateway, envoy_check(token, body={"model": "gpt-mock"}, partial=True))
    assert response.status == 413 and response.headers["X-Gateway-Reason"] == "request_too_large"


async def test_envoy_body_and_model_header_that_differ_are_refused(gateway: GatewayProcess) -> None:
    method, path, headers, body = envoy_check(hs_token("env-hdr", tier="public"), body={"model": "gpt-mock"})
    response = await ask(gateway, (method, path, {**headers, "X-Gateway-Model": "held-back"}, body))
    assert response.status == 400 and response.headers["X-Gateway-Reason"] == "invalid_request"


# --- nginx and Caddy protocols, asked directly -----------------------------------------------------------


async def test_nginx_refusal_travels_as_403_with_its_status_and_body_in_headers(gateway: GatewayProcess) -> None:
    request_id = _unique("nginx-direct")
    headers = {
        **auth(hs_token("ngx-ir", country="IR", tier="public")),
        "X-Original-Method": "POST",
        "X-Original-URI": "/openai/deployments/gpt-mock/chat/completions?api-version=1",
        "X-Forwarded-For": "203.0.113.9",
        "X-Request-Id": request_id,
    }
    url = authz_url(gateway) + "/authz/nginx"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        body = await r.read()
    assert r.status == 403  # all nginx passes on from auth_request
    assert r.headers["X-Gateway-Status"] == "451" and r.headers["X-Gateway-Reason"] == "country_denied"
    assert json.loads(r.headers["X-Gateway-Error"]) == orjson.loads(body)
    assert orjson.loads(body)["error"]["code"] == "country_denied"
    record = (await audit_records(gateway, {request_id}))[request_id]
    assert record["status"] == 451 and record["client_ip"] == "203.0.113.9" and record["model"] == "gpt-mock"


async def test_a_data_plane_that_omits_the_original_request_is_told_so(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(authz_url(gateway) + "/authz/caddy", headers=auth(hs_token())) as r:
            assert r.status == 400
            assert "X-Forwarded-Method" in orjson.loads(await r.read())["error"]["message"]
        async with session.get(authz_url(gateway) + "/elsewhere") as r:
            assert r.status == 404 and r.headers["X-Gateway-Reason"] == "not_found"


# --- token budgets: the usage callback ---------------------------------------------------------------------


async def test_usage_callback_spends_the_callers_token_budget(gateway: GatewayProcess) -> None:
    token = hs_token(_unique("metered"), tier="metered")
    first = await ask(gateway, envoy_check(token, body={"model": "gpt-mock"}))
    assert first.status == 200
    key = first.headers["X-Gateway-Usage-Key"]
    assert read_usage_key(key)[1:] == ("metered", "gpt-mock")
    async with aiohttp.ClientSession() as session:
        report = {"usage_key": key, "usage": {"prompt_tokens": 40, "completion_tokens": 60, "total_tokens": 100}}
        async with session.post(authz_url(gateway) + "/authz/usage", json=report) as r:
            assert r.status == 200 and (await r.json()) == {"charged": 100}
        for bad, field in (
            ({"usage_key": key, "tokens": -1}, "tokens"),
            ({"usage_key": "not-a-key", "tokens": 1}, "usage_key"),
            ({"usage_key": usage_key("s", "no-such-tier", None), "tokens": 1}, "usage_key"),
            ({"tokens": 1}, "usage_key"),
        ):
            async with session.post(authz_url(gateway) + "/authz/usage", json=bad) as r:
                assert r.status == 400, bad
                assert orjson.loads(await r.read())["error"]["message"].startswith(field)
    second = await ask(gateway, envoy_check(token, body={"model": "gpt-mock"}))
    assert second.status == 429 and second.headers["X-Gateway-Reason"] == "token_rate_limited"
    assert int(second.headers["Retry-After"]) >= 1


async def test_authz_decisions_are_in_the_request_metrics(gateway: GatewayProcess) -> None:
    def count(text: str) -> float:
        wanted = 'gateway_requests_total{code="country_denied",decision="block",model="gpt-mock",tier="public"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))

    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.admin_url + "/metrics") as r:
            before = count(await r.text())
        await ask(gateway, envoy_check(hs_token("env-m", country="IR", tier="public"), body={"model": "gpt-mock"}))
        async with session.get(gateway.admin_url + "/metrics") as r:
            assert count(await r.text()) == before + 1


# --- configuration and freshness ---------------------------------------------------------------------------


def test_authz_is_off_unless_configured_and_its_errors_name_the_key() -> None:
    assert parse_settings({"upstream": {"url": "http://m"}}, environ={}).authz is None
    on = parse_settings({"upstream": {"url": "http://m"}}, environ={"GATEWAY_AUTHZ__PORT": "9911"})
    assert on.authz is not None and (on.authz.host, on.authz.port) == ("127.0.0.1", 9911)
    for section, key in (({"port": "x"}, "authz.port"), ({"model_header": "X Model"}, "authz.model_header")):
        with pytest.raises(ConfigError, match=key):
            parse_settings({"upstream": {"url": "http://m"}, "authz": section}, environ={})
    with pytest.raises(ConfigError, match=r"authz\.colour: unknown key"):
        parse_settings({"upstream": {"url": "http://m"}, "authz": {"colour": 1}}, environ={})


async def test_without_a_confirmed_policy_the_decision_service_admits_no_one(upstream: Upstream) -> None:
    config = gateway_config(upstream.url, authz={"port": free_port()})
    with RedisServer() as empty, running_gateway(config, redis_url=empty.url, wait_ready=False) as process:
        response = await ask(process, envoy_check(hs_token(tier="public"), body={"model": "gpt-mock"}))
    assert response.status == 503 and response.headers["X-Gateway-Reason"] == "policy_stale"


# --- real data planes -------------------------------------------------------------------------------------


async def through_data_plane(
    gateway: GatewayProcess, port: int, upstream: Upstream, *, header: str = "X-Forwarded-For"
) -> None:
    """Every acceptance case through the data plane on ``port``: the caller gets the contract's answer and
    the audit trail the decision."""
    base = f"http://127.0.0.1:{port}"
    path = "/openai/deployments/{}/chat/completions?api-version=2024-06-01"
    ids: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:

        async def call(name: str, token: str, model: str = "gpt-mock", **extra: str) -> Answer:
            ids[name] = _unique(name)
            headers = {"Authorization": f"Bearer {token}", "X-Request-Id": ids[name], **extra}
            async with session.post(base + path.format(model), json=CHAT, headers=headers) as response:
                return Answer(response.status, response.headers, await response.read())

        upstream.reset()
        allowed = await call("allowed", hs_token("dp-ok", tier="public", country="US"), **{"X-Gateway-Subject": "eve"})
        assert allowed.status == 200, allowed.body
        assert allowed.headers["X-Upstream"] == "yes"  # it reached the model server
        assert allowed.headers["x-ratelimit-limit-requests"] == "6000" and "RateLimit-Policy" in allowed.headers
        seen = dict((k.lower(), v) for k, v in upstream.seen[-1].headers)
        assert seen.get("x-gateway-subject") == "dp-ok", seen  # the gateway's word, never the caller's
        assert seen["x-gateway-tier"] == "public" and seen["x-request-id"] == ids["allowed"]
        assert upstream.seen[-1].raw_path == path.format("gpt-mock")
        assert "ratelimit" not in seen and "x-ratelimit-limit-requests" not in seen  # the caller's, not upstream's

        refused = {
            "country": (hs_token("dp-ir", tier="public", country="IR"), "gpt-mock", 451, "country_denied"),
            "suspended": (hs_token("dp-held", tier="public", country="DE"), "held-back", 451, "export_suspended"),
            "unknown-key": (UNKNOWN_KEY, "gpt-mock", 401, "unauthenticated"),
        }
        before = len(upstream.seen)
        for name, (token, model, status, code) in refused.items():
            response = await call(name, token, model)
            assert response.status == status, name
            assert response.headers["X-Gateway-Reason"] == code, name
            error = orjson.loads(response.body)["error"]
            assert error["code"] == code and error["request_id"] == ids[name], name
            assert response.headers["X-Request-Id"] == ids[name], name
            assert response.headers["X-Gateway-Policy-Version"] != "0", name
            if status == 401:
                assert response.headers.getall("WWW-Authenticate") == ['Bearer error="invalid_token"']
        tight = hs_token(_unique("dp-tight"), tier="tight")
        assert (await call("tight-first", tight)).status == 200
        limited = await call("limited", tight)
        assert limited.status == 429 and limited.headers["X-Gateway-Reason"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert orjson.loads(limited.body)["error"]["code"] == "rate_limited"
        assert len(upstream.seen) == before + 1  # only the tight caller's first request reached it

    records = await audit_records(gateway, set(ids.values()))
    expected = {"allowed": 200, "country": 451, "suspended": 451, "unknown-key": 401, "limited": 429}
    for name, status in expected.items():
        record = records[ids[name]]
        assert (record["via"], record["status"]) == ("authz", status), name
        assert record["client_ip"] == "127.0.0.1", name  # the caller as the data plane saw it
    assert records[ids["allowed"]]["decision"] == "allow"
    assert records[ids["suspended"]]["model"] == "held-back"


async def test_nginx_auth_request_in_front_of_the_model_server(gateway: GatewayProcess, upstream: Upstream) -> None:
    with running_nginx(upstream_port=upstream.port, authz_port=gateway.config["authz"]["port"]) as port:
        await through_data_plane(gateway, port, upstream)


async def test_caddy_forward_auth_in_front_of_the_model_server(gateway: GatewayProcess, upstream: Upstream) -> None:
    with running_caddy(upstream_port=upstream.port, authz_port=gateway.config["authz"]["port"]) as port:
        await through_data_plane(gateway, port, upstream)


async def test_data_planes_fail_closed_when_the_decision_service_is_away(upstream: Upstream) -> None:
    """Nothing listens on the authz port: nginx answers 503 with a contract body, Caddy 502; nothing passes."""
    upstream.reset()
    nobody = free_port()
    headers = auth(hs_token(tier="public"))
    async with aiohttp.ClientSession() as session:
        with running_nginx(upstream_port=upstream.port, authz_port=nobody) as port:
            url = f"http://127.0.0.1:{port}/openai/deployments/gpt-mock/chat/completions"
            async with session.post(url, json=CHAT, headers=headers) as r:
                assert r.status == 503
                assert orjson.loads(await r.read())["error"]["type"] == "service_unavailable"
        with running_caddy(upstream_port=upstream.port, authz_port=nobody) as port:
            url = f"http://127.0.0.1:{port}/openai/deployments/gpt-mock/chat/completions"
            async with session.post(url, json=CHAT, headers=headers) as r:
                assert r.status == 502
    assert upstream.seen == []
