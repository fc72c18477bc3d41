"""Who is calling: JWT and API key verification, including docs/hardening.md, identity cases 1-9."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.identity import (
    API_KEY_PREFIX,
    Authenticator,
    AuthError,
    Identity,
    hash_api_key,
    new_api_key,
)
from gateway.jwks import JwksFetcher, KeyRing, parse_jwks
from gateway.settings import Auth, Claims

from .support.clock import FakeClock
from .support.servers import ConnectionCounter, JwksServer
from .support.tokens import (
    AUDIENCE,
    DROP,
    ISSUER,
    SigningKey,
    b64url,
    claims,
    forge,
    forge_hs256,
    jwks_document,
    make_ec_key,
    make_ed25519_key,
    make_hs256_key,
    make_rsa_key,
    mint,
    sign_payload,
    sign_raw,
)
from .support.waiting import wait_until

ALGORITHMS = ["RS256", "ES256", "EdDSA"]
TIERS = ("public", "partner", "internal")


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return make_rsa_key("rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return make_ec_key("ec-1")


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return make_ed25519_key("ed-1")


@pytest.fixture(scope="module")
def attacker_key() -> SigningKey:
    return make_rsa_key("attacker")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key_dir(tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey, ed_key: SigningKey) -> list[Path]:
    return [rsa_key.write_pem(tmp_path), ec_key.write_pem(tmp_path), ed_key.write_pem(tmp_path)]


@dataclass
class Refreshes:
    """Counts calls of on_unknown_kid."""

    count: int = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def refreshes() -> Refreshes:
    return Refreshes()


@pytest.fixture
def make_authenticator(key_dir: list[Path], clock: FakeClock, refreshes: Refreshes) -> Callable[..., Authenticator]:
    def build(keyring: KeyRing | None = None, **auth_options: Any) -> Authenticator:
        auth = Auth(**({"algorithms": ALGORITHMS, "public_key_files": key_dir} | auth_options))
        ring = keyring if keyring is not None else KeyRing.from_settings(auth, environ={})
        return Authenticator(auth, TIERS, ring, clock=clock, on_unknown_kid=refreshes)

    return build


@pytest.fixture
def authenticator(make_authenticator: Callable[..., Authenticator]) -> Authenticator:
    return make_authenticator()


def bearer(token: str) -> str:
    return f"Bearer {token}"


def accepted(authenticator: Authenticator, token: str) -> Identity:
    return authenticator.authenticate(bearer(token), {})


def rejected(authenticator: Authenticator, token: str, api_keys: Any = None) -> str:
    """The AuthError message for ``token``; fails if it was accepted or raised anything else."""
    with pytest.raises(AuthError) as info:
        authenticator.authenticate(bearer(token), api_keys or {})
    return info.value.message


# --- the good path ------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_valid_token_gives_the_identity(
    authenticator: Authenticator, clock: FakeClock, key_name: str, request: pytest.FixtureRequest
) -> None:
    key: SigningKey = request.getfixturevalue(key_name)
    token = key.mint(claims(clock.now, country="ua-43", tier="partner"))
    identity = accepted(authenticator, token)
    assert identity == Identity(
        subject="user-1",
        org="org-1",
        org_name="Example Corp",
        tier="partner",
        country="UA-43",
        credential="jwt",
        expires_at=float(int(clock.now) + 600),
    )


def test_identity_becomes_a_caller_with_every_country(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    identity = accepted(authenticator, rsa_key.mint(claims(clock.now, country="UA-43")))
    caller = identity.to_caller("203.0.113.9", "PL", None)
    assert (caller.subject, caller.org, caller.tier, caller.ip, caller.credential) == (
        "user-1",
        "org-1",
        "public",
        "203.0.113.9",
        "jwt",
    )
    assert caller.countries == {"UA-43", "UA", "PL"}


def test_scheme_is_case_insensitive_and_whitespace_tolerated(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    token = rsa_key.mint(claims(clock.now))
    assert authenticator.authenticate(f"bearer   {token} ", {}).subject == "user-1"


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_missing_or_other_scheme_credentials_are_refused(
    authenticator: Authenticator, authorization: str | None
) -> None:
    with pytest.raises(AuthError):
        authenticator.authenticate(authorization, {})


def test_claims_are_read_under_the_configured_names(make_authenticator, clock: FakeClock, rsa_key: SigningKey) -> None:
    names = Claims(subject="email", org="tenant", org_name="tenant_name", country="geo", tier="plan")
    authenticator = make_authenticator(claims=names)
    token = rsa_key.mint(
        claims(
            clock.now,
            sub=DROP,
            org=DROP,
            country=DROP,
            tier=DROP,
            email="a@example.org",
            tenant="t-9",
            tenant_name="Tenant Nine",
            geo="de",
            plan="internal",
        )
    )
    identity = accepted(authenticator, token)
    assert (identity.subject, identity.org, identity.org_name, identity.country, identity.tier) == (
        "a@example.org",
        "t-9",
        "Tenant Nine",
        "DE",
        "internal",
    )


def test_tier_defaults_when_the_token_names_none(make_authenticator, clock: FakeClock, rsa_key: SigningKey) -> None:
    authenticator = make_authenticator(default_tier="partner")
    assert accepted(authenticator, rsa_key.mint(claims(clock.now, tier=DROP))).tier == "partner"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tier": "platinum"}, "unknown tier"),
        ({"tier": ["internal"]}, "unknown tier"),
        ({"country": "USA"}, "invalid country claim"),
        ({"country": "U"}, "invalid country claim"),
        ({"country": "UA-ABCD"}, "invalid country claim"),
        ({"country": "U$"}, "invalid country claim"),
        ({"country": 840}, "invalid country claim"),
        ({"sub": DROP}, "token has no subject"),
        ({"sub": ""}, "token has no subject"),
        ({"org": {"id": 1}}, "invalid org claim"),
    ],
)
def test_bad_claims_are_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, overrides: dict[str, Any], message: str
) -> None:
    assert rejected(authenticator, rsa_key.mint(claims(clock.now, **overrides))) == message


def test_missing_country_claim_is_none(authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey) -> None:
    assert accepted(authenticator, rsa_key.mint(claims(clock.now, country=None))).country is None


# --- 1. alg none / None / empty signature ------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None])
def test_1_alg_none_in_any_spelling_is_refused(authenticator: Authenticator, clock: FakeClock, alg: Any) -> None:
    for header in ({"alg": alg}, {"alg": alg, "kid": "rsa-1"}, {"alg": alg, "typ": "JWT"}):
        assert rejected(authenticator, forge(header, claims(clock.now))) == "signing algorithm not allowed"


def test_1_empty_or_stripped_signature_is_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    valid = rsa_key.mint(claims(clock.now))
    assert rejected(authenticator, valid.rsplit(".", 1)[0] + ".") == "bad signature"
    unsigned = forge({"alg": "RS256", "kid": "rsa-1"}, claims(clock.now))
    assert rejected(authenticator, unsigned) == "bad signature"


def test_1_alg_none_is_refused_with_an_hs256_key_too(clock: FakeClock) -> None:
    key = make_hs256_key()
    auth = Auth(algorithms=["HS256"], hs256_secret_env="SECRET")
    authenticator = Authenticator(
        auth, TIERS, KeyRing.from_settings(auth, {"SECRET": key.private.decode()}), clock=clock
    )
    assert accepted(authenticator, key.mint(claims(clock.now))).subject == "user-1"
    unsigned = forge({"alg": "none"}, claims(clock.now))
    assert rejected(authenticator, unsigned) == "signing algorithm not allowed"


# --- 2. HS256 signed with the RS public key ----------------------------------------------------


@pytest.mark.parametrize("form", ["pem", "ssh", "jwk"])
@pytest.mark.parametrize("kid", ["rsa-1", None])
def test_2_hs256_signed_with_the_rsa_public_key_is_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, form: str, kid: str | None
) -> None:
    secret = {"pem": rsa_key.public_pem(), "ssh": rsa_key.public_ssh(), "jwk": json.dumps(rsa_key.jwk()).encode()}[form]
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    assert rejected(authenticator, forge_hs256(secret, header, claims(clock.now))) == "signing algorithm not allowed"


def test_2_key_bound_to_one_algorithm_refuses_another_allowed_one(
    authenticator: Authenticator, clock: FakeClock, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    # A token naming the EC key but signed RS256: both allowed, but the key serves only ES256.
    token = mint(rsa_key, "RS256", claims(clock.now), {"kid": "ec-1"})
    assert rejected(authenticator, token) == "signing algorithm does not match the key"


def test_2_hs256_only_gateway_refuses_a_token_hmacd_with_a_public_key(clock: FakeClock, rsa_key: SigningKey) -> None:
    secret = make_hs256_key()
    auth = Auth(algorithms=["HS256"], hs256_secret_env="SECRET")
    ring = KeyRing.from_settings(auth, {"SECRET": secret.private.decode()})
    authenticator = Authenticator(auth, TIERS, ring, clock=clock)
    token = forge_hs256(rsa_key.public_pem(), {"alg": "HS256"}, claims(clock.now))
    assert rejected(authenticator, token) == "bad signature"


# --- 3. hostile kids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "/dev/zero",
        "file:///etc/shadow",
        "x' OR '1'='1' --",
        "rsa-1; DROP TABLE keys",
        "http://127.0.0.1:1/k",
        "rsa-1\x00",
        "RSA-1",
        " rsa-1",
    ],
)
def test_3_kid_is_only_a_dict_key(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, refreshes: Refreshes, kid: str
) -> None:
    token = mint(rsa_key, "RS256", claims(clock.now), {"kid": kid})
    assert rejected(authenticator, token) == "unknown signing key"
    assert refreshes.count == 1


def test_3_overlong_kids_are_refused_without_a_refresh(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, refreshes: Refreshes
) -> None:
    assert rejected(authenticator, mint(rsa_key, "RS256", claims(clock.now), {"kid": "k" * 257})) == "invalid key id"
    assert (
        rejected(authenticator, mint(rsa_key, "RS256", claims(clock.now), {"kid": "k" * 10_240})) == "token too large"
    )
    assert refreshes.count == 0


@pytest.mark.parametrize("kid", [7, ["rsa-1"], {"$ne": ""}, True, ""])
def test_3_kid_that_is_not_a_string_is_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, refreshes: Refreshes, kid: Any
) -> None:
    token = forge({"alg": "RS256", "kid": kid}, claims(clock.now), b"sig")
    assert rejected(authenticator, token) in {"invalid token header", "invalid key id"}
    assert refreshes.count == 0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def jwks_setup(rsa_key: SigningKey, session: aiohttp.ClientSession) -> AsyncIterator[Any]:
    """A loopback JWKS server, a fetcher with its own fake monotonic clock, and an authenticator."""
    monotonic = FakeClock(1000.0)
    wall = FakeClock()
    auth = Auth(algorithms=ALGORITHMS)
    ring = KeyRing.from_settings(auth, environ={})
    async with JwksServer(jwks_document([rsa_key])) as server:
        fetcher = JwksFetcher(server.url, ring, session, refresh_s=300, cooldown_s=30, clock=monotonic, timeout_s=0.3)
        authenticator = Authenticator(auth, TIERS, ring, clock=wall, on_unknown_kid=fetcher.request_refresh)
        await fetcher.start()
        try:
            yield server, fetcher, authenticator, monotonic, wall
        finally:
            await fetcher.close()


async def test_3_random_kid_flood_fetches_once_per_cooldown(jwks_setup: Any, attacker_key: SigningKey) -> None:
    server, fetcher, authenticator, monotonic, wall = jwks_setup
    assert server.hits == 1

    async def flood() -> None:
        for _ in range(1000):
            token = mint(attacker_key, "RS256", claims(wall.now), {"kid": secrets.token_hex(8)})
            assert rejected(authenticator, token) == "unknown signing key"
            await asyncio.sleep(0)  # let the fetch run meanwhile, as it would under real load

    await flood()
    await wait_until(lambda: fetcher.fetch_count == 2)
    monotonic.advance(10)
    await flood()
    await asyncio.sleep(0.1)
    assert server.hits == 2
    monotonic.advance(21)
    await flood()
    await wait_until(lambda: server.hits == 3)
    await asyncio.sleep(0.1)
    assert server.hits == 3


# --- 4. jku, x5u, x5c, jwk are ignored -----------------------------------------------------------


async def test_4_key_location_headers_are_never_followed(
    jwks_setup: Any, rsa_key: SigningKey, attacker_key: SigningKey
) -> None:
    server, _fetcher, authenticator, _monotonic, wall = jwks_setup
    async with ConnectionCounter() as counter:
        planted = {
            "jku": counter.url,
            "x5u": counter.url,
            "jwk": attacker_key.jwk(),
            "x5c": [b64url(attacker_key.public_pem())],
        }
        # Signed by the attacker, who points at their own key in every way JOSE allows.
        for kid in ("attacker", DROP, "rsa-1"):
            token = mint(attacker_key.private, "RS256", claims(wall.now), planted | {"kid": kid})
            assert rejected(authenticator, token) in {"unknown signing key", "bad signature"}
        # Signed by our key: the planted headers change nothing either way.
        ours = mint(rsa_key, "RS256", claims(wall.now), planted)
        assert accepted(authenticator, ours).subject == "user-1"
        await asyncio.sleep(0.2)
        assert counter.connections == 0
    assert server.hits <= 2  # only the configured JWKS URL is ever fetched


# --- 5. crit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["https://example.org/unknown"], "https://example.org/unknown": True},
        {"crit": ["exp"]},
        {"crit": ["b64"], "b64": True},
        {"crit": []},
        {"crit": "b64"},
    ],
)
def test_5_critical_extensions_are_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, extra: dict[str, Any]
) -> None:
    token = mint(rsa_key, "RS256", claims(clock.now), extra)
    assert rejected(authenticator, token) in {"unsupported critical header", "invalid token header"}


def test_5_even_a_critical_extension_pyjwt_knows_is_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    # "b64": true is PyJWT's one known extension; the gateway implements none.
    header = {"alg": "RS256", "kid": "rsa-1", "crit": ["b64"], "b64": True}
    token = sign_raw(rsa_key, header, claims(clock.now))
    assert rejected(authenticator, token) == "unsupported critical header"
    assert accepted(authenticator, sign_raw(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, claims(clock.now)))


# --- 6. time claims --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": DROP}, "token has no exp claim"),
        ({"exp": None}, "token has no exp claim"),
        ({"exp": "tomorrow"}, "invalid exp claim"),
        ({"exp": True}, "invalid exp claim"),
        ({"exp": float("inf")}, "invalid exp claim"),
        ({"exp": float("nan")}, "invalid exp claim"),
        ({"exp": -31}, "token expired"),
        ({"nbf": 31}, "token not yet valid"),
        ({"iat": 31}, "token issued in the future"),
        ({"nbf": "soon"}, "invalid nbf claim"),
    ],
)
def test_6_time_claims_are_enforced_with_leeway(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, overrides: dict[str, Any], message: str
) -> None:
    # Integers are offsets from now, in seconds; leeway is 30 s.
    def offset(value: Any) -> Any:
        return int(clock.now) + value if isinstance(value, int) and not isinstance(value, bool) else value

    relative = {name: offset(value) for name, value in overrides.items()}
    assert rejected(authenticator, rsa_key.mint(claims(clock.now, **relative))) == message


def test_6_within_leeway_is_accepted(authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey) -> None:
    now = int(clock.now)
    token = rsa_key.mint(claims(clock.now, exp=now - 29, nbf=now + 29, iat=now + 29))
    assert accepted(authenticator, token).expires_at == now - 29


def test_6_expiry_follows_the_injected_clock(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    token = rsa_key.mint(claims(clock.now, exp=int(clock.now) + 60, iat=DROP))
    accepted(authenticator, token)
    clock.advance(60 + 30)
    assert rejected(authenticator, token) == "token expired"


# --- 7. audience and issuer -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aud": "other-service"}, "wrong audience"),
        ({"aud": ["other-service", "another"]}, "wrong audience"),
        ({"aud": AUDIENCE + "-admin"}, "wrong audience"),
        ({"aud": AUDIENCE[:-1]}, "wrong audience"),
        ({"aud": DROP}, "token has no aud claim"),
        ({"iss": ISSUER[:-1]}, "wrong issuer"),  # a prefix of ours (CVE-2024-53861)
        ({"iss": "https://idp.ex"}, "wrong issuer"),
        ({"iss": ISSUER + ".evil.test"}, "wrong issuer"),  # ours as its prefix
        ({"iss": ISSUER + "/"}, "wrong issuer"),
        ({"iss": DROP}, "token has no iss claim"),
    ],
)
def test_7_audience_and_issuer_must_match_exactly(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, overrides: dict[str, Any], message: str
) -> None:
    assert rejected(authenticator, rsa_key.mint(claims(clock.now, **overrides))) == message


@pytest.mark.parametrize("issuer", [[ISSUER], {"iss": ISSUER}, 1])
def test_7_issuer_that_is_not_a_string_is_refused(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, issuer: Any
) -> None:
    assert rejected(authenticator, sign_payload(rsa_key, claims(clock.now, iss=issuer))) == "wrong issuer"


def test_7_audience_list_containing_ours_is_accepted(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    token = rsa_key.mint(claims(clock.now, aud=["billing", AUDIENCE]))
    assert accepted(authenticator, token).subject == "user-1"


# --- 8. JWKS rotation and outages ----------------------------------------------------------------


async def test_8_rotated_key_is_accepted_after_the_background_refresh(jwks_setup: Any, rsa_key: SigningKey) -> None:
    server, fetcher, authenticator, _monotonic, wall = jwks_setup
    rotated = make_rsa_key("rsa-2")
    server.document = jwks_document([rsa_key, rotated])
    token = rotated.mint(claims(wall.now))
    # The request that meets the new kid fails at once: no fetch on its path.
    assert rejected(authenticator, token) == "unknown signing key"
    assert server.hits == 1
    await wait_until(lambda: fetcher.fetch_count == 2 and fetcher.last_success is not None and server.hits == 2)
    await wait_until(lambda: _accepts(authenticator, token))
    assert accepted(authenticator, rsa_key.mint(claims(wall.now))).subject == "user-1"


def _accepts(authenticator: Authenticator, token: str) -> bool:
    try:
        accepted(authenticator, token)
    except AuthError:
        return False
    return True


async def test_8_jwks_endpoint_down_keeps_the_last_keys(jwks_setup: Any, rsa_key: SigningKey) -> None:
    server, fetcher, authenticator, monotonic, wall = jwks_setup
    await server.close()
    monotonic.advance(31)
    assert rejected(authenticator, make_rsa_key("rsa-3").mint(claims(wall.now))) == "unknown signing key"
    await wait_until(lambda: fetcher.fetch_count == 2)
    assert accepted(authenticator, rsa_key.mint(claims(wall.now, sub="later"))).subject == "later"


async def test_8_slow_jwks_endpoint_never_delays_a_request(jwks_setup: Any, rsa_key: SigningKey) -> None:
    server, fetcher, authenticator, monotonic, wall = jwks_setup
    server.delay_s = 5.0
    monotonic.advance(31)
    fetcher.request_refresh()
    await wait_until(lambda: server.hits == 2)  # the fetch is now hanging on the server
    assert accepted(authenticator, rsa_key.mint(claims(wall.now, sub="during"))).subject == "during"
    assert rejected(authenticator, make_rsa_key("rsa-4").mint(claims(wall.now))) == "unknown signing key"
    assert server.served == 1  # both requests were answered while the fetch still hung
    await asyncio.sleep(0.4)  # the fetch times out
    assert accepted(authenticator, rsa_key.mint(claims(wall.now, sub="after"))).subject == "after"


# --- 9. malformed tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_token",
    [
        lambda k, now: forge({"alg": "RS256", "kid": "rsa-1", "pad": "x" * 9000}, claims(now), b"s"),
        lambda k, now: "eyJ!!!." + b64url(claims(now)) + ".c2ln",
        lambda k, now: "@@@.@@@.@@@",
        lambda k, now: "a.b",
        lambda k, now: "abc",
        lambda k, now: "a.b.c.d",
        lambda k, now: k.mint(claims(now)) + ".extra",
        lambda k, now: "..",
        lambda k, now: forge(b"\xff\xfe\xfd", claims(now), b"s"),
        lambda k, now: forge(b'{"alg": "RS256", "kid": "rsa-1\xff"}', claims(now), b"s"),
        lambda k, now: forge(b"not json", claims(now), b"s"),
        lambda k, now: forge(b"[1, 2, 3]", claims(now), b"s"),
        lambda k, now: forge(b'{"alg": "RS256", "kid": "rsa-1"' + b"[" * 5000, claims(now), b"s"),
        lambda k, now: forge({"kid": "rsa-1"}, claims(now), b"s"),
        lambda k, now: sign_payload(k, b"\xff\xfe not utf-8"),
        lambda k, now: sign_payload(k, b"not json"),
        lambda k, now: sign_payload(k, b"[1, 2]"),
        lambda k, now: sign_payload(k, b"[" * 2000),
        lambda k, now: "é.é.é",
        lambda k, now: "\udcff\udcfe.e30.",
        lambda k, now: k.mint(claims(now)).replace(".", ". ", 1),
        lambda k, now: "eyJhbGciOiJSUzI1NiJ9===.e30.c2ln",
    ],
)
def test_9_malformed_tokens_are_auth_errors(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    rejected(authenticator, make_token(rsa_key, clock.now))
    assert authenticator.cached_tokens == 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_9_any_text_is_an_auth_error(text: str) -> None:
    authenticator = _fuzz_authenticator()
    for authorization in (text, "Bearer " + text):
        with pytest.raises(AuthError) as info:
            authenticator.authenticate(authorization, {})
        assert info.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=100))
def test_9_any_segments_are_an_auth_error(header: bytes, payload: bytes, signature: bytes) -> None:
    authenticator = _fuzz_authenticator()
    ours = b'{"alg":"RS256","kid":"fuzz"}'
    for token in (forge(header, payload, signature), forge(ours, payload, signature)):
        with pytest.raises(AuthError):
            accepted(authenticator, token)


_FUZZ: list[Authenticator] = []


def _fuzz_authenticator() -> Authenticator:
    if not _FUZZ:  # one key for all examples: RSA key generation is slow
        ring = KeyRing(parse_jwks(jwks_document([make_rsa_key("fuzz")]), ["RS256"]), algorithms=["RS256"])
        _FUZZ.append(Authenticator(Auth(algorithms=["RS256"]), TIERS, ring))
    return _FUZZ[0]


# --- tokens without a kid ---------------------------------------------------------------------------


def test_token_without_kid_uses_the_only_key_of_its_algorithm(
    authenticator: Authenticator, clock: FakeClock, ec_key: SigningKey
) -> None:
    token = mint(ec_key.private, "ES256", claims(clock.now))
    assert accepted(authenticator, token).subject == "user-1"


def test_token_without_kid_is_refused_when_the_key_is_ambiguous(
    make_authenticator, key_dir: list[Path], clock: FakeClock, rsa_key: SigningKey, tmp_path: Path
) -> None:
    second = make_rsa_key("rsa-2").write_pem(tmp_path)
    authenticator = make_authenticator(public_key_files=[*key_dir, second])
    assert rejected(authenticator, mint(rsa_key.private, "RS256", claims(clock.now))) == "unknown signing key"
    assert accepted(authenticator, rsa_key.mint(claims(clock.now))).subject == "user-1"


# --- API keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRecord:
    subject: str = "svc-1"
    org: str | None = "org-7"
    org_name: str | None = "Seven Ltd"
    country: str | None = "de"
    tier: str = "partner"
    expires_at: float | str | None = None


@dataclass(frozen=True)
class StoredKeyRecord(KeyRecord):
    """A record that keeps its expiry as ISO text plus epoch seconds, as the admin API stores it."""

    expires_ts: float | None = None


def test_new_api_keys_are_prefixed_random_and_only_hashes_are_stored() -> None:
    keys = {new_api_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(k.startswith(API_KEY_PREFIX) and len(k) >= 40 for k in keys)
    key = next(iter(keys))
    digest = hash_api_key(key)
    assert len(digest) == 64 and int(digest, 16) >= 0 and key not in digest


def test_valid_api_key_gives_the_identity(authenticator: Authenticator) -> None:
    key = new_api_key()
    identity = authenticator.authenticate(bearer(key), {hash_api_key(key): KeyRecord()})
    assert identity == Identity(
        subject="svc-1",
        org="org-7",
        org_name="Seven Ltd",
        tier="partner",
        country="DE",
        credential="api_key",
        expires_at=None,
    )
    assert identity.to_caller("198.51.100.7", None, None).credential == "api_key"


def test_unknown_or_revoked_api_key_is_refused(authenticator: Authenticator) -> None:
    key, other = new_api_key(), new_api_key()
    keys = {hash_api_key(other): KeyRecord()}
    assert rejected(authenticator, key, keys) == "API key revoked or unknown"
    assert rejected(authenticator, "gk_short", keys) == "API key revoked or unknown"
    assert rejected(authenticator, other + "\udcff", keys) == "API key revoked or unknown"
    assert authenticator.authenticate(bearer(other), keys).subject == "svc-1"
    # Revoked: gone from the snapshot.
    assert rejected(authenticator, other, {}) == "API key revoked or unknown"


def test_expired_api_key_is_refused_on_the_injected_clock(authenticator: Authenticator, clock: FakeClock) -> None:
    key = new_api_key()
    keys = {hash_api_key(key): KeyRecord(expires_at=clock.now + 10)}
    assert authenticator.authenticate(bearer(key), keys).expires_at == clock.now + 10
    clock.advance(10)
    assert rejected(authenticator, key, keys) == "API key expired"


def test_api_key_expiry_as_iso_text_or_epoch_field(authenticator: Authenticator, clock: FakeClock) -> None:
    from datetime import UTC, datetime

    key = new_api_key()
    soon = datetime.fromtimestamp(clock.now + 5, tz=UTC).isoformat().replace("+00:00", "Z")
    assert authenticator.authenticate(bearer(key), {hash_api_key(key): KeyRecord(expires_at=soon)})
    stored = {hash_api_key(key): StoredKeyRecord(expires_at=soon, expires_ts=clock.now + 5)}
    assert authenticator.authenticate(bearer(key), stored).expires_at == clock.now + 5
    clock.advance(5)
    assert rejected(authenticator, key, {hash_api_key(key): KeyRecord(expires_at=soon)}) == "API key expired"
    assert rejected(authenticator, key, stored) == "API key expired"
    assert rejected(authenticator, key, {hash_api_key(key): KeyRecord(expires_at="garbage")}) == "API key expired"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (KeyRecord(tier="gold"), "unknown tier"),
        (KeyRecord(country="Germany"), "invalid country claim"),
    ],
)
def test_api_key_record_is_validated_like_a_token(
    authenticator: Authenticator, record: KeyRecord, message: str
) -> None:
    key = new_api_key()
    assert rejected(authenticator, key, {hash_api_key(key): record}) == message


# --- the verified-token cache -----------------------------------------------------------------------


def test_hot_token_is_served_from_the_cache(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    token = rsa_key.mint(claims(clock.now))
    first = accepted(authenticator, token)
    assert accepted(authenticator, token) is first
    assert authenticator.cached_tokens == 1


@pytest.mark.parametrize("leeway", [0, 30])
def test_cache_never_serves_a_token_at_or_past_its_exp(
    make_authenticator, clock: FakeClock, rsa_key: SigningKey, leeway: int
) -> None:
    authenticator = make_authenticator(leeway_s=leeway)
    exp = int(clock.now) + 60
    token = rsa_key.mint(claims(clock.now, exp=exp))
    first = accepted(authenticator, token)
    clock.now = exp - 0.001
    assert accepted(authenticator, token) is first
    clock.now = exp
    if leeway:
        again = accepted(authenticator, token)  # re-verified under the leeway...
        assert again is not first and authenticator.cached_tokens == 0  # ...and not cached again
        clock.now = exp + leeway
    assert rejected(authenticator, token) == "token expired"
    assert authenticator.cached_tokens == 0


def test_every_spelling_of_a_cached_tokens_header_is_the_cached_caller(
    authenticator: Authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    token = rsa_key.mint(claims(clock.now))
    first = accepted(authenticator, token)
    for header in (f"bearer {token}", f"Bearer   {token}", f" Bearer {token}\t", f"BEARER {token}", f"Bearer {token} "):
        assert authenticator.authenticate(header, {}) is first, header
    for header in (f"Bearer {token}x", f"Bearer{token}", f"Basic {token}", f"Bearer {token[:-1]}"):
        with pytest.raises(AuthError):
            authenticator.authenticate(header, {})
    assert authenticator.cached_tokens == 1


def test_cache_is_bounded_and_evicts_the_least_recent(
    make_authenticator, clock: FakeClock, rsa_key: SigningKey
) -> None:
    authenticator = make_authenticator(token_cache_size=2)
    tokens = [rsa_key.mint(claims(clock.now, sub=f"user-{n}")) for n in range(3)]
    identities = [accepted(authenticator, t) for t in tokens]
    assert authenticator.cached_tokens == 2
    assert accepted(authenticator, tokens[2]) is identities[2]
    assert accepted(authenticator, tokens[0]) is not identities[0]


def test_cache_can_be_turned_off(make_authenticator, clock: FakeClock, rsa_key: SigningKey) -> None:
    authenticator = make_authenticator(token_cache_size=0)
    token = rsa_key.mint(claims(clock.now))
    assert accepted(authenticator, token) is not accepted(authenticator, token)
    assert authenticator.cached_tokens == 0


def test_cached_token_is_rechecked_once_its_key_is_gone(clock: FakeClock, rsa_key: SigningKey) -> None:
    ring = KeyRing(algorithms=["RS256"])
    ring.replace_jwks(parse_jwks(jwks_document([rsa_key]), ["RS256"]))
    authenticator = Authenticator(Auth(algorithms=["RS256"]), TIERS, ring, clock=clock)
    token = rsa_key.mint(claims(clock.now))
    accepted(authenticator, token)
    ring.replace_jwks(parse_jwks(jwks_document([make_rsa_key("rsa-9")]), ["RS256"]))  # rsa-1 retired
    assert rejected(authenticator, token) == "unknown signing key"
