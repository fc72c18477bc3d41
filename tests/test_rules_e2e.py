"""Country groups, licences, scheduled timeline entries and re-screening through two running gateways
sharing one Redis, driven over the admin API as an operator would."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, CHAT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

RESTRICTED = {"stage": "general", "timeline": [], "allowed_countries": ["US", "@A:1"], "export_suspended": False}


def _policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["lists"]["country-groups"] = {
        "A:1": {"reason": "allies", "source": "test", "countries": ["GB", "JP"]},
        "E:1": {"reason": "embargoed", "source": "test", "countries": ["KP", "SY"]},
    }
    document["lists"]["deny-countries"]["@E:1"] = {"reason": "Country Group E:1", "source": "test"}
    document["models"]["frontier"] = RESTRICTED
    return document


@pytest.fixture
def gateways(redis_url: str, upstream: Upstream) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    seed_policy(redis_url, _policy())
    first = GatewayProcess(gateway_config(upstream.url), redis_url=redis_url).start()
    second = GatewayProcess(gateway_config(upstream.url), redis_url=redis_url).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def admin(
    client: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, **kwargs: Any
) -> dict[str, Any]:
    async with client.request(method, gateway.admin_url + path, headers=auth(ADMIN_TOKEN), **kwargs) as response:
        body = orjson.loads(await response.read())
        assert response.status == 200, body
        return dict(body)


async def call(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, model: str = "frontier"
) -> tuple[int, str]:
    async with client.post(
        gateway.url + "/v1/chat/completions", json={**CHAT, "model": model}, headers=auth(token)
    ) as r:
        body = orjson.loads(await r.read())
        return r.status, (body.get("error") or {}).get("code", "")


async def until(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, expected: tuple[int, str], within: float
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await call(client, gateway, token) == expected:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gateway.url} did not answer {expected} within {within}s")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_group_change_is_enforced_by_both_gateways_within_a_second(
    gateways: tuple[GatewayProcess, GatewayProcess], client: aiohttp.ClientSession
) -> None:
    first, second = gateways
    french, korean = hs_token("amelie", country="FR"), hs_token("kim", country="KP")
    assert await call(client, first, french) == (451, "export_restricted")
    assert await call(client, second, korean, "gpt-mock") == (451, "country_denied")
    group = {"reason": "allies", "source": "test", "countries": ["GB", "JP", "FR"]}
    await admin(client, first, "PUT", "/admin/v1/lists/country-groups/A:1", json=group)
    waits = await asyncio.gather(*(until(client, g, french, (200, ""), 3) for g in gateways))
    assert max(waits) < 1.0, waits
    # A group named by deny-countries: KP leaves E:1, so the caller is let through there too.
    await admin(client, second, "PATCH", "/admin/v1/lists/country-groups/E:1", json={"countries": ["SY"]})
    for gateway in gateways:
        started = time.monotonic()
        while await call(client, gateway, korean, "gpt-mock") != (200, ""):
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.01)


async def test_a_group_named_anywhere_cannot_be_deleted_nor_a_missing_one_named(
    gateways: tuple[GatewayProcess, GatewayProcess], client: aiohttp.ClientSession
) -> None:
    first, _ = gateways
    async with client.delete(first.admin_url + "/admin/v1/lists/country-groups/A:1", headers=auth(ADMIN_TOKEN)) as r:
        body = orjson.loads(await r.read())
        assert r.status == 400 and "models.frontier" in body["error"]["message"], body
    model = {**RESTRICTED, "allowed_countries": ["@nope"]}
    async with client.put(first.admin_url + "/admin/v1/models/m2", json=model, headers=auth(ADMIN_TOKEN)) as r:
        assert r.status == 400 and "@nope" in orjson.loads(await r.read())["error"]["message"]


async def test_grant_then_expire_a_licence(
    gateways: tuple[GatewayProcess, GatewayProcess], client: aiohttp.ClientSession
) -> None:
    first, second = gateways
    lab = hs_token("amelie", country="FR", org="lab-fr")
    other = hs_token("bob", country="FR", org="other")
    assert await call(client, first, lab) == (451, "export_restricted")
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
    grant = {
        "org": "lab-fr",
        "models": ["frontier"],
        "countries": ["FR"],
        "expires_at": iso(expires),
        "reason": "BIS licence D123456",
        "source": "BIS",
    }
    await admin(client, first, "PUT", "/admin/v1/lists/licences/D123456", json=grant)
    for gateway in gateways:
        assert await until(client, gateway, lab, (200, ""), 1) < 1.0
        assert await call(client, gateway, other) == (451, "export_restricted")  # another org
    decided = await admin(
        client,
        second,
        "POST",
        "/admin/v1/decide",
        json={"subject": "amelie", "org": "lab-fr", "country": "FR", "tier": "public", "ip": "127.0.0.1"}
        | {"model": "frontier"},
    )
    assert decided["licence"] == "D123456"
    await asyncio.sleep(0.3)  # the audit batch is flushed
    records = (await admin(client, first, "GET", "/admin/v1/audit?limit=50"))["records"]
    assert any(r.get("licence") == "D123456" and r["subject"] == "amelie" for r in records)
    # At its expiry the licence stops applying, with no write.
    wait = max(0.0, (expires - datetime.now(UTC)).total_seconds())
    for gateway in gateways:
        await until(client, gateway, lab, (451, "export_restricted"), wait + 1.0)
    changes = (await admin(client, first, "GET", "/admin/v1/changes?limit=5"))["changes"]
    assert changes[0]["target"] == "lists/licences/D123456"  # the grant was the last write


async def test_a_scheduled_lift_happens_with_no_write(
    gateways: tuple[GatewayProcess, GatewayProcess], client: aiohttp.ClientSession
) -> None:
    first, second = gateways
    french = hs_token("amelie", country="FR")
    lift = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    # "Suspend now, lift on the date" in one write.
    model = {
        "stage": "general",
        "allowed_countries": None,
        "export_suspended": True,
        "timeline": [{"at": iso(lift), "export_suspended": False}],
    }
    written = await admin(client, first, "PUT", "/admin/v1/models/frontier", json=model)
    for gateway in gateways:
        assert await until(client, gateway, french, (451, "export_suspended"), 1) < 1.0
    shown = await admin(client, second, "GET", "/admin/v1/models/frontier")
    assert shown["current"]["export_suspended"] is True
    assert shown["next_change"] == {"at": iso(lift), "export_suspended": False}
    for gateway in gateways:
        remaining = (lift - datetime.now(UTC)).total_seconds()
        await until(client, gateway, french, (200, ""), remaining + 1.0)
        assert datetime.now(UTC) >= lift
    shown = await admin(client, second, "GET", "/admin/v1/models/frontier")
    assert shown["current"]["export_suspended"] is False and shown["next_change"] is None
    policy = await admin(client, first, "GET", "/admin/v1/policy")
    assert policy["version"] == written["version"]  # nothing was written since


CSV_HEADER = (
    b"_id,source,entity_number,type,programs,name,title,addresses,federal_register_notice,start_date,end_date,"
    b"standard_order,license_requirement,license_policy,call_sign,vessel_type,gross_tonnage,"
    b"gross_registered_tonnage,vessel_flag,vessel_owner,remarks,source_list_url,alt_names,citizenships,"
    b"dates_of_birth,nationalities,places_of_birth,source_information_url,ids\n"
)


def csl(*names: str) -> bytes:
    rows = [
        f"fict-{i:04d},Entity List (EL) - Bureau of Industry and Security,,Entity,,{name}" + "," * 23 + "\n"
        for i, name in enumerate(names, 1)
    ]
    return CSV_HEADER + "".join(rows).encode()


async def test_rescreening_blocks_an_existing_key_and_lists_it(
    gateways: tuple[GatewayProcess, GatewayProcess], client: aiohttp.ClientSession
) -> None:
    first, second = gateways
    await admin(client, first, "POST", "/admin/v1/screening/import", data=csl("Unrelated Holdings"))
    issued = await admin(
        client,
        first,
        "POST",
        "/admin/v1/api-keys",
        json={"subject": "svc-1", "org": "blue-lantern", "org_name": "Blue Lantern Robotics"}
        | {"country": "US", "tier": "public"},
    )
    key = issued["key"]
    assert await call(client, second, key, "gpt-mock") == (200, "")
    imported = await admin(
        client,
        first,
        "POST",
        "/admin/v1/screening/import",
        data=csl("Unrelated Holdings", "Blue Lantern Robotics Ltd"),
    )
    assert imported["new_hits"] == 1
    for gateway in gateways:
        assert await until(client, gateway, key, (451, "entity_denied"), 1) < 1.0
    hits = (await admin(client, second, "GET", "/admin/v1/screening/hits"))["hits"]
    assert [(h["kind"], h["id"], h["blocked"], h["new"]) for h in hits] == [("api_key", issued["id"], True, True)]
    keys = (await admin(client, first, "GET", "/admin/v1/api-keys"))["api_keys"]
    assert issued["id"] in keys  # the key itself was not touched
    # The same list imported again: the hit is still listed, no longer new.
    listed = csl("Unrelated Holdings", "Blue Lantern Robotics Ltd")
    again = await admin(client, first, "POST", "/admin/v1/screening/import", data=listed)
    assert again["new_hits"] == 0
    assert (await admin(client, first, "GET", "/admin/v1/screening/hits?new=true"))["hits"] == []
    # And a new key for that organisation is refused at issuance.
    body = {"subject": "svc-2", "org": "bl", "org_name": "Blue Lantern Robotics", "country": "US", "tier": "public"}
    async with client.post(first.admin_url + "/admin/v1/api-keys", json=body, headers=auth(ADMIN_TOKEN)) as r:
        refused = orjson.loads(await r.read())
        assert (r.status, refused["error"]["code"]) == (409, "screening_match")


async def test_decide_explain_all_lists_every_blocking_rule(
    gateways: tuple[GatewayProcess, GatewayProcess], client: aiohttp.ClientSession
) -> None:
    first, _ = gateways
    await admin(client, first, "PATCH", "/admin/v1/models/frontier", json={"export_suspended": True})
    body = {"subject": "x", "country": "SY", "tier": "public", "ip": "127.0.0.1", "model": "frontier", "explain": "all"}
    answer = await admin(client, first, "POST", "/admin/v1/decide", json=body)
    assert answer["code"] == "country_denied"
    assert [b["code"] for b in answer["blocking"]] == ["country_denied", "export_suspended", "export_restricted"]
