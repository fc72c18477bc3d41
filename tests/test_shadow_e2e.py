"""Shadow entries end to end: a real gateway, Redis and upstream. A shadow entry blocks nothing, the audit
trail and the metric show what it would have blocked, and PATCH {"enforce": true} makes it live."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from .support.gateway_process import (
    BASE_POLICY,
    CHAT,
    GatewayProcess,
    gateway_config,
    running_gateway,
    seed_policy,
)
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until
from .test_admin import AdminClient, assert_error

ENTRIES = "/admin/v1/lists"


@pytest.fixture
def gateway(redis_url: str, clean_upstream: Upstream) -> Iterator[GatewayProcess]:
    document = copy.deepcopy(BASE_POLICY)
    document["lists"]["deny-entities"] = {"old-org": {"reason": "listed", "source": "test"}}
    seed_policy(redis_url, document)
    process = GatewayProcess(gateway_config(clean_upstream.url), redis_url=redis_url).start()
    yield process
    process.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def chat(session: aiohttp.ClientSession, gateway: GatewayProcess, token: str) -> tuple[int, str]:
    """(status, request id) of one chat request."""
    async with session.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(token)) as response:
        await response.read()
        return response.status, response.headers["X-Request-Id"]


async def audit_of(admin: AdminClient, request_id: str) -> dict[str, Any]:
    """The audit record of one request, once the batch that holds it has been written."""
    found: dict[str, Any] = {}

    async def written() -> bool:
        records = (await admin.ok("GET", "/admin/v1/audit?limit=100"))["records"]
        found.update(next((r for r in records if r["request_id"] == request_id), {}))
        return bool(found)

    await wait_until(written, within=5)
    return found


async def shadow_counts(session: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, float]:
    async with session.get(gateway.admin_url + "/metrics") as response:
        text = await response.text()
    counts = {}
    for line in text.splitlines():
        if line.startswith("gateway_shadow_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('code="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


async def test_shadow_deny_entries_block_nothing_and_the_audit_and_metric_show_what_they_would_have(
    gateway: GatewayProcess, session: aiohttp.ClientSession, clean_upstream: Upstream, redis_url: str
) -> None:
    admin = AdminClient(session, gateway.admin_url)
    shadow = {"reason": "proposed", "enforce": False}
    await admin.ok("PUT", f"{ENTRIES}/deny-countries/DE", shadow)
    await admin.ok("PUT", f"{ENTRIES}/deny-entities/evil-org", shadow)
    listed = await admin.ok("GET", f"{ENTRIES}/deny-countries")
    assert listed["entries"]["DE"]["enforce"] is False and "enforce" not in listed["entries"]["IR"]
    from_de, evil = hs_token("hans", country="DE"), hs_token("eve", org="evil-org")
    before = await shadow_counts(session, gateway)

    status_de, id_de = await chat(session, gateway, from_de)
    status_evil, id_evil = await chat(session, gateway, evil)
    status_us, id_us = await chat(session, gateway, hs_token("alice"))
    assert (status_de, status_evil, status_us) == (200, 200, 200)
    assert len(clean_upstream.seen) == 3  # the upstream served every one of them

    record_de, record_evil = await audit_of(admin, id_de), await audit_of(admin, id_evil)
    assert record_de["decision"] == "allow" and record_de["shadow"] == {"decision": "block", "code": "country_denied"}
    assert record_evil["shadow"] == {"decision": "block", "code": "entity_denied"}
    assert "shadow" not in await audit_of(admin, id_us)  # the same decision either way: nothing recorded
    after = await shadow_counts(session, gateway)
    assert after["country_denied"] - before.get("country_denied", 0) == 1
    assert after["entity_denied"] - before.get("entity_denied", 0) == 1
    assert after.get("", 0) == before.get("", 0)

    what_if = {"subject": "hans", "org": "acme", "country": "DE", "tier": "partner", "ip": "127.0.0.1"}
    decided = await admin.ok("POST", "/admin/v1/decide", what_if | {"model": "gpt-mock"})
    assert decided["decision"] == "allow" and decided["shadow"]["code"] == "country_denied"
    assert decided["shadow"]["decision"] == "block" and decided["shadow"]["status"] == 451

    # Promoted: blocks within a second on another gateway process too (this one loads the version it
    # wrote before answering), and the change history says it tightened.
    with running_gateway(gateway_config(clean_upstream.url), redis_url=redis_url) as other:
        assert (await chat(session, other, from_de))[0] == 200
        await admin.ok("PATCH", f"{ENTRIES}/deny-countries/DE", {"enforce": True})
        started = time.monotonic()
        await wait_until(lambda: _status_is(session, other, from_de, 451), within=1.0, interval=0.005)
        promoted_in = time.monotonic() - started
    assert (await chat(session, gateway, from_de))[0] == 451
    assert "enforce" not in (await admin.ok("GET", f"{ENTRIES}/deny-countries"))["entries"]["DE"]
    change = (await admin.ok("GET", "/admin/v1/changes?limit=1"))["changes"][0]
    assert change["effect"] == "tighten" and change["after"]["list:deny-countries#DE"].get("enforce") is None
    print(f"shadow entry promoted: enforced by another gateway process in {promoted_in * 1000:.0f} ms")


async def _status_is(session: aiohttp.ClientSession, gateway: GatewayProcess, token: str, status: int) -> bool:
    return (await chat(session, gateway, token))[0] == status


async def test_a_shadow_written_over_a_live_deny_entry_lifts_it_and_is_recorded_as_loosening(
    gateway: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    admin = AdminClient(session, gateway.admin_url)
    old = hs_token("olga", org="old-org")
    assert (await chat(session, gateway, old))[0] == 451
    await admin.ok("PATCH", f"{ENTRIES}/deny-entities/old-org", {"enforce": False})
    change = (await admin.ok("GET", "/admin/v1/changes?limit=1"))["changes"][0]
    assert change["effect"] == "loosen"
    status, request_id = await chat(session, gateway, old)
    assert status == 200
    assert (await audit_of(admin, request_id))["shadow"] == {"decision": "block", "code": "entity_denied"}


async def test_a_shadow_model_suspension_leaves_the_model_served_and_is_recorded(
    gateway: GatewayProcess, session: aiohttp.ClientSession, clean_upstream: Upstream
) -> None:
    admin = AdminClient(session, gateway.admin_url)
    answer = await admin.ok("PATCH", "/admin/v1/models/gpt-mock", {"export_suspended": True, "enforce": False})
    stored = (await admin.ok("GET", "/admin/v1/models/gpt-mock"))["model"]
    assert stored["export_suspended"] is False and stored["shadow"]["export_suspended"] is True
    change = (await admin.ok("GET", "/admin/v1/changes?limit=1"))["changes"][0]
    assert change["effect"] == "tighten" and change["version"] == answer["version"]
    abroad = hs_token("pierre", country="FR")
    status, request_id = await chat(session, gateway, abroad)
    assert status == 200 and len(clean_upstream.seen) == 1
    assert (await audit_of(admin, request_id))["shadow"] == {"decision": "block", "code": "export_suspended"}
    # A home-country caller is decided alike either way.
    status, request_id = await chat(session, gateway, hs_token("alice", country="US"))
    assert status == 200 and "shadow" not in await audit_of(admin, request_id)

    # Promoted with PATCH {"enforce": true}: suspended, the shadow gone.
    await admin.ok("PATCH", "/admin/v1/models/gpt-mock", {"enforce": True})
    stored = (await admin.ok("GET", "/admin/v1/models/gpt-mock"))["model"]
    assert stored["export_suspended"] is True and "shadow" not in stored
    await wait_until(lambda: _status_is(session, gateway, abroad, 451), within=1.0)


async def test_a_shadow_of_a_model_not_in_the_registry_is_refused_naming_enforce(
    gateway: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    admin = AdminClient(session, gateway.admin_url)
    version = await admin.version()
    status, answer = await admin.call("PUT", "/admin/v1/models/new-model", {"stage": "general", "enforce": False})
    assert_error(status, answer, 400, "invalid_request", "enforce")
    status, answer = await admin.call("PUT", f"{ENTRIES}/partners/x", {"reason": "r", "enforce": "false"})
    assert_error(status, answer, 400, "invalid_request", "enforce")
    status, answer = await admin.call("PATCH", "/admin/v1/models/gpt-mock", {"shadow": {"stage": "general"}})
    assert_error(status, answer, 400, "invalid_request", "shadow")
    assert await admin.version() == version  # nothing was written


async def test_shadow_entries_and_model_shadows_survive_export_then_import(
    gateway: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    admin = AdminClient(session, gateway.admin_url)
    await admin.ok("PUT", f"{ENTRIES}/deny-countries/DE", {"reason": "proposed", "enforce": False})
    await admin.ok("PUT", f"{ENTRIES}/partners/newco", {"reason": "proposed", "enforce": False})
    await admin.ok("PATCH", "/admin/v1/models/gpt-mock", {"allowed_countries": ["US"], "enforce": False})
    exported = await admin.ok("GET", "/admin/v1/policy")
    assert exported["lists"]["deny-countries"]["DE"]["enforce"] is False
    await admin.ok("PUT", f"{ENTRIES}/deny-countries", {"entries": {"IR": {"reason": "only"}}})  # clobbered
    await admin.ok("PUT", "/admin/v1/policy", orjson.loads(orjson.dumps(exported)))
    again = await admin.ok("GET", "/admin/v1/policy")
    for document in (exported, again):
        document.pop("version")
    assert again == exported
    assert again["models"]["gpt-mock"]["shadow"]["allowed_countries"] == ["US"]
    # Imported as shadows: still not enforced.
    status, request_id = await chat(session, gateway, hs_token("hans", country="DE"))
    assert status == 200
    assert (await audit_of(admin, request_id))["shadow"]["code"] == "country_denied"


async def test_a_shadow_that_would_allow_what_is_blocked_is_recorded_as_allow(
    gateway: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    admin = AdminClient(session, gateway.admin_url)
    await admin.ok("PATCH", "/admin/v1/models/gpt-mock", {"export_suspended": True})
    await admin.ok("PATCH", "/admin/v1/models/gpt-mock", {"export_suspended": False, "enforce": False})
    before = await shadow_counts(session, gateway)
    status, request_id = await chat(session, gateway, hs_token("pierre", country="FR"))
    assert status == 451  # the live suspension holds
    record = await audit_of(admin, request_id)
    assert record["code"] == "export_suspended" and record["shadow"] == {"decision": "allow", "code": ""}
    assert (await shadow_counts(session, gateway))[""] - before.get("", 0) == 1
    # Discarded: the same request is decided alike again, and nothing is recorded.
    await admin.ok("PATCH", "/admin/v1/models/gpt-mock", {"shadow": None})
    assert "shadow" not in (await admin.ok("GET", "/admin/v1/models/gpt-mock"))["model"]
    status, request_id = await chat(session, gateway, hs_token("pierre", country="FR"))
    assert status == 451 and "shadow" not in await audit_of(admin, request_id)
