"""Admission (identity -> countries -> model -> decide -> rate) in-process, over a runtime that
create_runtime builds against a real Redis, with a fake clock; and the one error table it refuses by."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admission import CALLER_CACHE_SIZE, Admission, rate_refused
from gateway.app import create_admin_app
from gateway.bootstrap import import_policy
from gateway.errors import GatewayError, Presentation, error_for
from gateway.identity import AuthError
from gateway.policy.validate import PolicyValidationError
from gateway.runtime import Runtime, create_runtime
from gateway.settings import Settings
from gateway.storage.clients import StoreUnavailable
from gateway.storage.ops import KeyRevoked, NotFound, PolicyIncomplete, PolicyMissing
from gateway.storage.store import Store

from .support.clock import FakeClock
from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, gateway_config
from .support.tokens import HS_SECRET, hs_token

ENV = {"TEST_HS256_SECRET": HS_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
TIERS = ("public", "partner", "internal")


def policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["lists"]["ip-ranges"] = {"203.0.113.0/24": {"reason": "test", "source": "test", "country": "IR"}}
    return document


def settings_for(tmp_path: Path, **sections: Any) -> Settings:
    config = gateway_config("http://127.0.0.1:9", audit={"spool_dir": str(tmp_path / "spool")}, **sections)
    return Settings.model_validate(config)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time() + 60)  # tokens are minted at the real time: never "issued in the future"


@pytest.fixture
async def runtime(tmp_path: Path, store: Store, clock: FakeClock) -> AsyncIterator[Runtime]:
    await import_policy(store, policy(), actor="test", tiers=TIERS)
    settings = settings_for(tmp_path, tiers={name: {"requests_per_minute": 60, "burst": 2} for name in TIERS})
    async with create_runtime(settings, clock=clock, store=store, environ=ENV) as started:
        yield started


def bearer(**claims: Any) -> str:
    return f"Bearer {hs_token(**claims)}"


async def test_runtime_components_are_started_and_closed_with_it(
    tmp_path: Path, store: Store, clock: FakeClock
) -> None:
    await import_policy(store, policy(), actor="test", tiers=TIERS)
    async with create_runtime(settings_for(tmp_path), clock=clock, store=store, environ=ENV) as runtime:
        assert runtime.watcher.snapshot is not None
        assert runtime.policy_version() == runtime.watcher.version > 0
        assert runtime.jwks is None  # no auth.jwks_url
        session = runtime.session
        assert not session.closed
    assert session.closed  # the HTTP client closes with the runtime
    assert await store.policy_exists()  # a store passed in is left open for its owner


async def test_no_policy_is_refused_as_stale_before_identity(tmp_path: Path, store: Store, clock: FakeClock) -> None:
    async with create_runtime(settings_for(tmp_path), clock=clock, store=store, environ=ENV) as runtime:
        with pytest.raises(GatewayError) as refused:
            runtime.admission.enforced()
    assert (refused.value.status, refused.value.code) == (503, "policy_stale")


async def test_identity_step(runtime: Runtime) -> None:
    admission = runtime.admission
    snapshot = admission.enforced()
    with pytest.raises(GatewayError) as refused:
        admission.identify(None, snapshot)
    assert (refused.value.status, refused.value.code) == (401, "unauthenticated")
    assert isinstance(refused.value.__cause__, AuthError)
    identity = admission.identify(bearer(subject="alice", country="US"), snapshot)
    assert (identity.subject, identity.org, identity.tier, identity.country) == ("alice", "acme", "partner", "US")


async def test_countries_step_uses_the_snapshots_ip_ranges(runtime: Runtime) -> None:
    admission = runtime.admission
    snapshot = admission.enforced()
    identity = admission.identify(bearer(), snapshot)
    caller = admission.caller(identity, "203.0.113.7", snapshot)
    assert (caller.ip, caller.ip_country, caller.claimed_country) == ("203.0.113.7", "IR", "US")
    assert admission.caller(identity, "203.0.113.7", None).ip_country is None  # no snapshot: no ranges


async def test_a_caller_calling_again_from_one_address_is_the_caller_built_before(runtime: Runtime) -> None:
    admission = runtime.admission
    snapshot = admission.enforced()
    alice = admission.identify(bearer(subject="alice", country="US"), snapshot)
    first = admission.caller(alice, "203.0.113.7", snapshot)
    assert admission.caller(alice, "203.0.113.7", snapshot) is first
    # Another caller at that address, the same caller at another, or its address placed elsewhere: its own.
    bob = admission.caller(admission.identify(bearer(subject="bob", country="DE"), snapshot), "203.0.113.7", snapshot)
    assert (bob.subject, bob.claimed_country, bob.countries) == ("bob", "DE", frozenset({"DE", "IR"}))
    elsewhere = admission.caller(alice, "198.51.100.1", snapshot)
    assert (elsewhere.ip, elsewhere.ip_country, elsewhere.countries) == ("198.51.100.1", None, frozenset({"US"}))
    unplaced = admission.caller(alice, "203.0.113.7", None)
    assert (unplaced.ip_country, unplaced.countries) == (None, frozenset({"US"}))
    assert admission.caller(alice, "203.0.113.7", snapshot).countries == frozenset({"US", "IR"})
    for n in range(CALLER_CACHE_SIZE + 10):  # bounded: many addresses keep it at its size
        assert admission.caller(alice, f"10.0.{n // 256}.{n % 256}", snapshot).ip == f"10.0.{n // 256}.{n % 256}"
    assert len(admission._callers) <= CALLER_CACHE_SIZE


async def test_model_and_decide_steps(runtime: Runtime) -> None:
    admission = runtime.admission
    snapshot = admission.enforced()
    identity = admission.identify(bearer(country="US"), snapshot)
    at_home = admission.caller(identity, "198.51.100.1", snapshot)
    assert admission.model(None, "GET", "/v1/models/gpt-mock") == "gpt-mock"
    assert admission.model("named", "GET", "/v1/models/gpt-mock") == "named"
    assert admission.decide(snapshot, at_home, "gpt-mock", path="/v1/chat/completions").allowed
    denied = admission.decide(
        snapshot, admission.caller(identity, "203.0.113.7", snapshot), "gpt-mock", path="/v1/chat/completions"
    )
    assert (denied.allowed, denied.status, denied.code) == (False, 451, "country_denied")
    stale = admission.decide(snapshot, at_home, "gpt-mock", stale=True)
    assert (stale.allowed, stale.code) == (False, "policy_stale")


async def test_decide_reads_the_clock_it_was_given(runtime: Runtime, store: Store, clock: FakeClock) -> None:
    document = policy()
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock() + 3600))
    document["lists"]["deny-entities"] = {"evil": {"reason": "test", "source": "test", "expires_at": expires}}
    await import_policy(store, document, actor="test", tiers=TIERS)
    await runtime.watcher.refresh()
    admission = runtime.admission
    snapshot = admission.enforced()
    caller = admission.caller(admission.identify(bearer(org="evil"), snapshot), "198.51.100.1", snapshot)
    assert not admission.decide(snapshot, caller, "gpt-mock").allowed
    assert admission.decide(snapshot, caller, "gpt-mock", now=clock() + 7200).allowed
    clock.advance(7200)
    assert admission.decide(snapshot, caller, "gpt-mock").allowed


async def test_rate_step_is_separate_and_optional(runtime: Runtime) -> None:
    admission = runtime.admission
    snapshot = admission.enforced()
    identity = admission.identify(bearer(subject="rate-test"), snapshot)
    results = [await admission.rate(identity, "gpt-mock", runtime.limiter.budget()) for _ in range(4)]
    assert results[0].allowed and not results[-1].allowed
    refused = rate_refused(results[-1], "gpt-mock", tuple(results[-1].headers(identity.tier)))
    assert (refused.status, refused.code) == (429, "rate_limited")
    assert "gpt-mock" in refused.message and any(name == "Retry-After" for name, _ in refused.headers)
    # An admission without a limiter (POST /admin/v1/decide, an impact preview) consumes no rate limit.
    unlimited = Admission(
        policy=runtime.watcher,
        authenticator=runtime.authenticator,
        geo=runtime.geo,
        rules=runtime.rules,
        clock=runtime.clock,
    )
    with pytest.raises(AssertionError):
        unlimited.rate(identity, "gpt-mock", runtime.limiter.budget())


async def test_admin_decide_answers_as_the_admission_decides(runtime: Runtime) -> None:
    admission = runtime.admission
    snapshot = admission.enforced()
    async with TestClient(TestServer(create_admin_app(runtime))) as client:
        for ip, country in (("198.51.100.1", "US"), ("203.0.113.7", "US"), ("198.51.100.1", "IR")):
            response = await client.post(
                "/admin/v1/decide",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                data=orjson.dumps(
                    {
                        "subject": "alice",
                        "org": "acme",
                        "tier": "partner",
                        "country": country,
                        "ip": ip,
                        "model": "gpt-mock",
                    }
                ),
            )
            answer = await response.json()
            identity = admission.identify(bearer(subject="alice", country=country), snapshot)
            caller = admission.caller(identity, ip, snapshot)
            decision = admission.decide(snapshot, caller, "gpt-mock")
            assert response.status == 200
            assert (answer["decision"], answer["code"]) == (decision.to_dict()["decision"], decision.code)
            assert answer["ip_country"] == caller.ip_country


def test_error_table_maps_domain_exceptions_by_type() -> None:
    cases: list[tuple[BaseException, int, str]] = [
        (AuthError("no credentials"), 401, "unauthenticated"),
        (PolicyValidationError("lists.x", "bad"), 400, "invalid_request"),
        (PolicyMissing(), 409, "policy_missing"),
        (PolicyIncomplete(["models"]), 409, "policy_incomplete"),
        (KeyRevoked("k1", {"revoked_at": "t", "revoked_by": "op"}), 409, "key_revoked"),
        (NotFound("x"), 404, "not_found"),
        (StoreUnavailable("down"), 503, "redis_unavailable"),
        (web.HTTPMethodNotAllowed("PUT", ["GET"]), 405, "method_not_allowed"),
    ]
    for exc, status, code in cases:
        err = error_for(exc)
        assert err is not None and (err.status, err.code) == (status, code), exc
    assert error_for(RuntimeError("a bug")) is None
    same = GatewayError(400, "x", "y")
    assert error_for(same) is same


def test_presentation_of_a_refusal() -> None:
    openai = Presentation(block_style="openai", blocked_by_url="https://example.com/why")
    response = openai.response(
        GatewayError(451, "country_denied", "no"),
        request_id="r1",
        policy_version=3,
        rate_headers=(("X-RateLimit-Limit", "60"),),
    )
    assert response.status == 403
    assert orjson.loads(response.body)["error"]["code"] == "unsupported_country_region_territory"
    assert response.headers["X-Gateway-Reason"] == "country_denied"
    assert response.headers["X-RateLimit-Limit"] == "60"
    plain = Presentation(blocked_by_url="https://example.com/why")
    response = plain.response(GatewayError(451, "entity_denied", "no"), request_id="r1", policy_version=3)
    assert response.status == 451 and response.headers["Link"] == '<https://example.com/why>; rel="blocked-by"'
    response = plain.response(
        GatewayError(429, "rate_limited", "slow", headers=(("Retry-After", "1"),)),
        request_id="r1",
        policy_version=3,
        rate_headers=(("X-RateLimit-Limit", "60"),),
    )
    assert "X-RateLimit-Limit" not in response.headers and response.headers["Retry-After"] == "1"
