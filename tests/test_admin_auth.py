"""Admin and public credentials never cross (docs/hardening.md 30, 32): each listener refuses the other's."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from yarl import URL

from .support.gateway_process import ADMIN_TOKEN, GatewayProcess, gateway_config, seeded_gateway
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

NAMED_TOKEN = "named-operator-token-0001"
LATER_TOKEN = "named-operator-token-0002"


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _line(name: str, token: str) -> str:
    return f"{name}: {hashlib.sha256(token.encode()).hexdigest()}\n"


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("admin-auth") / "tokens"
    path.write_text(_line("bob", NAMED_TOKEN))
    return path


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tokens_file: Path) -> Iterator[GatewayProcess]:
    with seeded_gateway(gateway_config(upstream.url, admin={"tokens_file": str(tokens_file)})) as process:
        yield process


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as client:
        yield client


async def _admin_status(
    session: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, authorization: str | None
) -> tuple[int, CIMultiDict[str], Any]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with session.request(
        method, gateway.admin_url + path, headers=headers, json={"reason": "r"} if method == "PUT" else None
    ) as response:
        return response.status, CIMultiDict(response.headers), orjson.loads(await response.read())


def _assert_unauthenticated(status: int, headers: CIMultiDict[str], body: Any) -> None:
    assert status == 401, body
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "unauthenticated"
    assert body["error"]["request_id"] == headers["X-Request-Id"]
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def _issue_key(session: aiohttp.ClientSession, gateway: GatewayProcess) -> str:
    async with session.post(
        gateway.admin_url + "/admin/v1/api-keys",
        headers=auth(ADMIN_TOKEN),
        json={"subject": "svc", "org": "acme", "country": "US", "tier": "partner"},
    ) as r:
        assert r.status == 200
        return str((await r.json())["key"])


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/v1/policy"),
        ("PUT", "/admin/v1/lists/deny-countries/CU"),
        ("GET", "/admin/v1/openapi.json"),
        ("GET", "/admin/v1/audit"),
        ("GET", "/admin/v1/does-not-exist"),
    ],
)
async def test_user_credentials_are_refused_on_the_admin_api(
    session: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str
) -> None:
    api_key = await _issue_key(session, gateway)
    credentials = [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {hs_token()}",
        f"Bearer {api_key}",
        f"Basic {ADMIN_TOKEN}",
        f"Bearer {ADMIN_TOKEN.upper()}",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {NAMED_TOKEN[:-1]}",
    ]
    for authorization in credentials:
        _assert_unauthenticated(*await _admin_status(session, gateway, method, path, authorization))
    # The same API key is good on the public listener: it is refused for where it is used, not for what it is.
    async with session.get(gateway.url + "/v1/models", headers=auth(api_key)) as response:
        assert response.status == 200


async def test_admin_tokens_open_the_admin_api(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    for token in (ADMIN_TOKEN, NAMED_TOKEN):
        status, _headers, body = await _admin_status(session, gateway, "GET", "/admin/v1/policy", f"bearer {token}")
        assert status == 200 and body["version"] >= 1


async def test_monitoring_needs_no_token(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        async with session.get(gateway.admin_url + path) as response:
            assert response.status == 200, path
    async with session.get(gateway.admin_url + "/metrics") as response:
        assert "gateway_policy_version" in await response.text()


async def test_admin_token_is_no_credential_on_the_public_listener(
    session: aiohttp.ClientSession, gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    admin_host = URL(gateway.admin_url).raw_authority
    for token in (ADMIN_TOKEN, NAMED_TOKEN):
        for path, host in (
            ("/admin/v1/policy", None),
            ("/admin/v1/policy", admin_host),
            ("/admin/v1/lists/deny-countries", None),
            ("/v1/chat/completions", None),
            ("/metrics", admin_host),
        ):
            headers = {"Authorization": f"Bearer {token}"}
            if host:
                headers["Host"] = host
            async with session.get(gateway.url + path, headers=headers) as response:
                body = orjson.loads(await response.read())
                _assert_unauthenticated(response.status, CIMultiDict(response.headers), body)
                assert "lists" not in body
    assert clean_upstream.seen == []  # nothing reached the model server either


async def test_public_listener_serves_no_gateway_metrics_or_admin(
    session: aiohttp.ClientSession, gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    # A user's good token on admin-looking paths is just proxied: the upstream answers, not the gateway.
    for path in ("/metrics", "/admin/v1/policy"):
        async with session.post(gateway.url + path, headers=auth(), json={"model": "gpt-mock"}) as response:
            text = await response.text()
            assert response.headers.get("X-Upstream") == "yes"
            assert "gateway_requests_total" not in text and '"lists"' not in text
    assert [seen.raw_path for seen in clean_upstream.seen] == ["/metrics", "/admin/v1/policy"]
    for seen in clean_upstream.seen:
        assert "authorization" not in {name.lower() for name, _ in seen.headers}


async def test_tokens_file_changes_apply_without_restart(
    session: aiohttp.ClientSession, gateway: GatewayProcess, tokens_file: Path
) -> None:
    original = _read(tokens_file)
    try:
        _assert_unauthenticated(
            *await _admin_status(session, gateway, "GET", "/admin/v1/changes", f"Bearer {LATER_TOKEN}")
        )
        _write(tokens_file, original + _line("carol", LATER_TOKEN))
        async with session.put(
            gateway.admin_url + "/admin/v1/lists/deny-entities/tokens-file-probe",
            headers=auth(LATER_TOKEN),
            json={"reason": "probe"},
        ) as response:
            assert response.status == 200
        async with session.get(gateway.admin_url + "/admin/v1/changes?limit=1", headers=auth(LATER_TOKEN)) as r:
            assert (await r.json())["changes"][0]["actor"] == "carol"
        # A broken edit keeps the last good tokens rather than locking every operator out.
        _write(tokens_file, "carol: not-a-digest\n")
        status, _headers, _body = await _admin_status(
            session, gateway, "GET", "/admin/v1/changes", f"Bearer {LATER_TOKEN}"
        )
        assert status == 200
        _write(tokens_file, original)
        _assert_unauthenticated(
            *await _admin_status(session, gateway, "GET", "/admin/v1/changes", f"Bearer {LATER_TOKEN}")
        )
    finally:
        _write(tokens_file, original)


def test_unparseable_admin_requests_get_the_contract_json(gateway: GatewayProcess) -> None:
    # The admin listener answers what its parser refuses as the public one does: a JSON 400 that
    # never quotes the request (here an admin token), and a closed connection.
    from .support.rawhttp import exchange

    port = URL(gateway.admin_url).port
    assert port is not None
    secret = b"Bearer " + NAMED_TOKEN.encode()
    for data in (
        b"GET /admin/v1/policy HTTP/1.1\r\nHost: a\r\nAuthorization: " + secret + b"\r\nBad Header\r\n\r\n",
        b"POST /admin/v1/decide HTTP/1.1\r\nHost: a\r\nAuthorization: " + secret + b"\r\nContent-Length: +5\r\n\r\n{}",
    ):
        responses, closed = exchange(port, data)
        assert [r.status for r in responses] == [400] and closed
        body = responses[0].json()
        assert body["error"]["code"] == "invalid_request"
        assert responses[0].header("Content-Type").startswith("application/json")
        assert secret not in responses[0].head + responses[0].body
