"""The two-person rule end to end: two gateway processes on one Redis, two named admin tokens.

With ``admin.approval.required_for: [loosen]`` a loosening write is held as a change request and
changes nothing on either gateway; its proposer cannot approve it; another admin's approval applies
exactly the stored operations on both within a second; tightening writes apply at once; a request
whose target changed since is refused as a conflict; an expired or closed one cannot be approved.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.redis_server import RedisServer

from .support.gateway_process import (
    GatewayProcess,
    first_status,
    gateway_config,
    post_chat,
    seed_policy,
    seeded_gateway,
)
from .support.tokens import admin_tokens_file, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until

ALICE_TOKEN = "approval-test-token-alice-0001"
BOB_TOKEN = "approval-test-token-bobby-0002"
ALICE = {"Authorization": f"Bearer {ALICE_TOKEN}"}
BOB = {"Authorization": f"Bearer {BOB_TOKEN}"}


def _tokens_file(directory: Path) -> Path:
    return admin_tokens_file(directory, {"alice": ALICE_TOKEN, "bob": BOB_TOKEN})


def approval_config(upstream_url: str, tokens: Path, ttl_s: float = 3600) -> dict[str, Any]:
    admin = {"tokens_file": str(tokens), "approval": {"required_for": ["loosen"], "ttl_s": ttl_s}}
    return gateway_config(upstream_url, admin=admin)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tokens_file(tmp_path_factory.mktemp("approval"))


@pytest.fixture(scope="module")
def two_gateways(upstream: Upstream, tokens: Path) -> Iterator[list[GatewayProcess]]:
    with RedisServer() as redis:
        seed_policy(redis.url)
        gateways = [GatewayProcess(approval_config(upstream.url, tokens), redis_url=redis.url) for _ in range(2)]
        try:
            for gateway in gateways:
                gateway.start(wait_ready=False)
            for gateway in gateways:
                gateway.wait_http(gateway.admin_url + "/readyz", 30)
            yield gateways
        finally:
            for gateway in gateways:
                gateway.stop()


@pytest.fixture
async def client() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    client: aiohttp.ClientSession,
    gateway: GatewayProcess,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any = None,
) -> tuple[int, Any]:
    async with client.request(method, gateway.admin_url + path, headers=headers, json=body) as response:
        return response.status, await response.json()


async def version_of(client: aiohttp.ClientSession, gateway: GatewayProcess) -> int:
    status, body = await call(client, gateway, "GET", "/admin/v1/policy", ALICE)
    assert status == 200, body
    return int(body["version"])


async def statuses(client: aiohttp.ClientSession, gateways: list[GatewayProcess], token: str) -> list[int]:
    return [await post_chat(client, gateway, token) for gateway in gateways]


async def test_loosening_is_held_and_applied_on_both_only_once_another_admin_approves(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first, second = two_gateways
    caller = hs_token("approval-sy", country="SY")
    assert await statuses(client, two_gateways, caller) == [200, 200]

    # Tightening applies at once, on both, with no approval.
    status, body = await call(client, first, "PUT", "/admin/v1/lists/deny-countries/SY", ALICE, {"reason": "t"})
    assert status == 200, body
    waits = await asyncio.gather(*(first_status(client, g, caller, 451, within=3) for g in two_gateways))
    assert max(waits) < 1.0, waits
    version = await version_of(client, first)

    async def audited() -> bool:
        _status, body = await call(client, first, "GET", "/admin/v1/audit?limit=200", BOB)
        return any(record["subject"] == "approval-sy" for record in body["records"])

    await wait_until(audited, 5.0)  # the caller is in the trail the impact preview reads
    # Lifting it loosens: 202, a pending request, and nothing changes anywhere.
    status, body = await call(client, first, "DELETE", "/admin/v1/lists/deny-countries/SY", ALICE)
    assert status == 202, body
    request = body["change_request"]
    assert request["status"] == "pending" and request["proposed_by"] == "alice"
    assert request["effect"] == "loosen"
    assert request["change"] == {"method": "DELETE", "path": "/admin/v1/lists/deny-countries/SY", "body": None}
    # It carries its impact: the caller it would let in again, from the audit trail.
    assert {"subject": "approval-sy", "code": "country_denied"}.items() <= next(
        row for row in request["impact"]["would_allow"] if row["subject"] == "approval-sy"
    ).items()
    assert request["created_at"] < request["expires_at"]
    await asyncio.sleep(0.3)
    assert await statuses(client, two_gateways, caller) == [451, 451]
    assert await version_of(client, first) == version
    assert await version_of(client, second) == version

    # Listed as pending on either gateway; the proposer cannot approve it.
    status, listed = await call(client, second, "GET", "/admin/v1/change-requests?status=pending", BOB)
    assert status == 200 and request["id"] in [item["id"] for item in listed["change_requests"]]
    status, body = await call(client, second, "POST", f"/admin/v1/change-requests/{request['id']}/approve", ALICE)
    assert status == 403 and body["error"]["code"] == "approval_self", body
    assert await statuses(client, two_gateways, caller) == [451, 451]

    # Another admin approves it, through the other gateway: applied on both within a second.
    status, body = await call(client, second, "POST", f"/admin/v1/change-requests/{request['id']}/approve", BOB)
    assert status == 200, body
    assert body["version"] == version + 1
    assert body["change_request"]["status"] == "applied" and body["change_request"]["approved_by"] == "bob"
    waits = await asyncio.gather(*(first_status(client, g, caller, 200, within=3) for g in two_gateways))
    assert max(waits) < 1.0, waits

    # Approving again is refused; the history names proposer and approver.
    status, body = await call(client, first, "POST", f"/admin/v1/change-requests/{request['id']}/approve", BOB)
    assert status == 409 and body["error"]["code"] == "change_closed", body
    status, history = await call(client, first, "GET", "/admin/v1/changes?limit=20", ALICE)
    applied = next(c for c in history["changes"] if c.get("version") == version + 1 and c["target"].startswith("lists"))
    assert applied["target"] == "lists/deny-countries/SY"
    assert (applied["proposed_by"], applied["approved_by"], applied["actor"]) == ("alice", "bob", "bob")
    assert applied["change_request"] == request["id"] and applied["effect"] == "loosen"
    proposal = next(c for c in history["changes"] if c["target"] == f"change-requests/{request['id']}")
    assert proposal["actor"] == "alice" and proposal["status"] == "pending"


async def test_a_change_since_the_proposal_makes_approval_a_conflict(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first, second = two_gateways
    path = "/admin/v1/lists/deny-entities/conflict-corp"
    status, body = await call(client, first, "PUT", path, ALICE, {"reason": "sanctioned"})
    assert status == 200, body
    status, body = await call(client, first, "DELETE", path, ALICE)
    assert status == 202, body
    request_id = body["change_request"]["id"]
    # Meanwhile someone tightens the same entry (a new reason applies at once).
    status, body = await call(client, second, "PATCH", path, BOB, {"reason": "sanctioned, confirmed"})
    assert status == 200, body
    version = body["version"]
    status, body = await call(client, second, "POST", f"/admin/v1/change-requests/{request_id}/approve", BOB)
    assert status == 409 and body["error"]["code"] == "change_conflict", body
    assert "deny-entities#conflict-corp" in body["error"]["message"]
    # Nothing changed: the entry is there, the version is the same, the request is still pending.
    status, body = await call(client, first, "GET", "/admin/v1/lists/deny-entities", ALICE)
    assert "conflict-corp" in body["entries"] and body["version"] == version
    status, body = await call(client, first, "GET", f"/admin/v1/change-requests/{request_id}", ALICE)
    assert body["change_request"]["status"] == "pending"


async def test_approval_applies_exactly_the_stored_operations(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first, second = two_gateways
    path = "/admin/v1/lists/partners/stored-ops-lab"
    status, body = await call(client, first, "PUT", path, ALICE, {"reason": "evaluation", "source": "ticket-1"})
    assert status == 202, body
    request_id = body["change_request"]["id"]
    status, body = await call(client, second, "GET", f"/admin/v1/change-requests/{request_id}", BOB)
    assert status == 200, body
    (op,) = body["change_request"]["ops"]
    assert op["op"] == "hset" and op["field"] == "stored-ops-lab"
    stored = op["value"]
    assert stored["added_by"] == "alice" and stored["reason"] == "evaluation"
    await asyncio.sleep(1.1)  # a re-planned write would carry a later added_at
    status, body = await call(client, second, "POST", f"/admin/v1/change-requests/{request_id}/approve", BOB)
    assert status == 200, body
    status, body = await call(client, first, "GET", "/admin/v1/lists/partners", ALICE)
    # The value proposed by alice, as stored then: not re-validated or re-stamped by bob's approval.
    assert body["entries"]["stored-ops-lab"] == stored


async def test_reject_and_withdraw_close_a_request_unapplied(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first, second = two_gateways
    version = await version_of(client, first)
    status, body = await call(client, first, "PUT", "/admin/v1/lists/partners/rejected-lab", ALICE, {"reason": "r"})
    assert status == 202, body
    rejected = body["change_request"]["id"]
    status, body = await call(
        client, second, "POST", f"/admin/v1/change-requests/{rejected}/reject", BOB, {"reason": "no contract yet"}
    )
    assert status == 200, body
    assert body["change_request"]["status"] == "rejected" and body["change_request"]["rejected_by"] == "bob"
    assert body["change_request"]["reason"] == "no contract yet"
    status, body = await call(client, first, "POST", f"/admin/v1/change-requests/{rejected}/approve", BOB)
    assert status == 409 and body["error"]["code"] == "change_closed", body
    # The proposer may withdraw their own.
    status, body = await call(client, first, "PUT", "/admin/v1/lists/partners/withdrawn-lab", BOB, {"reason": "w"})
    assert status == 202, body
    withdrawn = body["change_request"]["id"]
    status, body = await call(client, first, "POST", f"/admin/v1/change-requests/{withdrawn}/reject", BOB)
    assert status == 200 and body["change_request"]["status"] == "rejected", body
    status, body = await call(client, first, "GET", "/admin/v1/lists/partners", ALICE)
    assert "rejected-lab" not in body["entries"] and "withdrawn-lab" not in body["entries"]
    assert await version_of(client, second) == version  # proposals and rejections bump no version
    status, listed = await call(client, first, "GET", "/admin/v1/change-requests?status=rejected&limit=1000", ALICE)
    ids = [item["id"] for item in listed["change_requests"]]
    assert {rejected, withdrawn} <= set(ids) and ids.index(withdrawn) < ids.index(rejected)  # newest first
    status, body = await call(client, first, "POST", "/admin/v1/change-requests/cr_nope/reject", ALICE)
    assert status == 404 and body["error"]["code"] == "not_found", body


async def test_an_api_key_held_for_approval_works_once_approved(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first, second = two_gateways
    status, body = await call(
        client,
        first,
        "POST",
        "/admin/v1/api-keys",
        ALICE,
        {"subject": "held-svc", "org": "acme", "country": "US", "tier": "partner"},
    )
    assert status == 202, body
    key_id, key, request = body["id"], body["key"], body["change_request"]
    assert key_id.startswith("key_") and key
    status, shown = await call(client, first, "GET", f"/admin/v1/change-requests/{request['id']}", ALICE)
    assert key not in str(shown)  # only the key's hash is held
    assert [await post_chat(client, g, key) for g in two_gateways] == [401, 401]
    status, body = await call(client, second, "POST", f"/admin/v1/change-requests/{request['id']}/approve", BOB)
    assert status == 200, body
    waits = await asyncio.gather(*(first_status(client, g, key, 200, within=3) for g in two_gateways))
    assert max(waits) < 1.0, waits
    status, body = await call(client, first, "GET", "/admin/v1/api-keys", ALICE)
    assert body["api_keys"][key_id]["created_by"] == "alice"


async def test_impact_preview_resolves_the_change_and_lists_the_recent_callers_it_would_affect(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first, second = two_gateways
    version = await version_of(client, first)
    # Real traffic from callers in three countries (through both gateways), and from a denied one.
    run = os.urandom(3).hex()
    callers = {country: [f"imp-{run}-{country}-{i}" for i in range(3)] for country in ("FR", "DE", "JP", "IR")}
    for country, subjects in callers.items():
        for i, subject in enumerate(subjects):
            status = await post_chat(client, (first, second)[i % 2], hs_token(subject, country=country))
            assert status == (451 if country == "IR" else 200), (country, status)
    ours = {subject for subjects in callers.values() for subject in subjects}

    async def audited() -> bool:
        _status, body = await call(client, first, "GET", "/admin/v1/audit?limit=500", BOB)
        return ours <= {record["subject"] for record in body["records"]}

    await wait_until(audited, 5.0)

    def rows(answer: dict[str, Any], kind: str) -> dict[str, str]:
        return {row["subject"]: row["code"] for row in answer[kind] if row["subject"] in ours}

    # Denying one of the three countries would block exactly its callers.
    deny_de = {"method": "PUT", "path": "/admin/v1/lists/deny-countries/DE", "body": {"reason": "preview"}}
    status, body = await call(client, first, "POST", "/admin/v1/impact", ALICE, {"change": deny_de, "hours": 1})
    assert status == 200, body
    assert rows(body, "would_block") == dict.fromkeys(callers["DE"], "country_denied")
    assert rows(body, "would_allow") == {}
    assert body["complete"] is True and body["effect"] == "tighten"
    # Lifting a deny would allow the callers it blocked; as a loosening write it is held, and its change
    # request carries the same impact.
    lift_ir = {"method": "DELETE", "path": "/admin/v1/lists/deny-countries/IR", "body": None}
    status, body = await call(client, first, "POST", "/admin/v1/impact", ALICE, {"change": lift_ir, "hours": 1})
    assert status == 200, body
    assert rows(body, "would_allow") == dict.fromkeys(callers["IR"], "country_denied")
    assert rows(body, "would_block") == {}
    status, held = await call(client, first, "DELETE", "/admin/v1/lists/deny-countries/IR", ALICE)
    assert status == 202, held
    assert rows(held["change_request"]["impact"], "would_allow") == dict.fromkeys(callers["IR"], "country_denied")
    reject = f"/admin/v1/change-requests/{held['change_request']['id']}/reject"
    status, _ = await call(client, first, "POST", reject, ALICE)
    assert status == 200
    # The change is resolved first, as its write would be: a delete of nothing is a 404, a bad body a 400.
    missing = {"method": "DELETE", "path": "/admin/v1/lists/deny-countries/NO", "body": None}
    status, body = await call(client, first, "POST", "/admin/v1/impact", ALICE, {"change": missing})
    assert status == 404, body
    bad = {"method": "PUT", "path": "/admin/v1/lists/deny-countries/CU", "body": {"nope": 1}}
    status, body = await call(client, first, "POST", "/admin/v1/impact", ALICE, {"change": bad})
    assert status == 400 and "nope" in body["error"]["message"], body
    status, body = await call(
        client, first, "POST", "/admin/v1/impact", ALICE, {"change": {"method": "GET", "path": "/admin/v1/policy"}}
    )
    assert status == 400 and body["error"]["message"].startswith("change.method:"), body
    assert await version_of(client, first) == version


def test_an_expired_request_cannot_be_approved(upstream: Upstream, tmp_path: Path) -> None:
    config = approval_config(upstream.url, _tokens_file(tmp_path), ttl_s=1)
    with seeded_gateway(config) as gateway:

        async def run() -> None:
            async with aiohttp.ClientSession() as client:
                path = "/admin/v1/lists/deny-countries/IR"
                status, body = await call(client, gateway, "DELETE", path, ALICE)
                assert status == 202, body
                request_id = body["change_request"]["id"]
                await asyncio.sleep(1.2)
                status, body = await call(client, gateway, "GET", f"/admin/v1/change-requests/{request_id}", BOB)
                assert body["change_request"]["status"] == "expired"
                status, body = await call(
                    client, gateway, "POST", f"/admin/v1/change-requests/{request_id}/approve", BOB
                )
                assert status == 409 and body["error"]["code"] == "change_expired", body
                status, body = await call(client, gateway, "GET", "/admin/v1/lists/deny-countries", BOB)
                assert "IR" in body["entries"]
                assert await post_chat(client, gateway, hs_token("expiry-ir", country="IR")) == 451

        started = time.monotonic()
        asyncio.run(run())
        assert time.monotonic() - started < 30


def run_cli(gateway: GatewayProcess, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_ADMIN")}
    env.update({"GATEWAY_ADMIN_URL": gateway.admin_url, "GATEWAY_ADMIN_TOKEN": token})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_proposes_lists_approves_and_rejects(two_gateways: list[GatewayProcess]) -> None:
    first, second = two_gateways
    # A loosening write through the CLI: held, exit 0, and it says so.
    held = run_cli(first, ALICE_TOKEN, "lists", "put", "partners", "cli-lab", "--reason", "pilot")
    assert held.returncode == 0, held.stderr
    assert "awaits approval" in held.stdout and "effect loosen" in held.stdout
    request_id = held.stdout.split("change request ", 1)[1].split()[0]
    held_json = run_cli(first, ALICE_TOKEN, "lists", "put", "partners", "cli-lab-2", "--reason", "pilot", "--json")
    assert held_json.returncode == 0, held_json.stderr
    second_id = json.loads(held_json.stdout)["change_request"]["id"]

    listed = run_cli(second, BOB_TOKEN, "changes", "pending")
    assert listed.returncode == 0, listed.stderr
    assert request_id in listed.stdout and second_id in listed.stdout and "PROPOSED BY" in listed.stdout
    pending = json.loads(run_cli(second, BOB_TOKEN, "changes", "pending", "--json").stdout)
    assert {request_id, second_id} <= {r["id"] for r in pending["change_requests"]}
    assert all(r["status"] == "pending" for r in pending["change_requests"])

    # The proposer cannot approve: non-zero exit naming the refusal.
    own = run_cli(first, ALICE_TOKEN, "changes", "approve", request_id)
    assert own.returncode == 1 and "approval_self" in own.stderr
    approved = run_cli(second, BOB_TOKEN, "changes", "approve", request_id)
    assert approved.returncode == 0, approved.stderr
    assert "approved by bob" in approved.stdout and "proposed by alice" in approved.stdout
    rejected = run_cli(second, BOB_TOKEN, "changes", "reject", second_id, "--reason", "not yet", "--json")
    assert rejected.returncode == 0, rejected.stderr
    assert json.loads(rejected.stdout)["change_request"]["status"] == "rejected"
    again = run_cli(second, BOB_TOKEN, "changes", "approve", second_id)
    assert again.returncode == 1 and "change_closed" in again.stderr

    partners = json.loads(run_cli(first, ALICE_TOKEN, "lists", "get", "partners", "--json").stdout)["entries"]
    assert "cli-lab" in partners and "cli-lab-2" not in partners
    # The history command still works, and shows the approval.
    history = run_cli(first, ALICE_TOKEN, "changes", "--limit", "10")
    assert history.returncode == 0 and "lists/partners/cli-lab" in history.stdout

    # --preview prints the impact (on stderr) before it writes.
    preview = run_cli(first, ALICE_TOKEN, "lists", "put", "deny-countries", "AQ", "--reason", "x", "--preview")
    assert preview.returncode == 0, preview.stderr
    assert "impact preview (tighten)" in preview.stderr and "would be blocked" in preview.stderr
    countries = json.loads(run_cli(first, ALICE_TOKEN, "lists", "get", "deny-countries", "--json").stdout)
    assert "AQ" in countries["entries"]


async def test_a_reason_given_with_a_write_is_kept_in_the_request_and_the_history(
    client: aiohttp.ClientSession, two_gateways: list[GatewayProcess]
) -> None:
    first = two_gateways[0]
    why = "Licence D-2026-117 granted to the lab"
    path = "/admin/v1/lists/partners/reason-lab?reason=" + why.replace(" ", "%20")
    status, body = await call(client, first, "PUT", path, ALICE, {"reason": "pilot"})
    assert status == 202, body
    request_id = body["change_request"]["id"]
    status, body = await call(client, first, "GET", f"/admin/v1/change-requests/{request_id}", BOB)
    assert body["change_request"]["reason"] == why
    status, body = await call(client, first, "POST", f"/admin/v1/change-requests/{request_id}/approve", BOB)
    assert status == 200, body
    status, body = await call(client, first, "GET", "/admin/v1/changes?limit=20", BOB)
    applied = next(c for c in body["changes"] if c["target"] == "lists/partners/reason-lab")
    assert (applied["reason"], applied["proposed_by"], applied["approved_by"]) == (why, "alice", "bob")
    # Too long a reason is refused naming it, and nothing is proposed.
    status, body = await call(client, first, "DELETE", "/admin/v1/lists/deny-countries/IR?reason=" + "x" * 1001, ALICE)
    assert status == 400 and "reason" in body["error"]["message"], body
