"""The operator console over plain HTTP, against real gateway processes on one Redis: sessions, CSRF, the
same-origin check, security headers, the admin API's own auth untouched, and writes as the signed-in actor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from gateway.redis_server import RedisServer

from .support.console import ALICE_TOKEN, BOB_TOKEN, ConsoleClient, console_config, tokens_file
from .support.gateway_process import GatewayProcess, post_chat, seed_policy
from .support.tokens import hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until

ALICE = {"Authorization": f"Bearer {ALICE_TOKEN}"}


@pytest.fixture(scope="module")
def gateways(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[GatewayProcess]]:
    """Two gateways on one Redis; the loopback is a trusted proxy, so X-Forwarded-Proto counts from it."""
    tokens = tokens_file(tmp_path_factory.mktemp("console"))
    with RedisServer() as redis:
        seed_policy(redis.url)
        network = {"trusted_proxies": ["127.0.0.1/32"]}
        started = [
            GatewayProcess(console_config(upstream.url, tokens, network=network), redis_url=redis.url) for _ in range(2)
        ]
        try:
            for gateway in started:
                gateway.start(wait_ready=False)
            for gateway in started:
                gateway.wait_http(gateway.admin_url + "/readyz", 30)
            yield started
        finally:
            for gateway in started:
                gateway.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def deny_countries(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, object]:
    async with http.get(gateway.admin_url + "/admin/v1/lists/deny-countries", headers=ALICE) as response:
        assert response.status == 200
        return dict((await response.json())["entries"])


async def test_console_pages_without_a_session_redirect_to_sign_in(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    client = ConsoleClient(http, gateways[0])
    for path in ("/console/", "/console/models", "/console/lists/deny-countries", "/console/audit.csv"):
        status, _, response = await client.get(path)
        assert status == 303, path
        assert response.headers["Location"].startswith("/console/signin?next=")
    status, _, _ = await client.post("/console/lists/deny-countries", {"action": "remove", "key": "IR"})
    assert status == 401
    assert "IR" in await deny_countries(http, gateways[0])


async def test_admin_api_still_refuses_a_request_without_its_bearer_token_even_with_a_console_session(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    client = ConsoleClient(http, gateways[0])
    await client.sign_in(ALICE_TOKEN)
    status, body, _ = await client.get("/admin/v1/policy")
    assert status == 401
    assert '"unauthenticated"' in body


async def test_sign_in_sets_a_strict_httponly_cookie_and_pages_carry_a_strict_csp(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    gateway = gateways[0]
    client = ConsoleClient(http, gateway)
    status, html, response = await client.get("/console/signin")
    assert status == 200
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src" not in csp and "unsafe-inline" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "<script" not in html and "style=" not in html
    status, _, response = await client.post(
        "/console/signin", {"csrf": client.cookies["gw_console_signin"], "token": ALICE_TOKEN}
    )
    assert status == 303
    cookie = response.cookies["gw_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # plain HTTP straight to the listener
    status, html, response = await client.get("/console/")
    assert status == 200 and 'id="actor">alice<' in html
    assert response.headers["Content-Security-Policy"] == csp


async def test_the_cookie_is_secure_when_a_trusted_proxy_says_the_browser_used_tls(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    client = ConsoleClient(http, gateways[0])
    tls = {"X-Forwarded-Proto": "https", "Origin": gateways[0].admin_url.replace("http://", "https://")}
    status, _, _ = await client.get("/console/signin", headers=tls)
    assert status == 200
    status, _, response = await client.post(
        "/console/signin", {"csrf": client.cookies["gw_console_signin"], "token": ALICE_TOKEN}, headers=tls
    )
    assert status == 303
    assert response.cookies["gw_console"]["secure"]


async def test_a_wrong_token_is_refused_and_starts_no_session(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    client = ConsoleClient(http, gateways[0])
    await client.get("/console/signin")
    status, html, _ = await client.post(
        "/console/signin", {"csrf": client.cookies["gw_console_signin"], "token": "not-a-token"}
    )
    assert status == 401 and "not accepted" in html
    assert "gw_console" not in client.cookies
    # The sign-in form's own CSRF token is needed too.
    status, _, _ = await client.post("/console/signin", {"csrf": "forged", "token": ALICE_TOKEN})
    assert status == 403 and "gw_console" not in client.cookies


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    gateway = gateways[0]
    client = ConsoleClient(http, gateway)
    await client.sign_in(ALICE_TOKEN)
    form = {"action": "add", "key": "KP", "reason": "csrf test"}
    status, body, _ = await client.post("/console/lists/deny-countries", form)
    assert status == 403 and "CSRF" in body
    status, _, _ = await client.post("/console/lists/deny-countries", {**form, "csrf": "wrong"})
    assert status == 403
    assert "KP" not in await deny_countries(http, gateway)


async def test_a_post_from_another_origin_is_refused_and_changes_nothing(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    gateway = gateways[0]
    client = ConsoleClient(http, gateway)
    await client.sign_in(ALICE_TOKEN)
    form = {"action": "add", "key": "CU", "reason": "origin test", "csrf": await client.csrf()}
    status, body, _ = await client.post("/console/lists/deny-countries", form, {"Origin": "http://evil.example"})
    assert status == 403 and "own pages" in body
    # No Origin at all, with a foreign Referer, or with neither: refused too.
    for headers in ({"Origin": "null"}, {"Origin": gateway.url}):
        status, _, _ = await client.post("/console/lists/deny-countries", form, headers)
        assert status == 403
    assert "CU" not in await deny_countries(http, gateway)
    status, _, _ = await client.post("/console/lists/deny-countries", form)
    assert status == 200
    assert "CU" in await deny_countries(http, gateway)


async def test_a_write_from_the_console_is_the_admin_write_of_the_signed_in_actor(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    gateway = gateways[0]
    client = ConsoleClient(http, gateway)
    await client.sign_in(BOB_TOKEN)
    form = {"action": "add", "key": "BY", "reason": "actor test", "source": "console", "csrf": await client.csrf()}
    status, html, _ = await client.post("/console/lists/deny-countries", form)
    assert status == 200 and "Done: policy version" in html
    async with http.get(gateway.admin_url + "/admin/v1/changes?limit=5", headers=ALICE) as response:
        changes = (await response.json())["changes"]
    mine = next(c for c in changes if c["target"] == "lists/deny-countries/BY")
    assert mine["actor"] == "bob" and mine["effect"] == "tighten"
    assert (await deny_countries(http, gateway))["BY"]["added_by"] == "bob"  # type: ignore[index]
    # Bad input is the API's 400, shown on the page, and nothing is written.
    bad = {**form, "key": "ZZZ", "csrf": await client.csrf()}
    status, html, _ = await client.post("/console/lists/deny-countries", bad)
    assert status == 400 and "notice-error" in html
    assert "ZZZ" not in await deny_countries(http, gateway)


async def test_a_session_made_on_one_gateway_is_served_by_another_and_ends_everywhere_at_sign_out(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    first, second = gateways
    client = ConsoleClient(http, first)
    await client.sign_in(ALICE_TOKEN)
    other = ConsoleClient(http, second)
    other.cookies = dict(client.cookies)
    status, html, _ = await other.get("/console/models")
    assert status == 200 and "gpt-mock" in html
    stolen = dict(client.cookies)
    status, _, response = await client.post("/console/signout", {"csrf": await client.csrf()})
    assert status == 303 and response.headers["Location"].startswith("/console/signin")
    assert "gw_console" not in client.cookies
    # The old cookie, replayed on either gateway, names no session any more.
    for gateway in gateways:
        replay = ConsoleClient(http, gateway)
        replay.cookies = dict(stolen)
        status, _, response = await replay.get("/console/models")
        assert status == 303 and response.headers["Location"].startswith("/console/signin")


async def test_the_audit_csv_export_holds_the_filtered_records(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    gateway = gateways[0]
    assert await post_chat(http, gateway, hs_token("csv-caller-ir", country="IR")) == 451
    client = ConsoleClient(http, gateway)
    await client.sign_in(ALICE_TOKEN)

    async def exported() -> str:
        return (await client.get("/console/audit.csv?subject=csv-caller-ir"))[1]

    async def holds_the_refusal() -> bool:
        return "country_denied" in await exported()

    await wait_until(holds_the_refusal, 5)
    text = await exported()
    header, *rows = text.strip().splitlines()
    assert header.startswith("time,request_id,subject,org")
    assert rows and all(",csv-caller-ir," in row for row in rows)


async def test_the_audit_page_filters_through_the_admin_apis_audit_search(
    http: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    gateway = gateways[0]
    assert await post_chat(http, gateway, hs_token("window-caller-ir", country="IR")) == 451
    client = ConsoleClient(http, gateway)
    await client.sign_in(ALICE_TOKEN)

    async def listed() -> bool:
        status, html, _ = await client.get("/console/audit?subject=window-caller-ir&decision=block")
        return status == 200 and "country_denied" in html

    await wait_until(listed, 5)
    # A window that ends before the request holds none of it; a bad instant is the API's 400, on the page.
    status, html, _ = await client.get("/console/audit?subject=window-caller-ir&until=2001-01-01T00:00:00Z")
    assert status == 200 and "country_denied" not in html
    status, html, _ = await client.get("/console/audit?since=yesterday")
    assert status == 400 and "since" in html and "ISO-8601" in html
