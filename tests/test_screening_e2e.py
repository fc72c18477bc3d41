"""Denied-party screening end to end: import a CSL export, search it, and see a screened org blocked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import aiohttp
import orjson
import pytest

from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, GatewayProcess, gateway_config, seeded_gateway
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

CSV = resources.files("gateway").joinpath("data", "csl_sample.csv").read_bytes()
JSON = resources.files("gateway").joinpath("data", "csl_sample.json").read_bytes()
LISTED = "Quillfeather Trading L.L.C."  # fict-0003 "Quillfeather Trading LLC", once the suffix is dropped
CLEAN = "Acme Corp"


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[GatewayProcess]:
    with seeded_gateway(gateway_config(upstream.url), BASE_POLICY) as process:
        yield process


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession(headers=auth(ADMIN_TOKEN)) as client:
        yield client


async def _admin(
    session: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, *, expect: int = 200, **kwargs: Any
) -> Any:
    async with session.request(method, gateway.admin_url + path, **kwargs) as response:
        body = orjson.loads(await response.read())
        assert response.status == expect, body
        return body


async def _import(
    session: aiohttp.ClientSession, gateway: GatewayProcess, data: bytes = CSV, content_type: str = "text/csv"
) -> Any:
    return await _admin(
        session, gateway, "POST", "/admin/v1/screening/import", data=data, headers={"Content-Type": content_type}
    )


async def _public(
    session: aiohttp.ClientSession, gateway: GatewayProcess, token: str, request_id: str | None = None
) -> tuple[int, str]:
    headers = {**auth(token), **({"X-Request-Id": request_id} if request_id else {})}
    async with session.post(
        gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=headers
    ) as response:
        await response.read()
        return response.status, response.headers.get("X-Gateway-Reason", "")


async def _audit_record(session: aiohttp.ClientSession, gateway: GatewayProcess, request_id: str) -> Any:
    # Audit records are written in batches off the request path: poll briefly.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = (await _admin(session, gateway, "GET", "/admin/v1/audit?limit=100"))["records"]
        for record in records:
            if record["request_id"] == request_id:
                return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


async def test_import_csv_replaces_the_list_and_bumps_the_version(
    session: aiohttp.ClientSession, gateway: GatewayProcess
) -> None:
    before = await _admin(session, gateway, "GET", "/admin/v1/policy")
    imported = await _import(session, gateway)
    assert imported == {"version": before["version"] + 1, "entries": 25, "new_hits": 0}
    policy = await _admin(session, gateway, "GET", "/admin/v1/policy")
    entries = policy["screening"]["entries"]
    assert len(entries) == 25 and {e["id"] for e in entries} >= {"fict-0001", "fict-0003"}
    change = (await _admin(session, gateway, "GET", "/admin/v1/changes?limit=1"))["changes"][0]
    assert (change["target"], change["actor"], change["version"]) == ("screening", "admin", imported["version"])
    # The JSON form of the same list reads to the same entries.
    again = await _import(session, gateway, JSON, "application/json")
    assert again["entries"] == 25 and again["version"] == imported["version"] + 1


async def test_search_scores_names(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    await _import(session, gateway)
    found = await _admin(session, gateway, "GET", "/admin/v1/screening/search", params={"name": "Quilfeather Trading"})
    best = found["matches"][0]
    assert best["entry_id"] == "fict-0003" and best["blocked"] is True
    assert found["block_threshold"] <= best["score"] <= 1
    scores = [m["score"] for m in found["matches"]]
    assert scores == sorted(scores, reverse=True)
    none = await _admin(
        session, gateway, "GET", "/admin/v1/screening/search", params={"name": CLEAN, "min_score": "0.85"}
    )
    assert none["matches"] == []
    limited = await _admin(
        session,
        gateway,
        "GET",
        "/admin/v1/screening/search",
        params={"name": "Fictional Trading", "limit": "1", "min_score": "0"},
    )
    assert len(limited["matches"]) == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "name"),
        ({"name": "  "}, "name"),
        ({"name": "x" * 1001}, "name"),
        ({"name": "a", "limit": "0"}, "limit"),
        ({"name": "a", "min_score": "2"}, "min_score"),
        ({"name": "a", "min_score": "nan"}, "min_score"),
    ],
)
async def test_search_bad_input(
    session: aiohttp.ClientSession, gateway: GatewayProcess, params: dict[str, str], field: str
) -> None:
    body = await _admin(session, gateway, "GET", "/admin/v1/screening/search", params=params, expect=400)
    assert body["error"]["message"].startswith(f"{field}:")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"", "text/csv"),
        (b"foo,bar\n1,2\n", "text/csv"),
        (b"name,source\n,y\n", "text/csv"),
        (CSV.split(b"\n", 1)[0] + b"\n", "text/csv"),
        (b'{"results": "nope"}', "application/json"),
        (b"{not json", "application/json"),
        (b"\xff\xfe\x00garbage", "text/csv"),
    ],
)
async def test_bad_import_changes_nothing(
    session: aiohttp.ClientSession, gateway: GatewayProcess, data: bytes, content_type: str
) -> None:
    await _import(session, gateway)
    before = await _admin(session, gateway, "GET", "/admin/v1/policy")
    async with session.post(
        gateway.admin_url + "/admin/v1/screening/import", data=data, headers={"Content-Type": content_type}
    ) as response:
        body = orjson.loads(await response.read())
        assert response.status == 400, body
        assert body["error"]["code"] == "invalid_request" and body["error"]["message"]
    assert await _admin(session, gateway, "GET", "/admin/v1/policy") == before


async def test_screened_org_name_is_denied_with_the_match_audited(
    session: aiohttp.ClientSession, gateway: GatewayProcess
) -> None:
    await _import(session, gateway)
    request_id = f"screening-{time.time_ns()}"
    token = hs_token("kim", org="qf-1", org_name=LISTED)
    assert await _public(session, gateway, token, request_id) == (451, "entity_denied")
    assert await _public(session, gateway, hs_token("lee", org="acme", org_name=CLEAN)) == (200, "")
    record = await _audit_record(session, gateway, request_id)
    assert (record["code"], record["status"], record["subject"]) == ("entity_denied", 451, "kim")
    assert record["screening"]["entry_id"] == "fict-0003"
    assert record["screening"]["score"] >= 0.92 and record["screening"]["blocked"] is True
    dry = await _admin(
        session,
        gateway,
        "POST",
        "/admin/v1/decide",
        json={
            "subject": "kim",
            "org": "qf-1",
            "org_name": LISTED,
            "country": "US",
            "tier": "partner",
            "ip": "127.0.0.1",
            "model": "gpt-mock",
        },
    )
    assert (dry["status"], dry["code"], dry["screening"]["entry_id"]) == (451, "entity_denied", "fict-0003")


async def test_api_key_org_name_is_screened_too(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    # Issued before the list named its organisation: the import finds it, and rule 2 blocks it.
    await _admin(session, gateway, "PUT", "/admin/v1/policy", json={"screening": {"entries": []}})
    issued = await _admin(
        session,
        gateway,
        "POST",
        "/admin/v1/api-keys",
        json={
            "subject": "svc-qf",
            "org": "qf-2",
            "org_name": "Quillfeather Trading",
            "country": "US",
            "tier": "partner",
        },
    )
    assert (await _import(session, gateway))["new_hits"] == 1
    assert await _public(session, gateway, issued["key"]) == (451, "entity_denied")


async def test_clearing_the_list_lifts_the_block(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    await _import(session, gateway)
    token = hs_token("mia", org="qf-3", org_name=LISTED)
    assert await _public(session, gateway, token) == (451, "entity_denied")
    await _admin(session, gateway, "PUT", "/admin/v1/policy", json={"screening": {"entries": []}})
    assert await _public(session, gateway, token) == (200, "")
    found = await _admin(session, gateway, "GET", "/admin/v1/screening/search", params={"name": LISTED})
    assert found["matches"] == []


async def _refusal(
    session: aiohttp.ClientSession, gateway: GatewayProcess, token: str, request_id: str
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-mock"},
        headers={**auth(token), "X-Request-Id": request_id},
    ) as response:
        return response.status, orjson.loads(await response.read())


async def test_org_is_screened_when_the_token_has_no_org_name(
    session: aiohttp.ClientSession, gateway: GatewayProcess, upstream: Upstream
) -> None:
    await _import(session, gateway)
    upstream.reset()
    request_id = f"screening-org-{time.time_ns()}"
    token = hs_token("quinn", org="Quillfeather Trading LLC", org_name=None)
    status, body = await _refusal(session, gateway, token, request_id)
    assert (status, body["error"]["code"]) == (451, "entity_denied")
    assert upstream.seen == []
    record = await _audit_record(session, gateway, request_id)
    assert record["screening"]["entry_id"] == "fict-0003" and record["screening"]["screened"] == "org"
    assert record["screening"]["blocked"] is True and record["screening"]["score"] >= 0.92


@pytest.mark.parametrize(("org", "org_name"), [("qf-9", LISTED), ("Quillfeather Trading LLC", None)])
async def test_a_screening_block_names_the_rule_not_the_entry_or_score(
    session: aiohttp.ClientSession, gateway: GatewayProcess, org: str, org_name: str | None
) -> None:
    # Naming the listed entry or the score would let a denied party tune its name below the threshold.
    await _import(session, gateway)
    request_id = f"screening-msg-{time.time_ns()}"
    status, body = await _refusal(session, gateway, hs_token("rory", org=org, org_name=org_name), request_id)
    assert status == 451
    message = body["error"]["message"]
    assert message == (
        "Access to model 'gpt-mock' is not permitted: the caller's organisation matches the "
        "denied-party screening list (entity_denied)."
    )
    record = await _audit_record(session, gateway, request_id)
    score = record["screening"]["score"]
    for secret in ("Quillfeather", "fict-0003", f"{score:.2f}", str(score)):
        assert secret not in message
