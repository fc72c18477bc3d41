"""Row 3a and the model list through a running gateway: a request must name its model, and GET /v1/models
answers only the models this caller may use now.

The upstream records what it received: for every refusal, it must have received nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, GatewayProcess, gateway_config, seeded_gateway
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

POLICY: dict[str, Any] = {
    "lists": BASE_POLICY["lists"],
    "models": {
        **BASE_POLICY["models"],
        "frontier-x": {
            "stage": "general",
            "timeline": [],
            "allowed_countries": ["US", "GB"],
            "export_suspended": False,
        },
        "preview-z": {"stage": "partners", "timeline": [], "allowed_countries": None, "export_suspended": False},
    },
}
LISTED = ["gpt-mock", "frontier-x", "preview-z", "not-registered"]
CN = hs_token("cn-user", org="cn-org", country="CN", tier="public")
US_PARTNER = hs_token("us-partner", org="acme", country="US", tier="partner")
IR = hs_token("ir-user", org="ir-org", country="IR", tier="public")


@dataclass
class ListingUpstream(Upstream):
    """The recording upstream, with a /v1/models whose answer a test chooses (``mode``)."""

    mode: str = "list"

    async def models(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        listing = orjson.dumps(
            {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lab"} for m in LISTED]}
        )
        mode = self.mode
        if mode == "gzip":  # compressed although the gateway asked for the identity coding
            return web.Response(
                body=gzip.compress(listing), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )
        if mode == "text":
            return web.Response(text="gpt-mock\nfrontier-x\n", content_type="text/plain")
        if mode == "not-json":
            return web.Response(body=b'{"object": "list", "data": [', content_type="application/json")
        if mode == "no-data":
            return web.Response(body=b'{"models": ["frontier-x"]}', content_type="application/json")
        if mode == "bad-entry":
            return web.Response(body=b'{"object": "list", "data": ["frontier-x"]}', content_type="application/json")
        if mode == "error":
            return web.Response(status=500, body=listing, content_type="application/json")
        return web.Response(
            body=listing,
            content_type="application/json",
            headers={"ETag": '"whole-list"', "X-Upstream": "yes", "Cache-Control": "public, max-age=3600"},
        )

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app


@pytest.fixture(scope="module")
def listing_upstream() -> Iterator[ListingUpstream]:
    server = ListingUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def upstream_seen(listing_upstream: ListingUpstream) -> ListingUpstream:
    listing_upstream.reset()
    listing_upstream.mode = "list"
    return listing_upstream


@pytest.fixture(scope="module")
def gateway(listing_upstream: ListingUpstream) -> Iterator[GatewayProcess]:
    # Generous limits: the tests poll, and no test here is about rate limits.
    tiers = {
        name: {"requests_per_minute": 60_000, "burst": 10_000, "stages": stages}
        for name, stages in (("public", ["general"]), ("partner", ["partners", "general"]))
    }
    with seeded_gateway(gateway_config(listing_upstream.url, tiers=tiers), POLICY) as process:
        yield process


async def _get_list(gateway: GatewayProcess, token: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as client,
        client.get(gateway.url + "/v1/models", headers={**auth(token), **(headers or {})}) as response,
    ):
        raw = await response.read()
        return response.status, response.headers, raw


async def test_cn_caller_is_not_listed_frontier_x(gateway: GatewayProcess, upstream_seen: ListingUpstream) -> None:
    status, headers, raw = await _get_list(gateway, CN, {"Accept-Encoding": "gzip, br"})
    assert status == 200, raw
    body = orjson.loads(raw)
    # frontier-x: allowed_countries excludes CN; preview-z: partners stage; not-registered: unknown_model deny.
    assert [entry["id"] for entry in body["data"]] == ["gpt-mock"]
    assert body["object"] == "list" and body["data"][0]["owned_by"] == "lab"
    # The filtered body, with its own length, uncompressed whatever the caller accepts.
    assert int(headers["Content-Length"]) == len(raw)
    assert "Content-Encoding" not in headers and "ETag" not in headers
    assert headers["Cache-Control"] == "no-store"  # the upstream's "public, max-age" was for the whole list
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Upstream"] == "yes" and headers["X-Request-Id"]
    assert "x-ratelimit-remaining-requests" in headers
    # The upstream was asked for an uncompressed list.
    seen = {k.lower(): v for k, v in upstream_seen.seen[0].headers}
    assert seen["accept-encoding"] == "identity"


async def test_us_partner_is_listed_frontier_x(gateway: GatewayProcess, upstream_seen: ListingUpstream) -> None:
    status, _headers, raw = await _get_list(gateway, US_PARTNER)
    assert status == 200
    assert [entry["id"] for entry in orjson.loads(raw)["data"]] == ["gpt-mock", "frontier-x", "preview-z"]


async def test_the_list_follows_the_policy_now(gateway: GatewayProcess, upstream_seen: ListingUpstream) -> None:
    # Admitting CN to frontier-x lists it at once; taking it back hides it again.
    async with aiohttp.ClientSession(headers=auth(ADMIN_TOKEN)) as admin:

        async def put_frontier(countries: list[str]) -> None:
            model = {**POLICY["models"]["frontier-x"], "allowed_countries": countries}
            async with admin.put(gateway.admin_url + "/admin/v1/models/frontier-x", json=model) as response:
                assert response.status == 200, await response.text()

        try:
            await put_frontier(["US", "GB", "CN"])
            deadline = time.monotonic() + 5
            ids: list[str] = []
            while time.monotonic() < deadline and "frontier-x" not in ids:
                ids = [e["id"] for e in orjson.loads((await _get_list(gateway, CN))[2])["data"]]
                await asyncio.sleep(0.02)
            assert ids == ["gpt-mock", "frontier-x"]
        finally:
            await put_frontier(["US", "GB"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ids = [e["id"] for e in orjson.loads((await _get_list(gateway, CN))[2])["data"]]
        if ids == ["gpt-mock"]:
            break
        await asyncio.sleep(0.02)
    assert ids == ["gpt-mock"]


async def test_a_body_naming_a_model_does_not_unfilter_the_list(
    gateway: GatewayProcess, upstream_seen: ListingUpstream
) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(gateway.url + "/v1/models", json={"model": "gpt-mock"}, headers=auth(CN)) as response,
    ):
        assert response.status == 200
        assert [entry["id"] for entry in orjson.loads(await response.read())["data"]] == ["gpt-mock"]


@pytest.mark.parametrize("mode", ["gzip", "text", "not-json", "no-data", "bad-entry", "error"])
async def test_an_unreadable_list_is_502_never_unfiltered(
    gateway: GatewayProcess, upstream_seen: ListingUpstream, mode: str
) -> None:
    upstream_seen.mode = mode
    status, _headers, raw = await _get_list(gateway, CN)
    assert status == 502, raw
    error = orjson.loads(raw)["error"]
    assert (error["code"], error["type"]) == ("upstream_unreachable", "upstream_error")
    assert b"frontier-x" not in raw
    assert len(upstream_seen.seen) == 1


async def test_head_of_the_list_describes_the_filtered_list(
    gateway: GatewayProcess, upstream_seen: ListingUpstream
) -> None:
    # A HEAD answered with the upstream's own headers would give away the whole list's length.
    _, _, filtered = await _get_list(gateway, CN)
    upstream_seen.seen.clear()
    async with aiohttp.ClientSession() as client, client.head(gateway.url + "/v1/models", headers=auth(CN)) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(filtered)
        assert await response.read() == b""
    # The list is fetched (GET) to be filtered; nothing unfiltered goes back.
    assert [(s.method, s.raw_path) for s in upstream_seen.seen] == [("GET", "/v1/models")]


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (CN, 451, "export_restricted"),
        (US_PARTNER, 200, ""),
    ],
)
async def test_get_one_model_is_decided_as_that_model(
    gateway: GatewayProcess, upstream_seen: ListingUpstream, token: str, status: int, code: str
) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(gateway.url + "/v1/models/frontier-x", headers=auth(token)) as response,
    ):
        assert response.status == status, await response.text()
        assert response.headers.get("X-Gateway-Reason", "") == code
    assert [s.raw_path for s in upstream_seen.seen] == (["/v1/models/frontier-x"] if status == 200 else [])


# --------------------------------------------------------------------------- row 3a


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b'{"messages": []}', "application/json", "model_required"),
        (b"[1,2]", "application/json", "ambiguous_request"),  # JSON that is not one object: no reading is safe
        (b'{"messages": [], "nested": {"model": "frontier-x"}}', "application/json", "model_required"),
        (b"", None, "model_required"),
    ],
)
async def test_a_request_naming_no_model_is_400_model_required(
    gateway: GatewayProcess, upstream_seen: ListingUpstream, body: bytes, content_type: str | None, code: str
) -> None:
    headers = {**auth(CN), **({"Content-Type": content_type} if content_type else {})}
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.url + "/v1/chat/completions", data=body, headers=headers) as response,
    ):
        error = orjson.loads(await response.read())["error"]
        assert response.status == 400, error
        assert (error["code"], error["type"]) == (code, "invalid_request_error")
        assert response.headers["X-Gateway-Reason"] == code
    assert upstream_seen.seen == []


async def test_non_json_body_is_refused_and_not_forwarded(
    gateway: GatewayProcess, upstream_seen: ListingUpstream
) -> None:
    for content_type in ("application/json", "text/plain"):
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                gateway.url + "/v1/chat/completions",
                data=b"not json",
                headers={**auth(CN), "Content-Type": content_type},
            ) as response,
        ):
            error = orjson.loads(await response.read())["error"]
            # No model can be read from it: refused (415 where the media type is not JSON).
            assert response.status in (400, 415), error
            assert error["type"] == "invalid_request_error"
    assert upstream_seen.seen == []


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/Models", "/v1/%6Dodels", "/v1/files", "/"])
async def test_other_get_paths_need_a_model(gateway: GatewayProcess, upstream_seen: ListingUpstream, path: str) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(URL(gateway.url + path, encoded=True), headers=auth(CN)) as response,
    ):
        assert response.status == 400
        assert response.headers["X-Gateway-Reason"] == "model_required"
    assert upstream_seen.seen == []


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (None, 401, "unauthenticated"),
        (IR, 451, "country_denied"),
    ],
)
async def test_rows_1_to_3_come_before_row_3a(
    gateway: GatewayProcess, upstream_seen: ListingUpstream, token: str | None, status: int, code: str
) -> None:
    headers = auth(token) if token else {}
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.url + "/v1/chat/completions", json={"messages": []}, headers=headers) as response,
    ):
        assert response.status == status
        assert response.headers["X-Gateway-Reason"] == code
    assert upstream_seen.seen == []


async def test_a_request_naming_its_model_still_passes(gateway: GatewayProcess, upstream_seen: ListingUpstream) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            gateway.url + "/v1/chat/completions", json={"model": "gpt-mock", "messages": []}, headers=auth(CN)
        ) as response,
    ):
        assert response.status == 200
    assert [s.raw_path for s in upstream_seen.seen] == ["/v1/chat/completions"]
