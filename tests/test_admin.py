"""The admin API (docs/contract.md §6-7) through two real gateway processes sharing one real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from gateway.redis_server import RedisServer

from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, ROOT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until

OPS_TOKEN = "ops-token-of-alice-0123456789"
CSL_CSV = (ROOT / "gateway" / "data" / "csl_sample.csv").read_bytes()
TIERS = {
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
    "partner": {"requests_per_minute": 600, "burst": 60, "stages": ["partners", "general"]},
    "internal": {"requests_per_minute": 6000, "burst": 600, "stages": ["internal", "partners", "general"]},
    # Two requests, then one a minute: a dry run that spent any of it would show at once.
    "tiny": {"requests_per_minute": 1, "burst": 2, "stages": ["general"]},
}
POLICY: dict[str, Any] = {
    **BASE_POLICY,
    "models": {
        **BASE_POLICY["models"],
        "gpt-partners": {"stage": "partners", "timeline": [], "allowed_countries": None, "export_suspended": False},
    },
}


# --- a small admin client -------------------------------------------------------------------


class AdminClient:
    """JSON calls to one admin listener; paths are sent exactly as written (``%2F`` stays encoded)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str = ADMIN_TOKEN) -> None:
        self.session = session
        self.base = base
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if body is not None:
            data = orjson.dumps(body)
            all_headers.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, URL(self.base + path, encoded=True), data=data, headers=all_headers
        ) as response:
            raw = await response.read()
            assert response.content_type == "application/json", raw[:300]
            return response.status, orjson.loads(raw)

    async def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, answer = await self.call(method, path, body, **kwargs)
        assert status == 200, answer
        return answer

    async def version(self) -> int:
        return int((await self.ok("GET", "/admin/v1/lists/partners"))["version"])


def assert_error(status: int, answer: Any, expected_status: int, code: str, field: str | None = None) -> None:
    assert status == expected_status, answer
    error = answer["error"]
    assert error["code"] == code, error
    assert error["request_id"]
    if field is not None:
        assert error["message"].startswith(f"{field}:"), error["message"]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        seed_policy(server.url, POLICY)
        yield server


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("admin") / "tokens"
    path.write_text(f"# operators\nalice: {hashlib.sha256(OPS_TOKEN.encode()).hexdigest()}\n")
    return path


@pytest.fixture(scope="module")
def gateways(module_redis: RedisServer, upstream: Upstream, tokens_file: Path) -> Iterator[list[GatewayProcess]]:
    processes = []
    try:
        for _ in range(2):
            config = gateway_config(upstream.url, tiers=TIERS, admin={"tokens_file": str(tokens_file)})
            processes.append(GatewayProcess(config, redis_url=module_redis.url).start())
        yield processes
    finally:
        for process in processes:
            process.stop()


@pytest.fixture
def gw(gateways: list[GatewayProcess]) -> GatewayProcess:
    return gateways[0]


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def admin(session: aiohttp.ClientSession, gw: GatewayProcess) -> AdminClient:
    return AdminClient(session, gw.admin_url)


async def public_status(
    session: aiohttp.ClientSession, gw: GatewayProcess, token: str, model: str = "gpt-mock"
) -> tuple[int, str]:
    async with session.post(gw.url + "/v1/chat/completions", json={"model": model}, headers=auth(token)) as response:
        await response.read()
        return response.status, response.headers.get("X-Gateway-Reason", "")


# --- policy ---------------------------------------------------------------------------------


async def test_get_policy_has_every_section(admin: AdminClient) -> None:
    policy = await admin.ok("GET", "/admin/v1/policy")
    assert set(policy) == {"version", "lists", "models", "api_keys", "screening", "revoked_api_keys"}
    assert set(policy["lists"]) == {
        "deny-countries",
        "deny-entities",
        "partners",
        "ip-ranges",
        "country-groups",
        "licences",
    }
    ir = policy["lists"]["deny-countries"]["IR"]
    assert ir["reason"] == "test embargo" and ir["added_by"] == "test" and ir["added_at"].endswith("Z")
    assert policy["models"]["gpt-mock"]["stage"] == "general"
    assert policy["screening"] == {"entries": []}


async def test_put_policy_replaces_sections_present_and_keeps_the_rest(admin: AdminClient) -> None:
    before = await admin.ok("GET", "/admin/v1/policy")
    document = {
        "version": 999999,
        "lists": {
            "deny-countries": {
                "IR": {
                    "reason": "kept history",
                    "source": "s",
                    "added_by": "historian",
                    "added_at": "2020-01-02T03:04:05Z",
                },
                "CU": {"reason": "new"},
            }
        },
    }
    written = await admin.ok("PUT", "/admin/v1/policy", document)
    assert written["version"] == before["version"] + 1  # version in the body is ignored
    after = await admin.ok("GET", "/admin/v1/policy")
    deny = after["lists"]["deny-countries"]
    assert deny["IR"]["added_by"] == "historian" and deny["IR"]["added_at"] == "2020-01-02T03:04:05Z"
    assert deny["CU"]["added_by"] == "admin"  # an entry without history is stamped like any write
    for name in ("deny-entities", "partners", "ip-ranges"):
        assert after["lists"][name] == before["lists"][name]
    assert after["models"] == before["models"]
    # GET then PUT round-trips: restoring the old document gives the old document back.
    await admin.ok("PUT", "/admin/v1/policy", before)
    restored = await admin.ok("GET", "/admin/v1/policy")
    assert {k: v for k, v in restored.items() if k != "version"} == {k: v for k, v in before.items() if k != "version"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lists": {"nope": {}}}, "lists.nope"),
        ({"lists": {"deny-countries": {"XX": {"reason": "x"}}}}, "lists.deny-countries.XX"),
        ({"lists": {"deny-countries": {"CU": {"reason": ""}}}}, "lists.deny-countries.CU.reason"),
        ({"models": {"m": {"stage": "beta"}}}, "models.m.stage"),
        ({"api_keys": {"k1": {"subject": "s"}}}, "api_keys.k1.hash"),
        ({"colour": "red"}, "colour"),
        ([1, 2], "body"),
    ],
)
async def test_put_policy_bad_input_changes_nothing(admin: AdminClient, body: Any, field: str) -> None:
    before = await admin.ok("GET", "/admin/v1/policy")
    status, answer = await admin.call("PUT", "/admin/v1/policy", body)
    assert_error(status, answer, 400, "invalid_request", field)
    assert answer["error"]["type"] == "invalid_request_error"
    assert await admin.ok("GET", "/admin/v1/policy") == before


async def test_invalid_json_and_empty_body_are_400(admin: AdminClient) -> None:
    version = await admin.version()
    for data in (b"{not json", b"", b'{"reason": "x"', b"\xff\xfe"):
        status, answer = await admin.call("PUT", "/admin/v1/lists/deny-countries/CU", data=data)
        assert_error(status, answer, 400, "invalid_request", "body")
    status, answer = await admin.call("PUT", "/admin/v1/policy", data=b"[")
    assert_error(status, answer, 400, "invalid_request", "body")
    assert await admin.version() == version


# --- lists ----------------------------------------------------------------------------------


async def test_entry_put_get_delete_with_percent_encoded_cidr(admin: AdminClient) -> None:
    version = await admin.version()
    path = "/admin/v1/lists/ip-ranges/203.0.113.0%2F24"
    written = await admin.ok(
        "PUT",
        path,
        {"reason": "test range", "source": "RIR", "country": "ir", "expires_at": "2099-01-01T00:00:00+01:00"},
    )
    assert written["version"] == version + 1 and written["key"] == "203.0.113.0/24"
    listing = await admin.ok("GET", "/admin/v1/lists/ip-ranges")
    entry = listing["entries"]["203.0.113.0/24"]
    assert entry["country"] == "IR" and entry["reason"] == "test range" and entry["source"] == "RIR"
    assert entry["expires_at"] == "2098-12-31T23:00:00Z"
    assert entry["added_by"] == "admin" and entry["added_at"].endswith("Z")
    assert listing["version"] == version + 1
    deleted = await admin.ok("DELETE", path)
    assert deleted["version"] == version + 2
    assert "203.0.113.0/24" not in (await admin.ok("GET", "/admin/v1/lists/ip-ranges"))["entries"]


async def test_delete_absent_entry_is_404_and_unknown_list_is_404(admin: AdminClient) -> None:
    version = await admin.version()
    status, answer = await admin.call("DELETE", "/admin/v1/lists/deny-entities/nobody-here")
    assert_error(status, answer, 404, "not_found")
    for method, body in (("GET", None), ("PUT", {"entries": {}, "allow_empty": True})):
        status, answer = await admin.call(method, "/admin/v1/lists/allow-everyone", body)
        assert_error(status, answer, 404, "not_found")
    status, answer = await admin.call("PUT", "/admin/v1/lists/allow-everyone/x", {"reason": "r"})
    assert_error(status, answer, 404, "not_found")
    assert await admin.version() == version


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("deny-countries/XX", {"reason": "x"}, "key"),
        ("deny-countries/CU", {}, "reason"),
        ("deny-countries/CU", {"reason": "   "}, "reason"),
        ("deny-countries/CU", {"reason": 5}, "reason"),
        ("deny-countries/CU", {"reason": "x", "bogus": 1}, "bogus"),
        ("deny-countries/CU", {"reason": "x", "expires_at": "tomorrow"}, "expires_at"),
        ("deny-countries/CU", {"reason": "x", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
        ("deny-countries/CU", {"reason": "x", "country": "US"}, "country"),
        ("deny-countries/CU", {"reason": "x", "added_by": "someone-else"}, "added_by"),
        ("deny-countries/CU", ["reason"], "body"),
        ("ip-ranges/203.0.113.0%2F24", {"reason": "x"}, "country"),
        ("ip-ranges/203.0.113.0%2F24", {"reason": "x", "country": "ZZ"}, "country"),
        ("ip-ranges/300.1.1.1%2F8", {"reason": "x", "country": "DE"}, "key"),
        ("deny-entities/%20padded", {"reason": "x"}, "key"),
    ],
)
async def test_entry_bad_input_is_400_naming_the_field(admin: AdminClient, path: str, body: Any, field: str) -> None:
    version = await admin.version()
    status, answer = await admin.call("PUT", f"/admin/v1/lists/{path}", body)
    assert_error(status, answer, 400, "invalid_request", field)
    assert await admin.version() == version


async def test_whole_list_replace_and_empty_needs_allow_empty(admin: AdminClient) -> None:
    version = await admin.version()
    entries = {"globex": {"reason": "partner A"}, "initech": {"reason": "partner B", "source": "contract 7"}}
    written = await admin.ok("PUT", "/admin/v1/lists/partners", {"entries": entries})
    assert written["version"] == version + 1 and written["count"] == 2
    listing = await admin.ok("GET", "/admin/v1/lists/partners")
    assert set(listing["entries"]) == {"globex", "initech"}  # acme is gone: replaced, not merged
    status, answer = await admin.call("PUT", "/admin/v1/lists/partners", {"entries": {}})
    assert_error(status, answer, 400, "invalid_request", "entries")
    assert set((await admin.ok("GET", "/admin/v1/lists/partners"))["entries"]) == {"globex", "initech"}
    emptied = await admin.ok("PUT", "/admin/v1/lists/partners", {"entries": {}, "allow_empty": True})
    assert (await admin.ok("GET", "/admin/v1/lists/partners"))["entries"] == {}
    assert emptied["version"] == version + 2
    await admin.ok("PUT", "/admin/v1/lists/partners", {"entries": POLICY["lists"]["partners"]})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "entries"),
        ({"entries": {"CU": {"reason": ""}}}, "entries.CU.reason"),
        ({"entries": {"cu": {"reason": "a"}, "CU": {"reason": "b"}}}, "entries.CU"),
        ({"entries": {"CU": {"reason": "x"}}, "allow_empty": "yes"}, "allow_empty"),
        ({"entries": {"CU": {"reason": "x"}}, "replace": True}, "replace"),
        ({"entries": ["CU"]}, "entries"),
    ],
)
async def test_whole_list_replace_bad_input(admin: AdminClient, body: Any, field: str) -> None:
    before = await admin.ok("GET", "/admin/v1/lists/deny-countries")
    status, answer = await admin.call("PUT", "/admin/v1/lists/deny-countries", body)
    assert_error(status, answer, 400, "invalid_request", field)
    assert await admin.ok("GET", "/admin/v1/lists/deny-countries") == before


async def test_concurrent_edits_lose_none(admin: AdminClient) -> None:
    n = 30
    version = await admin.version()
    keys = [f"concurrent-{i:02d}" for i in range(n)]
    answers = await asyncio.gather(
        *(admin.ok("PUT", f"/admin/v1/lists/deny-entities/{key}", {"reason": f"edit {key}"}) for key in keys)
    )
    # Every write got its own version, and exactly N bumps happened.
    assert sorted(a["version"] for a in answers) == list(range(version + 1, version + n + 1))
    listing = await admin.ok("GET", "/admin/v1/lists/deny-entities")
    assert set(keys) <= set(listing["entries"])
    assert listing["version"] == version + n
    await asyncio.gather(*(admin.ok("DELETE", f"/admin/v1/lists/deny-entities/{key}") for key in keys))


async def test_whole_list_replace_is_seen_whole_or_not_at_all(admin: AdminClient) -> None:
    first = {f"first-{i:04d}": {"reason": "bulk first"} for i in range(1000)}
    second = {f"second-{i:04d}": {"reason": "bulk second"} for i in range(1000)}
    await admin.ok("PUT", "/admin/v1/lists/deny-entities", {"entries": first})
    allowed = [frozenset(first), frozenset(second)]
    seen: list[frozenset[str]] = []
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            listing = await admin.ok("GET", "/admin/v1/lists/deny-entities")
            seen.append(frozenset(listing["entries"]))

    async def writer() -> None:
        try:
            for round_ in range(8):
                await admin.ok(
                    "PUT", "/admin/v1/lists/deny-entities", {"entries": second if round_ % 2 == 0 else first}
                )
        finally:
            done.set()

    await asyncio.gather(writer(), reader(), reader())
    assert len(seen) >= 4
    assert all(keys in allowed for keys in seen), "a reader saw a mix of two lists"
    assert {keys for keys in seen} == set(allowed)  # both versions were observed
    await admin.ok("PUT", "/admin/v1/lists/deny-entities", {"entries": {}, "allow_empty": True})


async def test_entry_added_on_one_process_is_enforced_by_another_within_1s(
    session: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    first, second = gateways
    token = hs_token("carol", org="carol-org")
    assert await public_status(session, second, token) == (200, "")
    await AdminClient(session, first.admin_url).ok(
        "PUT", "/admin/v1/lists/deny-entities/carol-org", {"reason": "listed in test"}
    )

    async def blocked() -> bool:
        return await public_status(session, second, token) == (451, "entity_denied")

    try:
        assert await wait_until(blocked, 1.0) < 1.0
    finally:
        await AdminClient(session, first.admin_url).ok("DELETE", "/admin/v1/lists/deny-entities/carol-org")
    assert await public_status(session, first, token) == (200, "")  # the writer saw its own delete


# --- models ---------------------------------------------------------------------------------


async def test_model_crud_and_enforcement(
    admin: AdminClient, session: aiohttp.ClientSession, gw: GatewayProcess
) -> None:
    name = "org%2Fmodel-x"  # a registry name may hold "/", percent-encoded in the path
    token = hs_token("erin", tier="public")
    assert await public_status(session, gw, token, "org/model-x") == (403, "model_unknown")
    version = await admin.version()
    body = {
        "stage": "partners",
        "timeline": [
            {"at": "2099-01-01T00:00:00Z", "stage": "general"},
            {"at": "2000-01-01T00:00:00+02:00", "stage": "internal"},
        ],
        "allowed_countries": ["us", "DE"],
        "export_suspended": False,
    }
    assert (await admin.ok("PUT", f"/admin/v1/models/{name}", body))["version"] == version + 1
    got = await admin.ok("GET", f"/admin/v1/models/{name}")
    assert got["name"] == "org/model-x"
    assert got["model"]["timeline"] == [
        {"at": "1999-12-31T22:00:00Z", "stage": "internal"},
        {"at": "2099-01-01T00:00:00Z", "stage": "general"},
    ]
    assert got["model"]["allowed_countries"] == ["DE", "US"]
    assert "org/model-x" in (await admin.ok("GET", "/admin/v1/models"))["models"]
    # The timeline's passed step (internal) is the current stage: a public caller is not served.
    assert await public_status(session, gw, token, "org/model-x") == (403, "not_released")
    await admin.ok("DELETE", f"/admin/v1/models/{name}")
    status, answer = await admin.call("GET", f"/admin/v1/models/{name}")
    assert_error(status, answer, 404, "not_found")
    status, answer = await admin.call("DELETE", f"/admin/v1/models/{name}")
    assert_error(status, answer, 404, "not_found")


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("m", {"stage": "beta"}, "stage"),
        ("m", {}, "stage"),
        ("m", {"stage": "general", "timeline": [{"at": "2026-01-01T00:00:00Z"}]}, "timeline[0]"),
        ("m", {"stage": "general", "timeline": "soon"}, "timeline"),
        ("m", {"stage": "general", "allowed_countries": ["XX"]}, "allowed_countries[0]"),
        ("m", {"stage": "general", "export_suspended": "false"}, "export_suspended"),
        ("m", {"stage": "general", "colour": "red"}, "colour"),
        ("bad%20name", {"stage": "general"}, "model"),
    ],
)
async def test_model_bad_input(admin: AdminClient, name: str, body: Any, field: str) -> None:
    version = await admin.version()
    status, answer = await admin.call("PUT", f"/admin/v1/models/{name}", body)
    assert_error(status, answer, 400, "invalid_request", field)
    assert await admin.version() == version


# --- API keys -------------------------------------------------------------------------------


async def test_api_key_issue_use_and_revoke_on_every_process(
    session: aiohttp.ClientSession, gateways: list[GatewayProcess]
) -> None:
    admin = AdminClient(session, gateways[0].admin_url)
    issued = await admin.ok(
        "POST",
        "/admin/v1/api-keys",
        {
            "subject": "svc-batch",
            "org": "acme",
            "org_name": "Acme Corp",
            "country": "us",
            "tier": "partner",
            "expires_at": "2099-01-01T00:00:00Z",
        },
    )
    key_id, key = issued["id"], issued["key"]
    assert key.startswith("gk_")
    listed = (await admin.ok("GET", "/admin/v1/api-keys"))["api_keys"][key_id]
    assert listed["hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert listed["country"] == "US" and listed["created_by"] == "admin"
    assert key not in orjson.dumps(await admin.ok("GET", "/admin/v1/policy")).decode()  # only the hash
    for process in gateways:

        async def works(process: GatewayProcess = process) -> bool:
            return await public_status(session, process, key) == (200, "")

        await wait_until(works, 1.0)

    async def audited() -> bool:
        records = (await admin.ok("GET", "/admin/v1/audit?limit=50"))["records"]
        return any(r.get("key_id") == key_id for r in records)

    # The audit record names the key and the org's name, so the caller can be decided again later.
    await wait_until(audited, 3.0)
    records = (await admin.ok("GET", "/admin/v1/audit?limit=50"))["records"]
    record = next(r for r in records if r.get("key_id") == key_id)
    assert (record["subject"], record["org_name"], record["decision"]) == ("svc-batch", "Acme Corp", "allow")
    revoked = await admin.ok("DELETE", f"/admin/v1/api-keys/{key_id}")
    assert revoked["version"] > issued["version"]
    for process in gateways:

        async def refused(process: GatewayProcess = process) -> bool:
            return (await public_status(session, process, key))[0] == 401

        assert await wait_until(refused, 1.0) < 1.0
    status, answer = await admin.call("DELETE", f"/admin/v1/api-keys/{key_id}")
    assert_error(status, answer, 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject": "s", "org": "o", "country": "US"}, "tier"),
        ({"subject": "s", "org": "o", "country": "US", "tier": "gold"}, "tier"),
        ({"subject": "s", "org": "o", "country": "XX", "tier": "public"}, "country"),
        ({"subject": "", "org": "o", "country": "US", "tier": "public"}, "subject"),
        ({"subject": "s", "org": "o", "country": "US", "tier": "public", "hash": "0" * 64}, "hash"),
        ({"subject": "s", "org": "o", "country": "US", "tier": "public", "expires_at": "soon"}, "expires_at"),
    ],
)
async def test_api_key_bad_input(admin: AdminClient, body: Any, field: str) -> None:
    version = await admin.version()
    status, answer = await admin.call("POST", "/admin/v1/api-keys", body)
    assert_error(status, answer, 400, "invalid_request", field)
    assert "key" not in answer
    assert await admin.version() == version


# --- decide ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "model"),
    [
        ({"subject": "frank", "org": "acme", "country": "US", "tier": "partner"}, "gpt-mock"),
        ({"subject": "frank", "org": "acme", "country": "IR", "tier": "partner"}, "gpt-mock"),
        ({"subject": "frank", "org": "acme", "country": "US", "tier": "partner"}, "gpt-unlisted"),
        ({"subject": "frank", "org": "acme", "country": "US", "tier": "public"}, "gpt-partners"),
        ({"subject": "frank", "org": "other", "country": "US", "tier": "partner"}, "gpt-partners"),
        ({"subject": "frank", "org": "acme", "country": "US", "tier": "partner"}, "gpt-partners"),
    ],
)
async def test_decide_matches_the_public_listener(
    admin: AdminClient, session: aiohttp.ClientSession, gw: GatewayProcess, claims: dict[str, str], model: str
) -> None:
    dry = await admin.ok("POST", "/admin/v1/decide", {**claims, "ip": "127.0.0.1", "model": model})
    token = hs_token(claims["subject"], org=claims["org"], country=claims["country"], tier=claims["tier"])
    status, reason = await public_status(session, gw, token, model)
    assert (dry["status"], dry["code"]) == (status, reason)
    assert dry["decision"] == ("allow" if status == 200 else "block")
    assert dry["policy_version"] == await admin.version()
    assert dry["message"]


async def test_decide_consumes_no_rate_limit(
    admin: AdminClient, session: aiohttp.ClientSession, gw: GatewayProcess
) -> None:
    caller = {"subject": "grace-tiny", "org": "acme", "country": "US", "tier": "tiny"}
    for _ in range(10):
        dry = await admin.ok("POST", "/admin/v1/decide", {**caller, "ip": "127.0.0.1", "model": "gpt-mock"})
        assert dry["decision"] == "allow"
    token = hs_token("grace-tiny", tier="tiny")
    # The tier's whole burst is still there after ten dry runs; then the limit bites.
    assert [await public_status(session, gw, token) for _ in range(3)] == [(200, ""), (200, ""), (429, "rate_limited")]


async def test_decide_uses_ip_ranges_for_the_ip_country(admin: AdminClient) -> None:
    await admin.ok("PUT", "/admin/v1/lists/ip-ranges/198.51.100.0%2F24", {"reason": "test", "country": "IR"})
    try:
        dry = await admin.ok(
            "POST",
            "/admin/v1/decide",
            {"subject": "h", "org": "acme", "country": "US", "tier": "partner", "ip": "198.51.100.9"},
        )
        assert (dry["status"], dry["code"], dry["ip_country"]) == (451, "country_denied", "IR")
    finally:
        await admin.ok("DELETE", "/admin/v1/lists/ip-ranges/198.51.100.0%2F24")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject": "s", "tier": "public"}, "ip"),
        ({"subject": "s", "tier": "public", "ip": "not-an-ip"}, "ip"),
        ({"subject": "s", "tier": "gold", "ip": "127.0.0.1"}, "tier"),
        ({"tier": "public", "ip": "127.0.0.1"}, "subject"),
        ({"subject": "s", "tier": "public", "ip": "127.0.0.1", "country": "ZZ"}, "country"),
        ({"subject": "s", "tier": "public", "ip": "127.0.0.1", "weather": "fine"}, "weather"),
        ("subject", "body"),
    ],
)
async def test_decide_bad_input(admin: AdminClient, body: Any, field: str) -> None:
    status, answer = await admin.call("POST", "/admin/v1/decide", body)
    assert_error(status, answer, 400, "invalid_request", field)


# --- history --------------------------------------------------------------------------------


async def test_change_history_names_the_actor_from_the_tokens_file(
    session: aiohttp.ClientSession, gw: GatewayProcess
) -> None:
    alice = AdminClient(session, gw.admin_url, OPS_TOKEN)
    put = await alice.ok("PUT", "/admin/v1/lists/deny-countries/KP", {"reason": "embargo", "source": "OFAC"})
    deleted = await alice.ok("DELETE", "/admin/v1/lists/deny-countries/KP")
    changes = (await alice.ok("GET", "/admin/v1/changes?limit=2"))["changes"]
    newest, older = changes
    assert (newest["version"], older["version"]) == (deleted["version"], put["version"])
    assert newest["actor"] == older["actor"] == "alice"
    assert older["target"] == "lists/deny-countries/KP"
    (key,) = older["after"]
    assert older["before"][key] is None
    assert older["after"][key]["reason"] == "embargo" and older["after"][key]["added_by"] == "alice"
    assert newest["before"][key]["reason"] == "embargo" and newest["after"][key] is None
    assert newest["time"].endswith("Z")
    entry = (await alice.ok("GET", "/admin/v1/policy"))["lists"]["deny-countries"]
    assert "KP" not in entry


async def test_change_history_says_whether_each_write_loosens_or_tightens(admin: AdminClient) -> None:
    # docs/contract.md §7: every change-history record carries its effect, judged on what it replaced.
    writes = [
        ("PUT", "/admin/v1/lists/deny-countries/KP", {"reason": "embargo"}, "tighten"),
        ("DELETE", "/admin/v1/lists/deny-countries/KP", None, "loosen"),
        ("PATCH", "/admin/v1/models/gpt-partners", {"export_suspended": True}, "tighten"),
        ("PATCH", "/admin/v1/models/gpt-partners", {"export_suspended": False}, "loosen"),
        ("PUT", "/admin/v1/lists/partners/effect-lab", {"reason": "evaluation"}, "loosen"),
        ("DELETE", "/admin/v1/lists/partners/effect-lab", None, "tighten"),
    ]
    for method, path, body, effect in writes:
        written = await admin.ok(method, path, body)
        (change,) = (await admin.ok("GET", "/admin/v1/changes?limit=1"))["changes"]
        assert change["version"] == written["version"], change
        assert change["effect"] == effect, (method, path, change)
        assert {"actor", "time", "target", "before", "after"} <= change.keys()
    key = {"subject": "svc-effect", "org": "acme", "country": "DE", "tier": "public"}
    issued = await admin.ok("POST", "/admin/v1/api-keys", key)
    revoked = await admin.ok("DELETE", f"/admin/v1/api-keys/{issued['id']}")
    newest, older = (await admin.ok("GET", "/admin/v1/changes?limit=2"))["changes"]
    assert (older["version"], older["effect"]) == (issued["version"], "loosen")
    assert (newest["version"], newest["effect"]) == (revoked["version"], "tighten")


async def test_audit_records_newest_first(
    admin: AdminClient, session: aiohttp.ClientSession, gw: GatewayProcess
) -> None:
    ids = [f"audit-probe-{time.time_ns()}-{i}" for i in range(2)]
    for request_id in ids:
        async with session.post(
            gw.url + "/v1/chat/completions",
            json={"model": "gpt-mock"},
            headers={**auth(hs_token("ivan", country="IR")), "X-Request-Id": request_id},
        ):
            pass

    async def flushed() -> bool:
        records = (await admin.ok("GET", "/admin/v1/audit?limit=50"))["records"]
        return all(any(r["request_id"] == i for r in records) for i in ids)

    await wait_until(flushed, 5.0)
    records = (await admin.ok("GET", "/admin/v1/audit?limit=50"))["records"]
    positions = [next(n for n, r in enumerate(records) if r["request_id"] == i) for i in ids]
    assert positions[1] < positions[0]
    record = records[positions[0]]
    assert (record["subject"], record["code"], record["status"], record["claimed_country"]) == (
        "ivan",
        "country_denied",
        451,
        "IR",
    )
    assert len((await admin.ok("GET", "/admin/v1/audit?limit=1"))["records"]) == 1


@pytest.mark.parametrize("path", ["/admin/v1/audit", "/admin/v1/changes"])
@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1", "1.5"])
async def test_history_limit_is_checked(admin: AdminClient, path: str, limit: str) -> None:
    status, answer = await admin.call("GET", f"{path}?limit={limit}")
    assert_error(status, answer, 400, "invalid_request", "limit")


# --- the listener itself --------------------------------------------------------------------


async def test_unknown_paths_and_methods_answer_json(admin: AdminClient) -> None:
    status, answer = await admin.call("GET", "/admin/v1/no-such-thing")
    assert_error(status, answer, 404, "not_found")
    status, answer = await admin.call("POST", "/admin/v1/policy", {})
    assert_error(status, answer, 405, "method_not_allowed")


async def test_openapi_describes_every_route(admin: AdminClient, gw: GatewayProcess) -> None:
    document = await admin.ok("GET", "/admin/v1/openapi.json")
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    expected = {
        ("get", "/admin/v1/policy"),
        ("put", "/admin/v1/policy"),
        ("get", "/admin/v1/lists/{list}"),
        ("put", "/admin/v1/lists/{list}"),
        ("put", "/admin/v1/lists/{list}/{key}"),
        ("delete", "/admin/v1/lists/{list}/{key}"),
        ("get", "/admin/v1/models/{model}"),
        ("put", "/admin/v1/models/{model}"),
        ("delete", "/admin/v1/models/{model}"),
        ("post", "/admin/v1/api-keys"),
        ("delete", "/admin/v1/api-keys/{id}"),
        ("get", "/admin/v1/api-keys"),
        ("post", "/admin/v1/decide"),
        ("post", "/admin/v1/screening/import"),
        ("get", "/admin/v1/screening/search"),
        ("get", "/admin/v1/screening/hits"),
        ("get", "/admin/v1/audit"),
        ("get", "/admin/v1/changes"),
        ("get", "/admin/v1/openapi.json"),
        ("get", "/admin/v1/models"),
        ("patch", "/admin/v1/models/{model}"),
        ("patch", "/admin/v1/lists/{list}/{key}"),
        ("post", "/admin/v1/policy/diff"),
        ("get", "/admin/v1/change-requests"),
        ("get", "/admin/v1/change-requests/{id}"),
        ("post", "/admin/v1/change-requests/{id}/approve"),
        ("post", "/admin/v1/change-requests/{id}/reject"),
        ("post", "/admin/v1/impact"),
    }
    assert {(m, p) for p, ops in paths.items() for m in ops} == expected
    schemas = document["components"]["schemas"]
    for name in (
        "Entry",
        "StoredEntry",
        "ListReplace",
        "Model",
        "ApiKeyRequest",
        "DecideRequest",
        "Policy",
        "EntryPatch",
        "ModelPatch",
        "Revocation",
    ):
        assert schemas[name]["additionalProperties"] is False, name
    assert sorted(schemas["ApiKeyRequest"]["properties"]["tier"]["enum"]) == sorted(TIERS)


# --- no policy, no Redis --------------------------------------------------------------------


async def test_no_policy_refuses_single_writes_until_a_restore(
    fresh_redis: RedisServer, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    process = GatewayProcess(gateway_config(upstream.url), redis_url=fresh_redis.url).start(wait_ready=False)
    try:
        admin = AdminClient(session, process.admin_url)
        refused = [
            ("PUT", "/admin/v1/lists/deny-countries/CU", {"reason": "embargo"}),
            ("DELETE", "/admin/v1/lists/deny-countries/CU", None),
            ("PUT", "/admin/v1/lists/partners", {"entries": {"acme": {"reason": "p"}}}),
            ("PUT", "/admin/v1/models/m", {"stage": "general"}),
            ("POST", "/admin/v1/api-keys", {"subject": "s", "org": "o", "country": "US", "tier": "public"}),
            ("GET", "/admin/v1/policy", None),
            ("GET", "/admin/v1/lists/partners", None),
        ]
        for method, path, body in refused:
            status, answer = await admin.call(method, path, body)
            assert_error(status, answer, 409, "policy_missing")
            assert answer["error"]["type"] == "invalid_request_error"
        status, answer = await admin.call("POST", "/admin/v1/screening/import", data=CSL_CSV)
        assert_error(status, answer, 409, "policy_missing")
        token = hs_token("judy")
        assert await public_status(session, process, token) == (503, "policy_stale")
        # The restore: one atomic whole-policy import starts a generation, and traffic flows at once.
        whole = {**POLICY, "api_keys": {}, "screening": {"entries": []}}
        assert (await admin.ok("PUT", "/admin/v1/policy", whole))["version"] == 1
        assert await public_status(session, process, token) == (200, "")
        assert (await admin.ok("GET", "/admin/v1/policy"))["lists"]["partners"].keys() == {"acme"}
        async with session.get(process.admin_url + "/readyz") as response:
            assert response.status == 200
    finally:
        process.stop()


async def test_redis_away_is_503_redis_unavailable(
    fresh_redis: RedisServer, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    seed_policy(fresh_redis.url, POLICY)
    process = GatewayProcess(gateway_config(upstream.url), redis_url=fresh_redis.url).start()
    try:
        admin = AdminClient(session, process.admin_url)
        fresh_redis.stop()
        for method, path, body in [
            ("PUT", "/admin/v1/lists/deny-countries/CU", {"reason": "embargo"}),
            ("GET", "/admin/v1/policy", None),
            ("GET", "/admin/v1/changes", None),
            ("PUT", "/admin/v1/policy", POLICY),
        ]:
            status, answer = await admin.call(method, path, body)
            assert_error(status, answer, 503, "redis_unavailable")
            assert answer["error"]["type"] == "service_unavailable"
        # Bad input is still named first: validation needs no Redis.
        status, answer = await admin.call("PUT", "/admin/v1/lists/deny-countries/XX", {"reason": "r"})
        assert_error(status, answer, 400, "invalid_request", "key")
    finally:
        process.stop()
