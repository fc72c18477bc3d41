"""Who is calling, through running gateway processes: docs/hardening.md, identity cases 1-10 over real HTTP.

Two module-scoped gateways share one Redis of this module's own:
- ``asym``: RS256/ES256/EdDSA keys from PEM files plus a JWKS (cooldown an hour, so any refetch
  is counted), a small leeway, and ``upstream.api_key_env`` set;
- ``rotating``: RS256 from a JWKS only, with a short cooldown, for rotation and outages.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gateway.identity import hash_api_key, new_api_key
from gateway.redis_server import RedisServer

from .support.gateway_process import BASE_POLICY, CHAT, GatewayProcess, gateway_config, seed_policy
from .support.servers import BackgroundLoop, ConnectionCounter, JwksServer
from .support.tokens import (
    DROP,
    SigningKey,
    b64url,
    claims,
    forge,
    forge_hs256,
    jwks_document,
    make_ec_key,
    make_ed25519_key,
    make_rsa_key,
    sign_payload,
    sign_raw,
)
from .support.upstream import Seen, Upstream
from .support.waiting import wait_until

UPSTREAM_SECRET = "upstream-own-credential-0123456789"
LEEWAY_S = 5
PARTNERS_ONLY = "partners-only"

KEY_GOOD = new_api_key()
KEY_EXPIRED = new_api_key()
KEY_IR = new_api_key()
KEY_DOOMED = new_api_key()


def api_key_record(
    key: str,
    subject: str,
    *,
    country: str = "US",
    tier: str = "partner",
    org: str = "acme",
    expires_at: str | None = None,
) -> dict[str, Any]:
    return {
        "hash": hash_api_key(key),
        "subject": subject,
        "org": org,
        "org_name": "Acme Corp",
        "country": country,
        "tier": tier,
        "expires_at": expires_at,
        "created_at": "2026-01-01T00:00:00Z",
        "created_by": "test",
    }


def identity_policy(*, with_doomed_key: bool = True) -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["models"][PARTNERS_ONLY] = {
        "stage": "partners",
        "timeline": [],
        "allowed_countries": None,
        "export_suspended": False,
    }
    document["api_keys"] = {
        "key-good": api_key_record(KEY_GOOD, "svc-good"),
        "key-expired": api_key_record(KEY_EXPIRED, "svc-expired", expires_at="2020-01-01T00:00:00Z"),
        "key-ir": api_key_record(KEY_IR, "svc-ir", country="IR"),
    }
    if with_doomed_key:
        document["api_keys"]["key-doomed"] = api_key_record(KEY_DOOMED, "svc-doomed")
    return document


# --- module fixtures: keys, loopback servers, Redis, gateways ------------------------------------


@dataclass
class Keys:
    rsa: SigningKey  # PEM file rsa-file.pem
    ec: SigningKey  # PEM file ec-file.pem
    ed: SigningKey  # PEM file ed-file.pem
    jwks: SigningKey  # published by the asym gateway's JWKS
    rotating: SigningKey  # published by the rotating gateway's JWKS
    attacker: SigningKey  # nobody trusts this one
    attacker_pem: Path  # its public half on disk, where a kid-as-path lookup would find it


@dataclass
class Servers:
    loop: BackgroundLoop
    asym_jwks: JwksServer
    rotating_jwks: JwksServer
    counter: ConnectionCounter


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("attacker")
    attacker = make_rsa_key("attacker")
    return Keys(
        rsa=make_rsa_key("rsa-file"),
        ec=make_ec_key("ec-file"),
        ed=make_ed25519_key("ed-file"),
        jwks=make_rsa_key("jwks-1"),
        rotating=make_rsa_key("rot-1"),
        attacker=attacker,
        attacker_pem=attacker.write_pem(directory),
    )


@pytest.fixture(scope="module")
def servers(keys: Keys) -> Iterator[Servers]:
    loop = BackgroundLoop()
    asym_jwks = loop.run(JwksServer(jwks_document([keys.jwks])).start())
    rotating_jwks = loop.run(JwksServer(jwks_document([keys.rotating])).start())
    counter = loop.run(ConnectionCounter().__aenter__())
    yield Servers(loop, asym_jwks, rotating_jwks, counter)
    loop.run(asym_jwks.close())
    loop.run(rotating_jwks.close())
    loop.run(counter.__aexit__(None, None, None))
    loop.close()


@pytest.fixture(scope="module")
def module_redis() -> Iterator[str]:
    with RedisServer() as server:
        seed_policy(server.url, identity_policy())
        yield server.url


# The default tiers, with room for the hundreds of refused tokens these tests send from one address.
TIERS: dict[str, Any] = {
    "public": {
        "requests_per_minute": 60,
        "burst": 10,
        "tokens_per_minute": 100_000,
        "stages": ["general"],
        "blocked_per_minute": 100_000,
    },
    "partner": {
        "requests_per_minute": 600,
        "burst": 60,
        "tokens_per_minute": 2_000_000,
        "stages": ["partners", "general"],
        "blocked_per_minute": 100_000,
    },
    "internal": {"requests_per_minute": 6000, "burst": 600, "stages": ["internal", "partners", "general"]},
}


@pytest.fixture(scope="module")
def asym(
    module_redis: str, upstream: Upstream, keys: Keys, servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("pem")
    files = [str(key.write_pem(directory)) for key in (keys.rsa, keys.ec, keys.ed)]
    config = gateway_config(
        upstream.url,
        auth={
            "algorithms": ["RS256", "ES256", "EdDSA"],
            "hs256_secret_env": None,
            "public_key_files": files,
            "jwks_url": servers.asym_jwks.url,
            "jwks_cooldown_s": 3600,
            "jwks_refresh_s": 3600,
            "leeway_s": LEEWAY_S,
        },
        upstream={"api_key_env": "TEST_UPSTREAM_API_KEY"},
        tiers=TIERS,
    )
    gateway = GatewayProcess(config, redis_url=module_redis, env={"TEST_UPSTREAM_API_KEY": UPSTREAM_SECRET})
    yield gateway.start()
    gateway.stop()


@pytest.fixture(scope="module")
def rotating(module_redis: str, upstream: Upstream, servers: Servers) -> Iterator[GatewayProcess]:
    config = gateway_config(
        upstream.url,
        auth={
            "algorithms": ["RS256"],
            "hs256_secret_env": None,
            "jwks_url": servers.rotating_jwks.url,
            "jwks_cooldown_s": 0.3,
            "jwks_refresh_s": 3600,
            "leeway_s": LEEWAY_S,
        },
        tiers=TIERS,
    )
    gateway = GatewayProcess(config, redis_url=module_redis)
    yield gateway.start()
    gateway.stop()


@pytest.fixture
def rotating_jwks(servers: Servers, keys: Keys) -> Iterator[JwksServer]:
    """The rotating gateway's JWKS, put back to healthy with only the original key after the test."""
    jwks = servers.rotating_jwks
    yield jwks
    jwks.status = 200
    jwks.delay_s = 0.0
    jwks.document = jwks_document([keys.rotating])
    servers.loop.call(jwks.release)


# --- requests --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    body: Any
    request_id: str
    elapsed_s: float


def fresh_claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for now, with a subject of its own (so no rate limit is ever shared)."""
    overrides.setdefault("sub", f"user-{uuid.uuid4().hex[:12]}")
    return claims(time.time(), **overrides)


def token_for(key: SigningKey, **overrides: Any) -> str:
    return key.mint(fresh_claims(**overrides))


async def call(
    client: aiohttp.ClientSession,
    gateway: GatewayProcess,
    token: str | None = None,
    *,
    authorization: str | None = None,
    model: str | None = "gpt-mock",
    headers: list[tuple[str, str]] | None = None,
) -> Reply:
    request_id = f"rid-{uuid.uuid4().hex}"
    sent: list[tuple[str, str]] = [("X-Request-Id", request_id), *(headers or [])]
    if authorization is not None:
        sent.append(("Authorization", authorization))
    elif token is not None:
        sent.append(("Authorization", f"Bearer {token}"))
    started = time.monotonic()
    if model is None:
        response_cm = client.get(gateway.url + "/v1/models", headers=sent)
    else:
        response_cm = client.post(gateway.url + "/v1/chat/completions", json={**CHAT, "model": model}, headers=sent)
    async with response_cm as response:
        raw = await response.read()
        elapsed = time.monotonic() - started
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        return Reply(response.status, response.headers, body, request_id, elapsed)


def seen_for(upstream: Upstream, reply: Reply) -> list[Seen]:
    return [
        seen
        for seen in upstream.seen
        if any(k.lower() == "x-request-id" and v == reply.request_id for k, v in seen.headers)
    ]


def header_values(seen: Seen, name: str) -> list[str]:
    return [value for key, value in seen.headers if key.lower() == name.lower()]


def assert_unauthenticated(reply: Reply, upstream: Upstream) -> None:
    """The contract's 401: status, challenge, reason, OpenAI-style body; nothing reached the upstream."""
    assert reply.status == 401, (reply.status, reply.body)
    assert reply.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert reply.headers["X-Gateway-Reason"] == "unauthenticated"
    assert int(reply.headers["X-Gateway-Policy-Version"]) >= 1
    assert reply.headers["X-Request-Id"] == reply.request_id
    error = reply.body["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "unauthenticated"
    assert error["request_id"] == reply.request_id
    assert isinstance(error["message"], str) and error["message"]
    assert seen_for(upstream, reply) == []


def assert_proxied(reply: Reply, upstream: Upstream) -> Seen:
    assert reply.status == 200, (reply.status, reply.body)
    assert "X-Gateway-Reason" not in reply.headers
    seen = seen_for(upstream, reply)
    assert len(seen) == 1
    return seen[0]


async def wait_for_status(
    client: aiohttp.ClientSession, gateway: GatewayProcess, status: int, *, within_s: float, **kwargs: Any
) -> float:
    started = time.monotonic()
    while True:
        reply = await call(client, gateway, **kwargs)
        if reply.status == status:
            return time.monotonic() - started
        if time.monotonic() - started > within_s:
            raise AssertionError(f"{gateway.url} answered {reply.status}, not {status}, for {within_s} s")
        await asyncio.sleep(0.01)


def self_signed_der(key: SigningKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key.private, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


# --- case 1: alg none ---------------------------------------------------------------------------------


async def test_alg_none_and_empty_signatures_are_401(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    payload = fresh_claims()
    genuine = keys.rsa.mint(payload)
    head, body, _signature = genuine.split(".")
    tokens = [
        forge({"alg": "none", "typ": "JWT"}, payload),
        forge({"alg": "None", "typ": "JWT"}, payload),
        forge({"alg": "NONE", "typ": "JWT"}, payload),
        forge({"alg": "nOnE", "kid": "rsa-file"}, payload),
        forge({"alg": "none", "kid": "jwks-1"}, payload),
        forge({"typ": "JWT", "kid": "rsa-file"}, payload),  # no alg at all
        f"{head}.{body}.",  # the genuine header and payload with the signature cut off
        f"{head}.{body}",
    ]
    async with aiohttp.ClientSession() as client:
        for token in tokens:
            assert_unauthenticated(await call(client, asym, token), clean_upstream)
        assert clean_upstream.seen == []
        # The same header and payload with the signature in place pass: the 401s were the signature's.
        assert_proxied(await call(client, asym, genuine), clean_upstream)


# --- case 2: key confusion --------------------------------------------------------------------------


async def test_hs256_signed_with_a_public_key_is_401(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    payload = fresh_claims()
    forged: list[str] = []
    for key in (keys.rsa, keys.jwks, keys.ec):
        pem = key.public_pem()
        materials = [
            pem,
            pem.strip(),
            key.public_ssh(),
            key.public_ssh().strip(),
            json.dumps(key.jwk()).encode(),
            json.dumps(key.jwk(), separators=(",", ":")).encode(),
        ]
        for material in materials:
            for header in ({"alg": "HS256", "typ": "JWT", "kid": key.kid}, {"alg": "HS256", "typ": "JWT"}):
                forged.append(forge_hs256(material, header, payload))
    async with aiohttp.ClientSession() as client:
        for token in forged:
            assert_unauthenticated(await call(client, asym, token), clean_upstream)
        assert clean_upstream.seen == []


# --- case 3: hostile kid ------------------------------------------------------------------------------


async def test_hostile_kids_are_401_and_never_looked_up(
    asym: GatewayProcess, keys: Keys, servers: Servers, clean_upstream: Upstream
) -> None:
    attacker_path = keys.attacker_pem
    kids = [
        str(attacker_path),
        str(attacker_path.with_suffix("")),
        f"../../../..{attacker_path}",
        "../../../../etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
        "rsa-file.pem",
        "rsa-file\x00",
        "file:///etc/passwd",
        "http://127.0.0.1:1/keys",
        "x' OR '1'='1",
        "1; DROP TABLE keys; --",
        "' UNION SELECT key FROM keys --",
        "A" * 5000,
    ]
    fetches_before = servers.asym_jwks.hits
    async with aiohttp.ClientSession() as client:
        for kid in kids:
            token = sign_raw(keys.attacker, {"alg": "RS256", "typ": "JWT", "kid": kid}, fresh_claims())
            assert_unauthenticated(await call(client, asym, token), clean_upstream)
        # A 10 KB kid makes the header itself larger than the 8 KiB header limit: refused either way.
        huge = sign_raw(keys.attacker, {"alg": "RS256", "kid": "K" * 10240}, fresh_claims())
        reply = await call(client, asym, huge)
        assert reply.status in (400, 401), reply.status
        assert seen_for(clean_upstream, reply) == []
        # Even the genuine key cannot sign for a kid that is a path or a query.
        for kid in ("../rsa-file", "rsa-file' --"):
            token = sign_raw(keys.rsa, {"alg": "RS256", "kid": kid}, fresh_claims())
            assert_unauthenticated(await call(client, asym, token), clean_upstream)
        await asyncio.sleep(0.3)
        assert servers.asym_jwks.hits - fetches_before <= 1
        assert clean_upstream.seen == []


async def test_flood_of_random_kids_refetches_jwks_at_most_once_per_cooldown(
    asym: GatewayProcess, keys: Keys, servers: Servers, clean_upstream: Upstream
) -> None:
    fetches_before = servers.asym_jwks.hits
    payload = fresh_claims()
    tokens = [sign_raw(keys.attacker, {"alg": "RS256", "kid": secrets.token_hex(16)}, payload) for _ in range(200)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as client:
        replies = await asyncio.gather(*(call(client, asym, token) for token in tokens))
        for reply in replies:
            assert_unauthenticated(reply, clean_upstream)
        await asyncio.sleep(0.5)
        # The cooldown is an hour: at most the one refetch the first unknown kid asked for.
        assert servers.asym_jwks.hits - fetches_before <= 1
        # The gateway still serves genuine callers, from file and from the JWKS.
        assert_proxied(await call(client, asym, token_for(keys.rsa)), clean_upstream)
        assert_proxied(await call(client, asym, token_for(keys.jwks)), clean_upstream)


# --- case 4: key-carrying headers ----------------------------------------------------------------------


async def test_jku_x5u_x5c_jwk_headers_are_ignored_and_never_fetched(
    asym: GatewayProcess, keys: Keys, servers: Servers, clean_upstream: Upstream
) -> None:
    url = servers.counter.url
    attacker_jwk = keys.attacker.jwk()
    certificate = base64.b64encode(self_signed_der(keys.attacker)).decode()
    hostile_headers = [
        {"alg": "RS256", "kid": "attacker", "jku": url},
        {"alg": "RS256", "jku": url},
        {"alg": "RS256", "kid": "rsa-file", "jku": url},
        {"alg": "RS256", "kid": "attacker", "x5u": url},
        {"alg": "RS256", "x5u": url},
        {"alg": "RS256", "kid": "attacker", "jwk": attacker_jwk},
        {"alg": "RS256", "kid": "rsa-file", "jwk": attacker_jwk},
        {"alg": "RS256", "jwk": attacker_jwk},
        {"alg": "RS256", "kid": "rsa-file", "x5c": [certificate]},
        {"alg": "RS256", "x5c": [certificate], "x5u": url, "jku": url, "jwk": attacker_jwk},
    ]
    async with aiohttp.ClientSession() as client:
        for header in hostile_headers:
            token = sign_raw(keys.attacker, {"typ": "JWT", **header}, fresh_claims())
            assert_unauthenticated(await call(client, asym, token), clean_upstream)
        # A token of a configured key is judged on that key alone, whatever else its header names.
        genuine_header = {
            "alg": "RS256",
            "typ": "JWT",
            "kid": "rsa-file",
            "jku": url,
            "x5u": url,
            "jwk": attacker_jwk,
            "x5c": [certificate],
        }
        assert_proxied(await call(client, asym, sign_raw(keys.rsa, genuine_header, fresh_claims())), clean_upstream)
        await asyncio.sleep(0.5)
    assert servers.counter.connections == 0


# --- case 5: crit -------------------------------------------------------------------------------------


async def test_unknown_critical_header_is_401(asym: GatewayProcess, keys: Keys, clean_upstream: Upstream) -> None:
    payload = fresh_claims()
    critical = [
        {"alg": "RS256", "kid": "rsa-file", "crit": ["urn:example:unknown"], "urn:example:unknown": True},
        {"alg": "RS256", "kid": "rsa-file", "crit": ["exp"]},
        {"alg": "RS256", "kid": "rsa-file", "crit": ["b64"], "b64": True},
    ]
    async with aiohttp.ClientSession() as client:
        for header in critical:
            assert_unauthenticated(await call(client, asym, sign_raw(keys.rsa, header, payload)), clean_upstream)
        assert clean_upstream.seen == []
        plain = sign_raw(keys.rsa, {"alg": "RS256", "kid": "rsa-file"}, payload)
        assert_proxied(await call(client, asym, plain), clean_upstream)


# --- case 6: times ------------------------------------------------------------------------------------


async def test_missing_exp_expired_and_future_tokens_are_401(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    now = int(time.time())
    rejected = [
        fresh_claims(exp=DROP),
        fresh_claims(exp=None),
        fresh_claims(exp=str(now + 600)),
        fresh_claims(iat=now - 7200, exp=now - 60),  # expired well beyond the 5 s leeway
        fresh_claims(iat=now - 7200, exp=now - LEEWAY_S - 5),
        fresh_claims(nbf=now + 60),
        fresh_claims(iat=now + 60),
        fresh_claims(iat=now + 3600, nbf=now + 3600, exp=now + 7200),
    ]
    async with aiohttp.ClientSession() as client:
        for payload in rejected:
            assert_unauthenticated(await call(client, asym, sign_payload(keys.rsa, payload)), clean_upstream)
        assert clean_upstream.seen == []
        # Inside the leeway (and with exp in the future) tokens pass: the 401s were the times'.
        for payload in (
            fresh_claims(iat=now - 600, exp=now - 1),
            fresh_claims(nbf=now + 1, iat=now + 1),
            fresh_claims(),
        ):
            assert_proxied(await call(client, asym, sign_payload(keys.rsa, payload)), clean_upstream)


# --- case 7: audience and issuer -----------------------------------------------------------------------


async def test_other_audience_and_lookalike_issuers_are_401(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    rejected = [
        fresh_claims(aud="other-gateway"),
        fresh_claims(aud=["other-gateway"]),
        fresh_claims(aud="model-gatewa"),
        fresh_claims(aud="model-gateway-2"),
        fresh_claims(aud=DROP),
        fresh_claims(iss="https://idp.exampl"),  # prefixes of ours (CVE-2024-53861)
        fresh_claims(iss="https://idp"),
        fresh_claims(iss="idp.example"),
        fresh_claims(iss="https://"),
        fresh_claims(iss=""),
        fresh_claims(iss="https://idp.example.attacker.test"),  # ours as a prefix of theirs
        fresh_claims(iss="https://idp.example/"),
        fresh_claims(iss="https://IDP.EXAMPLE"),
        fresh_claims(iss=DROP),
    ]
    async with aiohttp.ClientSession() as client:
        for payload in rejected:
            assert_unauthenticated(await call(client, asym, sign_payload(keys.rsa, payload)), clean_upstream)
        assert clean_upstream.seen == []
        assert_proxied(await call(client, asym, token_for(keys.rsa)), clean_upstream)


# --- case 8: JWKS rotation, outage, slowness --------------------------------------------------------------


async def ask_for_refetch(
    client: aiohttp.ClientSession, gateway: GatewayProcess, jwks: JwksServer, token: str, upstream: Upstream
) -> None:
    """Send ``token`` (its kid unknown to the gateway) until the JWKS endpoint sees a fetch; each is a
    prompt 401 (the fetch is never on the request's path). Retries cover a cooldown still running."""
    fetches_before = jwks.hits
    deadline = time.monotonic() + 3.0
    while jwks.hits == fetches_before:
        assert time.monotonic() < deadline, "no JWKS fetch after unknown kids"
        reply = await call(client, gateway, token)
        assert_unauthenticated(reply, upstream)
        assert reply.elapsed_s < 1.0, reply.elapsed_s
        await asyncio.sleep(0.1)


async def test_jwks_rotation_new_kid_passes_after_the_background_refetch(
    rotating: GatewayProcess, rotating_jwks: JwksServer, keys: Keys, clean_upstream: Upstream
) -> None:
    new_key = make_rsa_key(f"rot-{uuid.uuid4().hex[:8]}")
    token = token_for(new_key)
    async with aiohttp.ClientSession() as client:
        # Not published yet: 401, and the refetch it asks for finds nothing new.
        await ask_for_refetch(client, rotating, rotating_jwks, token, clean_upstream)
        await wait_until(lambda: rotating_jwks.served == rotating_jwks.hits)
        await asyncio.sleep(0.4)  # that fetch is done and the 0.3 s cooldown has passed
        rotating_jwks.document = jwks_document([keys.rotating, new_key])
        fetches_before = rotating_jwks.hits
        first = await call(client, rotating, token)  # published, but not fetched: 401, refetch requested
        assert_unauthenticated(first, clean_upstream)
        assert first.elapsed_s < 1.0
        await wait_for_status(client, rotating, 200, within_s=3.0, token=token)
        assert rotating_jwks.hits == fetches_before + 1
        # The old key is still published and still serves.
        seen = assert_proxied(await call(client, rotating, token_for(keys.rotating)), clean_upstream)
        # No upstream.api_key_env on this gateway: the upstream gets no Authorization at all.
        assert header_values(seen, "Authorization") == []


async def test_jwks_endpoint_down_last_good_keys_still_serve(
    rotating: GatewayProcess, rotating_jwks: JwksServer, keys: Keys, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        assert_proxied(await call(client, rotating, token_for(keys.rotating)), clean_upstream)
        rotating_jwks.status = 503
        unknown = token_for(make_rsa_key(f"unknown-{uuid.uuid4().hex[:8]}"))
        await ask_for_refetch(client, rotating, rotating_jwks, unknown, clean_upstream)
        failed_before = rotating_jwks.served
        await wait_until(lambda: rotating_jwks.served >= failed_before + 2)  # it keeps retrying, and failing
        # Tokens of the last good key (each new, so none is served from a cache) still pass.
        for _ in range(3):
            assert_proxied(await call(client, rotating, token_for(keys.rotating)), clean_upstream)
        assert_unauthenticated(await call(client, rotating, unknown), clean_upstream)


async def test_jwks_endpoint_slow_does_not_delay_requests(
    rotating: GatewayProcess, rotating_jwks: JwksServer, keys: Keys, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        assert_proxied(await call(client, rotating, token_for(keys.rotating)), clean_upstream)
        rotating_jwks.delay_s = 4.0
        served_before = rotating_jwks.served
        unknown = token_for(make_rsa_key(f"slow-{uuid.uuid4().hex[:8]}"))
        await ask_for_refetch(client, rotating, rotating_jwks, unknown, clean_upstream)  # now stalled
        for _ in range(5):
            reply = await call(client, rotating, token_for(keys.rotating))
            assert_proxied(reply, clean_upstream)
            assert reply.elapsed_s < 1.0, reply.elapsed_s
        assert rotating_jwks.served == served_before  # the fetch was stalled all along


# --- case 9: malformed headers ---------------------------------------------------------------------------


def raw_request(gateway: GatewayProcess, authorization: bytes) -> tuple[int, bytes, bytes]:
    """Send an Authorization header holding arbitrary bytes on a raw socket: (status, head, body)."""
    port = gateway.config["listen"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: "
            + authorization
            + b"\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), data[:200]
    return int(status_line.split()[1]), head, body


async def test_malformed_authorization_is_400_or_401_never_500(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    payload = fresh_claims()
    genuine = keys.rsa.mint(payload)
    head, body, signature = genuine.split(".")
    malformed = [
        f"Bearer {head}!.{body}.{signature}",  # bad base64 characters
        f"Bearer {head}.{body}.{signature}$",
        f"Bearer {head[:-1]}.{body}.{signature}",  # base64 of a wrong length
        f"Bearer {head}.{body[:-2]}.{signature}",
        f"Bearer {head}.{body}.{signature[:-3]}",
        "Bearer e30.e30",  # wrong segment count
        f"Bearer {head}.{body}",
        f"Bearer {head}.{body}.{signature}.{signature}",
        f"Bearer {head}.{body}.{signature}.{signature}.{signature}",  # JWE-shaped
        "Bearer ..",
        "Bearer a",
        "Bearer ",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        f"Token {genuine}",
        f"Bearer {genuine} {genuine}",
        "Bearer " + forge(b"\xff\xfe\xfd", payload),  # header that is not UTF-8
        "Bearer " + forge(b"[]", payload),  # header that is not an object
        "Bearer " + forge(b"null", payload),
        "Bearer " + forge(b'{"alg": "RS256", "kid": "rsa-file"', payload),  # truncated JSON
        "Bearer " + b64url({"alg": "RS256", "kid": "rsa-file"}) + "." + b64url(b"\xff\xfe\x80") + "." + signature,
        "Bearer " + sign_payload(keys.rsa, b"\xff\xfe\x80not utf-8"),  # correctly signed garbage payload
        "Bearer " + sign_payload(keys.rsa, b"[1, 2, 3]"),
        "Bearer " + sign_payload(keys.rsa, b'{"sub": "x"'),
        f"Bearer {sign_payload(keys.rsa, {**payload, 'exp': 1e400})}",
        f"Bearer {sign_payload(keys.rsa, {**payload, 'country': ['US']})}",
        f"Bearer {sign_payload(keys.rsa, {**payload, 'tier': 'root'})}",
        f"Bearer {sign_payload(keys.rsa, {**payload, 'sub': 7})}",
        f"Bearer {sign_raw(keys.rsa, {'alg': 'RS256', 'kid': 12345}, payload)}",
        f"Bearer {sign_raw(keys.rsa, {'alg': ['RS256'], 'kid': 'rsa-file'}, payload)}",
        "Bearer gk_" + "x" * 8,  # API-key-shaped but short
        "Bearer gk_" + "!" * 40,
    ]
    async with aiohttp.ClientSession() as client:
        for authorization in malformed:
            reply = await call(client, asym, authorization=authorization)
            assert reply.status in (400, 401), (authorization[:80], reply.status, reply.body)
            if reply.status == 401:
                assert_unauthenticated(reply, clean_upstream)
            assert seen_for(clean_upstream, reply) == []
        for raw in (
            b"Bearer \xff\xfe\x80abc.def.ghi",
            b"Bearer " + genuine.encode() + b"\xc3\x28",
            b"Bearer \xc0\xaf\xc0\xae.\xed\xa0\x80.x",
            "Bearer é.ü.ß".encode(),
        ):
            status, head, body = await asyncio.to_thread(raw_request, asym, raw)
            assert status == 401, (raw, status, body)
            assert b'\r\nWWW-Authenticate: Bearer error="invalid_token"' in head
            assert orjson.loads(body)["error"]["code"] == "unauthenticated"
        assert clean_upstream.seen == []
        # The gateway is unharmed and still admits the genuine token.
        assert_proxied(await call(client, asym, genuine), clean_upstream)


async def test_authorization_header_over_8_kib_is_refused_with_the_contract_body(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    oversized = "Bearer " + "a" * 5000 + "." + "b" * 5000 + "." + "c" * 100
    async with aiohttp.ClientSession() as client:
        reply = await call(client, asym, authorization=oversized)
        assert reply.status in (400, 401)
        assert seen_for(clean_upstream, reply) == []
        # Every response the gateway makes itself: OpenAI-style body, request id, reason (docs/contract.md §4);
        # and none of the caller's credential is echoed back.
        assert isinstance(reply.body, dict), reply.body
        expected = {
            400: ("invalid_request_error", "invalid_request"),
            401: ("authentication_error", "unauthenticated"),
        }[reply.status]
        assert (reply.body["error"]["type"], reply.body["error"]["code"]) == expected
        assert reply.headers["X-Gateway-Reason"] == expected[1]
        assert "X-Request-Id" in reply.headers
        assert "aaaaaaaa" not in json.dumps(reply.body)
        # The gateway still admits the genuine token afterwards.
        assert_proxied(await call(client, asym, token_for(keys.rsa)), clean_upstream)


# --- case 10: caller-supplied identity headers -------------------------------------------------------------


SPOOFED = [
    ("X-Gateway-Subject", "root"),
    ("X-Gateway-Org", "acme"),
    ("X-Gateway-Tier", "internal"),
    ("X-Gateway-Country", "US"),
    ("X-Gateway-Reason", "none"),
    ("X-Country", "US"),
    ("X-Tier", "partner"),
    ("X-Gateway-Subject", "second-root"),
]


async def test_caller_identity_headers_change_nothing(
    asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        subject = f"user-{uuid.uuid4().hex[:8]}"
        reply = await call(client, asym, token_for(keys.rsa, sub=subject, tier="public", org="org-1"), headers=SPOOFED)
        seen = assert_proxied(reply, clean_upstream)
        assert header_values(seen, "X-Gateway-Subject") == [subject]
        assert header_values(seen, "X-Gateway-Org") == ["org-1"]
        assert header_values(seen, "X-Gateway-Tier") == ["public"]
        gateway_headers = sorted(k.lower() for k, _ in seen.headers if k.lower().startswith("x-gateway-"))
        assert gateway_headers == ["x-gateway-org", "x-gateway-subject", "x-gateway-tier"]

        # A tier header cannot unlock a partners-only model for a public-tier token...
        reply = await call(
            client, asym, token_for(keys.rsa, tier="public", org="acme"), model=PARTNERS_ONLY, headers=SPOOFED
        )
        assert reply.status == 403 and reply.body["error"]["code"] == "not_released"
        # ...nor an org header make a non-partner a partner...
        reply = await call(
            client, asym, token_for(keys.rsa, tier="partner", org="org-1"), model=PARTNERS_ONLY, headers=SPOOFED
        )
        assert reply.status == 403 and reply.body["error"]["code"] == "partner_required"
        # ...nor a country header lift an embargo on the token's country.
        reply = await call(client, asym, token_for(keys.rsa, country="IR"), headers=SPOOFED)
        assert reply.status == 451 and reply.body["error"]["code"] == "country_denied"
        assert reply.headers["X-Gateway-Reason"] == "country_denied"
        # A caller whose token really says partner and acme gets through, headers or not.
        reply = await call(client, asym, token_for(keys.rsa, tier="partner", org="acme"), model=PARTNERS_ONLY)
        assert_proxied(reply, clean_upstream)
        assert len(clean_upstream.seen) == 2


# --- asymmetric keys from PEM files; the caller's Authorization never goes upstream --------------------------


@pytest.mark.parametrize("which", ["rsa", "ec", "ed", "jwks"])
async def test_rs256_es256_eddsa_tokens_pass_and_credentials_stay_at_the_gateway(
    which: str, asym: GatewayProcess, keys: Keys, clean_upstream: Upstream
) -> None:
    key: SigningKey = getattr(keys, which)
    subject = f"{which}-{uuid.uuid4().hex[:8]}"
    token = token_for(key, sub=subject, tier="partner", org="acme")
    async with aiohttp.ClientSession() as client:
        seen = assert_proxied(await call(client, asym, token, model=PARTNERS_ONLY), clean_upstream)
    assert header_values(seen, "X-Gateway-Subject") == [subject]
    assert header_values(seen, "X-Gateway-Tier") == ["partner"]
    assert header_values(seen, "Authorization") == [f"Bearer {UPSTREAM_SECRET}"]
    assert all(token not in value for _, value in seen.headers)
    assert token.encode() not in seen.body


# --- API keys ---------------------------------------------------------------------------------------------


async def test_api_key_passes_with_its_own_attributes(asym: GatewayProcess, clean_upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as client:
        seen = assert_proxied(await call(client, asym, KEY_GOOD, model=PARTNERS_ONLY), clean_upstream)
        assert header_values(seen, "X-Gateway-Subject") == ["svc-good"]
        assert header_values(seen, "X-Gateway-Org") == ["acme"]
        assert header_values(seen, "X-Gateway-Tier") == ["partner"]
        assert header_values(seen, "Authorization") == [f"Bearer {UPSTREAM_SECRET}"]
        assert all(KEY_GOOD not in value for _, value in seen.headers)
        # The key's country is the caller's claim: a key issued to IR is embargoed.
        reply = await call(client, asym, KEY_IR)
        assert reply.status == 451 and reply.body["error"]["code"] == "country_denied"
        assert seen_for(clean_upstream, reply) == []


async def test_expired_and_unknown_api_keys_are_401(asym: GatewayProcess, clean_upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as client:
        assert_unauthenticated(await call(client, asym, KEY_EXPIRED), clean_upstream)
        assert_unauthenticated(await call(client, asym, new_api_key()), clean_upstream)
        assert_unauthenticated(
            await call(client, asym, KEY_GOOD[:-1] + ("A" if KEY_GOOD[-1] != "A" else "B")), clean_upstream
        )
        assert_unauthenticated(await call(client, asym, hash_api_key(KEY_GOOD)), clean_upstream)  # the hash
        assert clean_upstream.seen == []


async def test_api_key_removed_from_redis_is_401_on_every_process_within_a_second(
    asym: GatewayProcess, rotating: GatewayProcess, module_redis: str, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        for gateway in (asym, rotating):
            assert_proxied(await call(client, gateway, KEY_DOOMED, model=None), clean_upstream)
        seed_policy(module_redis, identity_policy(with_doomed_key=False))
        try:
            waits = await asyncio.gather(
                wait_for_status(client, asym, 401, within_s=3.0, token=KEY_DOOMED, model=None),
                wait_for_status(client, rotating, 401, within_s=3.0, token=KEY_DOOMED, model=None),
            )
            assert max(waits) < 1.0, waits
            for gateway in (asym, rotating):
                assert_unauthenticated(await call(client, gateway, KEY_DOOMED, model=None), clean_upstream)
            # The keys that stayed in the policy still work.
            assert_proxied(await call(client, asym, KEY_GOOD, model=None), clean_upstream)
        finally:
            seed_policy(module_redis, identity_policy())
