"""Operators' documented commands must never reopen access (docs/contract.md §6-7).

Through real gateway processes, a real Redis and the real ``gateway`` command:
PATCH changes only what it names (suspend then lift keeps a model's countries),
revocations survive a rollback, an ``expires_at`` in the past is refused, risky
writes answer with warnings, a restore into an empty Redis must carry every
section, and the admin API's refusals say what to do. The pure parts (merge
patch, warning classification, expired entries in an import) are table-tested
at the end.
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
import orjson
import pytest
import redis as redis_sync
import yaml
from yarl import URL

from gateway.policy.validate import (
    PolicyValidationError,
    document_warnings,
    drop_expired,
    entry_warnings,
    merge_patch,
    missing_parts,
    model_warnings,
    policy_diff,
    validate_entry,
)
from gateway.redis_server import RedisServer

from .support.gateway_process import (
    ADMIN_TOKEN,
    BASE_POLICY,
    ROOT,
    GatewayProcess,
    example_policy_file,
    gateway_config,
    seed_policy,
)
from .support.tokens import hs_token
from .support.upstream import Upstream

_SCRIPT = Path(sys.executable).parent / "gateway"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]
ALLOWED = ["GB", "JP", "US"]  # stored sorted
FRONTIER = {"stage": "general", "timeline": [], "allowed_countries": ALLOWED, "export_suspended": False}
POLICY: dict[str, Any] = {
    **BASE_POLICY,
    "models": {**BASE_POLICY["models"], "frontier-x": FRONTIER},
    "api_keys": {},
    "screening": {"entries": []},
}
PAST = "2020-01-01T00:00:00Z"
FUTURE = "2099-01-01T00:00:00Z"


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_upstream() -> Iterator[Upstream]:
    """An upstream of this module's own, so what it received is what this module sent."""
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def gw(own_upstream: Upstream) -> Iterator[GatewayProcess]:
    """A gateway on a Redis of its own holding :data:`POLICY` (each test changes it freely)."""
    with RedisServer() as redis:
        seed_policy(redis.url, POLICY)
        process = GatewayProcess(gateway_config(own_upstream.url), redis_url=redis.url).start()
        try:
            yield process
        finally:
            process.stop()


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as client:
        yield client


def cli(gateway: GatewayProcess, *args: str, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_ADMIN")}
    env.update({"GATEWAY_ADMIN_URL": gateway.admin_url, "GATEWAY_ADMIN_TOKEN": token})
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def cli_ok(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    result = cli(gateway, *args)
    assert result.returncode == 0, f"{args}: {result.stdout} {result.stderr}"
    return result


def cli_fails(gateway: GatewayProcess, *args: str) -> str:
    result = cli(gateway, *args)
    assert result.returncode != 0, f"{args}: {result.stdout}"
    assert result.stderr.strip()
    return result.stderr


async def call(
    session: aiohttp.ClientSession,
    gateway: GatewayProcess,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = ADMIN_TOKEN,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = None if body is None else orjson.dumps(body)
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with session.request(
        method, URL(gateway.admin_url + path, encoded=True), data=data, headers=headers
    ) as response:
        return response.status, orjson.loads(await response.read())


async def ok(session: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, body: Any = None) -> Any:
    status, answer = await call(session, gateway, method, path, body)
    assert status == 200, answer
    return answer


def assert_error(status: int, answer: Any, expected: int, code: str, field: str | None = None) -> str:
    assert status == expected, answer
    error = answer["error"]
    assert error["code"] == code, error
    assert error["request_id"] and error["type"]
    if field is not None:
        assert error["message"].startswith(f"{field}:"), error["message"]
    return str(error["message"])


async def chat(
    session: aiohttp.ClientSession, gateway: GatewayProcess, token: str, model: str = "gpt-mock"
) -> tuple[int, str]:
    async with session.post(
        gateway.url + "/v1/chat/completions",
        json={"model": model, "messages": []},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        await response.read()
        return response.status, response.headers.get("X-Gateway-Reason", "")


def upstream_saw(upstream: Upstream, needle: bytes) -> bool:
    return any(needle in seen.body for seen in upstream.seen)


async def policy(session: aiohttp.ClientSession, gateway: GatewayProcess) -> Any:
    return await ok(session, gateway, "GET", "/admin/v1/policy")


# --- 11: PATCH, and the suspend / lift commands ---------------------------------------------


async def test_suspend_then_lift_through_the_cli_keeps_allowed_countries(
    gw: GatewayProcess, own_upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    own_upstream.reset()
    cn, us = hs_token("cn-caller", country="CN"), hs_token("us-caller", country="US")
    assert await chat(session, gw, cn, "frontier-x") == (451, "export_restricted")
    cli_ok(gw, "models", "suspend", "frontier-x")
    model = (await ok(session, gw, "GET", "/admin/v1/models/frontier-x"))["model"]
    assert model["export_suspended"] is True and model["allowed_countries"] == ALLOWED
    assert (await chat(session, gw, cn, "frontier-x"))[0] == 451
    cli_ok(gw, "models", "lift", "frontier-x")
    model = (await ok(session, gw, "GET", "/admin/v1/models/frontier-x"))["model"]
    assert model == FRONTIER
    # The finding: after suspend and lift a CN caller was served frontier-x.
    assert await chat(session, gw, cn, "frontier-x") == (451, "export_restricted")
    assert not upstream_saw(own_upstream, b"frontier-x")
    assert await chat(session, gw, us, "frontier-x") == (200, "")  # the model itself still serves
    assert upstream_saw(own_upstream, b"frontier-x")


async def test_models_patch_changes_only_what_it_names(gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
    result = cli_ok(gw, "models", "patch", "frontier-x", "--export-suspended", "--json")
    assert json.loads(result.stdout)["version"] > 0
    result = cli_ok(gw, "models", "patch", "frontier-x", "--stage", "partners", "--no-export-suspended")
    assert "changed (stage, export_suspended)" in result.stdout
    model = (await ok(session, gw, "GET", "/admin/v1/models/frontier-x"))["model"]
    assert model == {**FRONTIER, "stage": "partners"}
    # A merge patch's null removes the restriction (null = any country).
    cli_ok(gw, "models", "patch", "frontier-x", "--any-country")
    assert (await ok(session, gw, "GET", "/admin/v1/models/frontier-x"))["model"]["allowed_countries"] is None
    assert "nothing to change" in cli_fails(gw, "models", "patch", "frontier-x")


async def test_models_put_says_it_replaces_whole(gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
    help_text = cli_ok(gw, "models", "--help").stdout + cli_ok(gw, "models", "put", "--help").stdout
    assert "REPLACE one whole" in " ".join(help_text.split())
    result = cli_ok(gw, "models", "put", "frontier-x", "--stage", "general", "--export-suspended")
    assert "replaced whole" in result.stdout
    assert "replaces frontier-x whole" in result.stderr and "--allowed-countries" in result.stderr
    assert "models patch" in result.stderr
    # PUT still replaces whole: that is what it says it does.
    assert (await ok(session, gw, "GET", "/admin/v1/models/frontier-x"))["model"]["allowed_countries"] is None


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/admin/v1/models/frontier-x", {"stage": "beta"}, "stage"),
        ("/admin/v1/models/frontier-x", {"stage": None}, "stage"),  # null removes a required field
        ("/admin/v1/models/frontier-x", {"allowed_countries": ["XX"]}, "allowed_countries[0]"),
        ("/admin/v1/models/frontier-x", {"export_suspended": "yes"}, "export_suspended"),
        ("/admin/v1/models/frontier-x", {"colour": "red"}, "colour"),
        ("/admin/v1/models/frontier-x", {}, "body"),
        ("/admin/v1/models/frontier-x", [1], "body"),
        ("/admin/v1/lists/deny-countries/IR", {"reason": ""}, "reason"),
        ("/admin/v1/lists/deny-countries/IR", {"reason": None}, "reason"),
        ("/admin/v1/lists/deny-countries/IR", {"expires_at": PAST}, "expires_at"),
        ("/admin/v1/lists/deny-countries/IR", {"added_by": "someone"}, "added_by"),
        ("/admin/v1/lists/deny-countries/IR", {"country": "US"}, "country"),
    ],
)
async def test_patch_bad_input_is_400_naming_the_field_and_changes_nothing(
    gw: GatewayProcess, session: aiohttp.ClientSession, path: str, body: Any, field: str
) -> None:
    before = await policy(session, gw)
    status, answer = await call(session, gw, "PATCH", path, body)
    assert_error(status, answer, 400, "invalid_request", field)
    assert await policy(session, gw) == before


async def test_patch_of_something_absent_is_404(gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
    before = await policy(session, gw)
    status, answer = await call(session, gw, "PATCH", "/admin/v1/models/no-such-model", {"export_suspended": True})
    assert "no-such-model" in assert_error(status, answer, 404, "not_found")
    status, answer = await call(session, gw, "PATCH", "/admin/v1/lists/deny-countries/CU", {"reason": "x"})
    assert "CU" in assert_error(status, answer, 404, "not_found")
    assert await policy(session, gw) == before


async def test_lists_patch_keeps_the_fields_it_does_not_name(
    gw: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    await ok(
        session,
        gw,
        "PUT",
        "/admin/v1/lists/ip-ranges/198.51.100.0%2F24",
        {"reason": "office", "source": "it", "country": "GB", "expires_at": FUTURE},
    )
    cli_ok(gw, "lists", "patch", "ip-ranges", "198.51.100.0/24", "--reason", "office NAT")
    entry = (await ok(session, gw, "GET", "/admin/v1/lists/ip-ranges"))["entries"]["198.51.100.0/24"]
    assert (entry["reason"], entry["source"], entry["country"], entry["expires_at"]) == (
        "office NAT",
        "it",
        "GB",
        FUTURE,
    )
    cli_ok(gw, "lists", "patch", "ip-ranges", "198.51.100.0/24", "--no-expiry")
    entry = (await ok(session, gw, "GET", "/admin/v1/lists/ip-ranges"))["entries"]["198.51.100.0/24"]
    assert entry["expires_at"] is None and entry["country"] == "GB"


async def test_concurrent_patches_lose_no_update(gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
    """Each patch is merged with the value it replaces (WATCH on the version): run together, all land."""
    for round_ in range(5):
        countries = ["US", "DE"] if round_ % 2 else ["US", "FR"]
        patches = [
            {"export_suspended": bool(round_ % 2)},
            {"allowed_countries": countries},
            {"stage": "partners" if round_ % 2 else "general"},
            {"timeline": [{"at": f"209{round_}-01-01T00:00:00Z", "stage": "general"}]},
        ]
        answers = await asyncio.gather(
            *(call(session, gw, "PATCH", "/admin/v1/models/frontier-x", patch) for patch in patches)
        )
        assert all(status == 200 for status, _ in answers), answers
        model = (await ok(session, gw, "GET", "/admin/v1/models/frontier-x"))["model"]
        assert model == {
            "stage": "partners" if round_ % 2 else "general",
            "export_suspended": bool(round_ % 2),
            "allowed_countries": sorted(countries),
            "timeline": [{"at": f"209{round_}-01-01T00:00:00Z", "stage": "general"}],
        }


# --- 12: revocations stick ------------------------------------------------------------------


async def test_documented_rollback_does_not_revive_a_revoked_key(
    gw: GatewayProcess, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    issued = await ok(
        session,
        gw,
        "POST",
        "/admin/v1/api-keys",
        {"subject": "svc-rollback", "org": "acme", "country": "US", "tier": "partner"},
    )
    key_id, key = issued["id"], issued["key"]
    assert await chat(session, gw, key) == (200, "")
    before = tmp_path / "before.yaml"
    cli_ok(gw, "policy", "export", str(before))
    assert key_id in yaml.safe_load(before.read_text())["api_keys"]
    cli_ok(gw, "keys", "revoke", key_id)
    assert (await chat(session, gw, key))[0] == 401
    # The documented rollback: import the export taken before the change.
    result = cli_ok(gw, "policy", "import", str(before))
    assert (await chat(session, gw, key))[0] == 401
    assert "warning: api_keys: not imported; the live api_keys are kept" in result.stderr
    exported = await policy(session, gw)
    assert key_id not in exported["api_keys"]
    revocation = exported["revoked_api_keys"][key_id]
    assert revocation["revoked_by"] == "admin" and revocation["revoked_at"].endswith("Z")
    # Naming api_keys explicitly: refused, nothing changes.
    version = exported["version"]
    stderr = cli_fails(gw, "policy", "import", str(before), "--sections", "api_keys")
    assert "409 key_revoked" in stderr and key_id in stderr
    status, answer = await call(
        session,
        gw,
        "PUT",
        "/admin/v1/policy?sections=lists,models,api_keys,screening",
        yaml.safe_load(before.read_text()),
    )
    assert_error(status, answer, 409, "key_revoked")
    assert answer["error"]["type"] == "invalid_request_error"
    # Under another id, the same hash is the same key: refused too.
    document = yaml.safe_load(before.read_text())
    document["api_keys"] = {"key_renamed": document["api_keys"][key_id]}
    status, answer = await call(session, gw, "PUT", "/admin/v1/policy?sections=api_keys", document)
    assert_error(status, answer, 409, "key_revoked")
    assert (await policy(session, gw))["version"] == version
    assert (await chat(session, gw, key))[0] == 401
    # An import that does name api_keys and leaves the revoked key out goes through.
    document["api_keys"] = {}
    await ok(session, gw, "PUT", "/admin/v1/policy?sections=api_keys", document)
    # Revoking it again is 404: it is gone.
    status, answer = await call(session, gw, "DELETE", f"/admin/v1/api-keys/{key_id}")
    assert_error(status, answer, 404, "not_found")


async def test_revocations_travel_with_an_export_into_an_empty_redis(
    gw: GatewayProcess, own_upstream: Upstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    issued = await ok(
        session,
        gw,
        "POST",
        "/admin/v1/api-keys",
        {"subject": "svc-old", "org": "acme", "country": "US", "tier": "partner"},
    )
    old_export = await policy(session, gw)
    await ok(session, gw, "DELETE", f"/admin/v1/api-keys/{issued['id']}")
    after = tmp_path / "after.yaml"
    cli_ok(gw, "policy", "export", str(after))
    with RedisServer() as redis:
        restored = GatewayProcess(gateway_config(own_upstream.url), redis_url=redis.url).start(wait_ready=False)
        try:
            cli_ok(restored, "policy", "import", str(after))
            assert issued["id"] in (await policy(session, restored))["revoked_api_keys"]
            # The older export, which still holds the key, cannot bring it back.
            old_export.pop("version")
            status, answer = await call(session, restored, "PUT", "/admin/v1/policy?sections=api_keys", old_export)
            assert_error(status, answer, 409, "key_revoked")
            assert (await chat(session, restored, issued["key"]))[0] == 401
        finally:
            restored.stop()


# --- 13: expires_at in the past, and warnings -----------------------------------------------


async def test_expired_write_does_not_replace_an_active_deny_entry(
    gw: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    ir = hs_token("ir-caller", country="IR")
    assert await chat(session, gw, ir) == (451, "country_denied")
    before = await policy(session, gw)
    for method, path, body, field in [
        ("PUT", "/admin/v1/lists/deny-countries/IR", {"reason": "r", "expires_at": PAST}, "expires_at"),
        ("PATCH", "/admin/v1/lists/deny-countries/IR", {"expires_at": PAST}, "expires_at"),
        (
            "PUT",
            "/admin/v1/lists/deny-countries",
            {"entries": {"IR": {"reason": "r", "expires_at": PAST}}},
            "entries.IR.expires_at",
        ),
        (
            "POST",
            "/admin/v1/api-keys",
            {"subject": "s", "org": "o", "country": "US", "tier": "partner", "expires_at": PAST},
            "expires_at",
        ),
    ]:
        status, answer = await call(session, gw, method, path, body)
        message = assert_error(status, answer, 400, "invalid_request", field)
        assert "not in the future" in message
    assert await policy(session, gw) == before
    assert await chat(session, gw, ir) == (451, "country_denied")
    stderr = cli_fails(gw, "lists", "put", "deny-countries", "IR", "--reason", "r", "--expires-at", PAST)
    assert "expires_at" in stderr and "not in the future" in stderr
    assert await chat(session, gw, ir) == (451, "country_denied")


async def test_risky_writes_succeed_with_warnings(gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
    cases = [
        ("PUT", "/admin/v1/lists/deny-countries/US", {"reason": "mistake?"}, "home country"),
        ("PUT", "/admin/v1/lists/ip-ranges/0.0.0.0%2F0", {"reason": "all", "country": "US"}, "wider than /8"),
        ("PUT", "/admin/v1/lists/ip-ranges/2001:db8::%2F16", {"reason": "v6", "country": "US"}, "wider than /32"),
        ("PUT", "/admin/v1/lists/deny-entities/acme", {"reason": "r"}, "current partner"),
        ("PATCH", "/admin/v1/models/frontier-x", {"allowed_countries": []}, "allowed_countries is empty"),
        (
            "PUT",
            "/admin/v1/models/frontier-x",
            {"stage": "general", "allowed_countries": []},
            "allowed_countries is empty",
        ),
    ]
    for method, path, body, needle in cases:
        answer = await ok(session, gw, method, path, body)
        assert any(needle in warning for warning in answer["warnings"]), (path, answer)
    # Ordinary writes carry none.
    answer = await ok(session, gw, "PUT", "/admin/v1/lists/deny-countries/CU", {"reason": "embargo"})
    assert "warnings" not in answer
    # The CLI prints them on stderr, with --json too (where stdout holds them as well).
    result = cli_ok(gw, "lists", "put", "deny-countries", "US-CA", "--reason", "r", "--json")
    assert "home country" in json.loads(result.stdout)["warnings"][0]
    assert "gateway: warning: deny-countries US-CA" in result.stderr
    result = cli_ok(gw, "models", "patch", "frontier-x", "--allowed-countries", "")
    assert "warning: models frontier-x: allowed_countries is empty" in result.stderr
    # An import warns of the same risks.
    document = {"lists": {"ip-ranges": {"0.0.0.0/0": {"reason": "x", "country": "US"}}}}
    answer = await ok(session, gw, "PUT", "/admin/v1/policy", document)
    assert any("wider than /8" in warning for warning in answer["warnings"])


async def test_an_import_drops_expired_entries_with_a_warning(
    gw: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    document = {"lists": {"partners": {"acme": {"reason": "p"}, "old": {"reason": "gone", "expires_at": PAST}}}}
    answer = await ok(session, gw, "PUT", "/admin/v1/policy", document)
    assert answer["warnings"] == [f"lists.partners.old: expired at {PAST}; not imported"]
    assert set((await policy(session, gw))["lists"]["partners"]) == {"acme"}


# --- 15: a restore must be whole ------------------------------------------------------------


async def test_partial_restore_after_flushall_is_refused_and_serves_nothing(
    gw: GatewayProcess, own_upstream: Upstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    ir, us = hs_token("ir-caller", country="IR"), hs_token("us-caller", country="US")
    whole = tmp_path / "whole.yaml"
    cli_ok(gw, "policy", "export", str(whole))
    exported = await policy(session, gw)
    client = redis_sync.Redis.from_url(gw.config["redis"]["url"])
    try:
        client.flushall()
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while (await chat(session, gw, us))[0] != 503:
        assert time.monotonic() < deadline, "the gateway never noticed the emptied Redis"
        await asyncio.sleep(0.05)
    models_only = tmp_path / "models.yaml"
    models_only.write_text(yaml.safe_dump({"models": POLICY["models"]}))
    stderr = cli_fails(gw, "policy", "import", str(models_only))
    assert "409 policy_incomplete" in stderr
    for part in ("lists.deny-countries", "lists.partners", "api_keys", "screening"):
        assert part in stderr
    for body in (
        {},
        {"models": POLICY["models"]},
        {k: v for k, v in POLICY.items() if k != "screening"},
        {**POLICY, "lists": {k: v for k, v in POLICY["lists"].items() if k != "ip-ranges"}},
    ):
        status, answer = await call(session, gw, "PUT", "/admin/v1/policy", body)
        assert_error(status, answer, 409, "policy_incomplete")
    # ?sections= cannot make a restore partial: into an empty Redis the whole document is written.
    status, answer = await call(session, gw, "PUT", "/admin/v1/policy?sections=models", {"models": POLICY["models"]})
    assert_error(status, answer, 409, "policy_incomplete")
    own_upstream.reset()
    for _ in range(5):
        assert (await chat(session, gw, ir))[0] == 503
        assert (await chat(session, gw, us))[0] == 503
    assert own_upstream.seen == []
    async with session.get(gw.admin_url + "/readyz") as response:
        assert response.status == 503
    check = redis_sync.Redis.from_url(gw.config["redis"]["url"])
    try:
        assert check.keys("{gw}:*") == []  # nothing of the policy was written (the audit trail was)
    finally:
        check.close()
    # No policy loaded: reads say so and say how to restore.
    status, answer = await call(session, gw, "GET", "/admin/v1/policy")
    message = assert_error(status, answer, 409, "policy_missing")
    assert "No policy is loaded" in message and "gateway policy import" in message
    # The whole export restores: ready, the deny list enforced, everything as it was.
    cli_ok(gw, "policy", "import", str(whole))
    async with session.get(gw.admin_url + "/readyz") as response:
        assert response.status == 200
    assert await chat(session, gw, ir) == (451, "country_denied")
    assert await chat(session, gw, us) == (200, "")
    restored = await policy(session, gw)
    assert {k: v for k, v in restored.items() if k != "version"} == {
        k: v for k, v in exported.items() if k != "version"
    }


def test_export_holds_every_section(gw: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "export.yaml"
    cli_ok(gw, "policy", "export", str(path))
    document = yaml.safe_load(path.read_text())
    assert missing_parts(document) == []
    assert document["api_keys"] == {} and document["screening"] == {"entries": []}
    assert document["lists"]["ip-ranges"] == {} and document["lists"]["deny-entities"] == {}


def test_bootstrap_with_a_partial_file_fails_clearly(own_upstream: Upstream, tmp_path: Path) -> None:
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"models": POLICY["models"]}))
    with RedisServer() as redis:
        process = GatewayProcess(gateway_config(own_upstream.url), redis_url=redis.url, bootstrap=partial)
        with pytest.raises(RuntimeError, match="gateway exited with 2"):
            process.start(timeout=20)
        log = process.log()
        process.stop()
        assert "must carry every section" in log and "lists.deny-countries" in log and "screening" in log
        client = redis_sync.Redis.from_url(redis.url)
        try:
            assert client.dbsize() == 0
        finally:
            client.close()


def test_bootstrap_with_the_example_policy_is_ready(own_upstream: Upstream, tmp_path: Path) -> None:
    with RedisServer() as redis:
        process = GatewayProcess(
            gateway_config(own_upstream.url), redis_url=redis.url, bootstrap=example_policy_file(tmp_path)
        )
        try:
            process.start(timeout=20)
        finally:
            process.stop()


# --- clearer admin messages -----------------------------------------------------------------


async def test_admin_refusals_name_the_thing(gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
    status, answer = await call(session, gw, "GET", "/admin/v1/policy", token="not-the-admin-token")
    message = assert_error(status, answer, 401, "unauthenticated")
    assert "admin token is not accepted" in message and "GATEWAY_ADMIN_TOKEN" in message
    status, answer = await call(session, gw, "GET", "/admin/v1/policy", token=None)
    message = assert_error(status, answer, 401, "unauthenticated")
    assert "No admin token" in message and "Authorization: Bearer" in message
    stderr = cli(gw, "lists", "get", "partners", token="wrong").stderr
    assert "401 unauthenticated" in stderr and "GATEWAY_ADMIN_TOKEN" in stderr
    # expires_at: the accepted form, with an example.
    for bad in ("2027-01-31", "next week", "2027-01-31T00:00:00"):
        status, answer = await call(
            session, gw, "PUT", "/admin/v1/lists/partners/acme", {"reason": "r", "expires_at": bad}
        )
        message = assert_error(status, answer, 400, "invalid_request", "expires_at")
        assert "ISO-8601" in message and "2027-01-31T00:00:00Z" in message
    # An empty key is named as the key, with the form to use.
    for method in ("PUT", "PATCH", "DELETE"):
        status, answer = await call(session, gw, method, "/admin/v1/lists/partners/", {"reason": "r"})
        message = assert_error(status, answer, 400, "invalid_request", "key")
        assert "is empty" in message
    assert "key: is empty" in cli_fails(gw, "lists", "put", "partners", "", "--reason", "r")


def test_openapi_describes_patch_and_sections(gw: GatewayProcess) -> None:
    import urllib.request

    request = urllib.request.Request(
        gw.admin_url + "/admin/v1/openapi.json", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        document = json.loads(response.read())
    paths = document["paths"]
    assert "patch" in paths["/admin/v1/models/{model}"] and "patch" in paths["/admin/v1/lists/{list}/{key}"]
    assert [p["name"] for p in paths["/admin/v1/policy"]["put"]["parameters"]] == ["sections"]
    assert "revoked_api_keys" in document["components"]["schemas"]["Policy"]["properties"]


# --- 6: what an import would change ---------------------------------------------------------


async def test_diff_and_dry_run_show_the_change_and_change_nothing(
    gw: GatewayProcess, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    issued = await ok(
        session,
        gw,
        "POST",
        "/admin/v1/api-keys",
        {"subject": "svc-diff", "org": "acme", "country": "US", "tier": "partner"},
    )
    document = await policy(session, gw)
    document["lists"]["deny-countries"]["CU"] = {"reason": "embargo"}
    document["lists"]["deny-countries"]["IR"]["reason"] = "reworded"
    del document["lists"]["partners"]["acme"]
    document["models"]["frontier-x"]["export_suspended"] = True
    document["api_keys"] = {}
    before = await policy(session, gw)
    answer = await ok(session, gw, "POST", "/admin/v1/policy/diff", document)
    sections = answer["sections"]
    assert sections["lists.deny-countries"] == {"added": ["CU"], "removed": [], "changed": ["IR"]}
    assert sections["lists.partners"] == {"added": [], "removed": ["acme"], "changed": []}
    assert sections["lists.ip-ranges"] == {"added": [], "removed": [], "changed": []}
    assert sections["models"] == {"added": [], "removed": [], "changed": ["frontier-x"]}
    assert "api_keys" not in sections  # an import would leave them alone
    assert sections["screening"] == {"before": 0, "after": 0, "changed": False}
    answer = await ok(session, gw, "POST", "/admin/v1/policy/diff?sections=api_keys", document)
    assert answer["sections"] == {"api_keys": {"added": [], "removed": [issued["id"]], "changed": []}}
    path = tmp_path / "next.yaml"
    path.write_text(yaml.safe_dump(document))
    result = cli_ok(gw, "policy", "import", str(path), "--dry-run")
    assert "dry run" in result.stdout and "nothing was changed" in result.stdout
    assert "lists.deny-countries" in result.stdout and "CU" in result.stdout
    assert json.loads(cli_ok(gw, "policy", "import", str(path), "--dry-run", "--json").stdout)["sections"] == sections
    assert await policy(session, gw) == before
    # It refuses what the import would refuse.
    await ok(session, gw, "DELETE", f"/admin/v1/api-keys/{issued['id']}")
    status, answer = await call(session, gw, "POST", "/admin/v1/policy/diff?sections=api_keys", before)
    assert_error(status, answer, 409, "key_revoked")


# --- the pure parts, table-tested -----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "merged"),
    [
        ({"a": 1, "b": 2}, {"a": 3}, {"a": 3, "b": 2}),
        ({"a": 1, "b": 2}, {"b": None}, {"a": 1}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),  # arrays replace whole
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": None, "z": 3}}, {"a": {"x": 1, "z": 3}}),
        (None, {"a": 1, "b": None}, {"a": 1}),
        ({"a": 1}, {"a": {"b": 2}}, {"a": {"b": 2}}),
    ],
)
def test_merge_patch_follows_rfc_7396(target: Any, patch: Any, merged: Any) -> None:
    assert merge_patch(target, patch) == merged


@pytest.mark.parametrize(
    ("list_name", "key", "expected"),
    [
        ("deny-countries", "US", "home country"),
        ("deny-countries", "US-CA", "home country"),
        ("deny-countries", "CU", None),
        ("ip-ranges", "0.0.0.0/0", "wider than /8"),
        ("ip-ranges", "10.0.0.0/7", "wider than /8"),
        ("ip-ranges", "10.0.0.0/8", None),
        ("ip-ranges", "::/0", "wider than /32"),
        ("ip-ranges", "2001:db8::/32", None),
        ("deny-entities", "acme", "current partner"),
        ("deny-entities", "mallory", None),
        ("partners", "acme", None),
    ],
)
def test_entry_warnings(list_name: str, key: str, expected: str | None) -> None:
    warnings = entry_warnings(list_name, key, home_countries=frozenset({"US"}), partners={"acme"})
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0] and key in warnings[0]


@pytest.mark.parametrize(("allowed", "warns"), [([], True), (None, False), (["US"], False)])
def test_model_warnings(allowed: list[str] | None, warns: bool) -> None:
    assert bool(model_warnings("m", {"stage": "general", "allowed_countries": allowed})) is warns


def test_document_warnings_use_the_documents_own_partners() -> None:
    document = {"lists": {"deny-entities": {"acme": {}}, "partners": {}}}
    assert document_warnings(document, home_countries={"US"}, partners={"acme"}) == []
    assert document_warnings({"lists": {"deny-entities": {"acme": {}}}}, home_countries={"US"}, partners={"acme"})


def test_drop_expired_and_future_expiry() -> None:
    now = 1_800_000_000.0
    document = {
        "lists": {"partners": {"a": {"expires_at": None}, "b": {"expires_at": PAST}, "c": {"expires_at": FUTURE}}},
        "api_keys": {"k": {"expires_at": PAST}},
    }
    kept, warnings = drop_expired(document, now)
    assert set(kept["lists"]["partners"]) == {"a", "c"}
    assert kept["api_keys"] == document["api_keys"]  # an expired key is refused when used, and says so
    assert warnings == [f"lists.partners.b: expired at {PAST}; not imported"]
    with pytest.raises(PolicyValidationError) as raised:
        validate_entry("partners", "a", {"reason": "r", "expires_at": PAST}, actor="t", now_iso=PAST, now=now)
    assert raised.value.field == "expires_at"
    stored = validate_entry("partners", "a", {"reason": "r", "expires_at": FUTURE}, actor="t", now_iso=PAST, now=now)
    assert stored["expires_at"] == FUTURE


def test_missing_parts_names_each() -> None:
    assert missing_parts({}) == [
        "lists.deny-countries",
        "lists.deny-entities",
        "lists.partners",
        "lists.ip-ranges",
        "models",
        "api_keys",
        "screening",
    ]
    assert missing_parts(POLICY) == []


def test_policy_diff_ignores_history_and_compares_content() -> None:
    entry = {"reason": "r", "source": "", "expires_at": None, "added_by": "a", "added_at": PAST}
    current = {"lists": {"partners": {"a": entry, "b": entry}}, "models": {}}
    incoming = {
        "lists": {
            "partners": {"a": {**entry, "added_by": "someone else"}, "b": {**entry, "reason": "new"}, "c": entry}
        },
        "screening": {"entries": [{"name": "x"}]},
    }
    assert policy_diff(current, incoming) == {
        "lists.partners": {"added": ["c"], "removed": [], "changed": ["b"]},
        "screening": {"before": 0, "after": 1, "changed": True},
    }
