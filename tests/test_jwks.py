"""Verification keys: loading from config, parsing JWK sets, and the background JWKS fetcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.jwks import JwksFetcher, KeyRing, VerificationKey, parse_jwks
from gateway.settings import Auth, ConfigError

from .support.clock import FakeClock
from .support.servers import JwksServer
from .support.tokens import jwks_document, make_ec_key, make_ed25519_key, make_hs256_secret, make_rsa_key
from .support.waiting import wait_until

ASYMMETRIC = ["RS256", "ES256", "EdDSA"]


@pytest.fixture(scope="module")
def rsa_key():
    return make_rsa_key("rsa-1")


@pytest.fixture(scope="module")
def ec_key():
    return make_ec_key("ec-1")


@pytest.fixture(scope="module")
def ed_key():
    return make_ed25519_key("ed-1")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def server(rsa_key) -> AsyncIterator[JwksServer]:
    async with JwksServer(jwks_document([rsa_key])) as running:
        yield running


# --- KeyRing.from_settings ----------------------------------------------------------------


def test_pem_files_load_with_kid_from_file_name_and_one_algorithm_each(tmp_path: Path, rsa_key, ec_key, ed_key) -> None:
    files = [rsa_key.write_pem(tmp_path), ec_key.write_pem(tmp_path), ed_key.write_pem(tmp_path)]
    ring = KeyRing.from_settings(Auth(algorithms=ASYMMETRIC, public_key_files=files), environ={})
    assert {kid: ring.get(kid).algorithm for kid in ("rsa-1", "ec-1", "ed-1")} == {
        "rsa-1": "RS256",
        "ec-1": "ES256",
        "ed-1": "EdDSA",
    }
    assert ring.get("rsa-1.pem") is None
    assert len(ring) == 3


def test_rsa_file_takes_the_first_rsa_algorithm_allowed(tmp_path: Path, rsa_key) -> None:
    path = rsa_key.write_pem(tmp_path)
    assert KeyRing.from_settings(Auth(algorithms=["PS256"], public_key_files=[path])).get("rsa-1").algorithm == "PS256"
    assert (
        KeyRing.from_settings(Auth(algorithms=["PS256", "RS384"], public_key_files=[path])).get("rsa-1").algorithm
        == "RS384"
    )


def test_key_type_without_an_allowed_algorithm_is_a_config_error(tmp_path: Path, ec_key) -> None:
    with pytest.raises(ConfigError, match=r"^auth\.public_key_files: .*ec-1\.pem.*EC secp256r1"):
        KeyRing.from_settings(Auth(algorithms=["RS256"], public_key_files=[ec_key.write_pem(tmp_path)]))


def test_p384_key_is_bound_to_es384(tmp_path: Path) -> None:
    key = make_ec_key("ec-384", "ES384")
    auth = Auth(algorithms=["ES256", "ES384"], public_key_files=[key.write_pem(tmp_path)])
    ring = KeyRing.from_settings(auth)
    assert ring.get("ec-384").algorithm == "ES384"


def test_private_key_file_and_unreadable_file_are_refused(tmp_path: Path, rsa_key) -> None:
    from cryptography.hazmat.primitives import serialization

    private = tmp_path / "leaked.pem"
    private.write_bytes(
        rsa_key.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match=r"^auth\.public_key_files: .*private keys are refused"):
        KeyRing.from_settings(Auth(algorithms=["RS256"], public_key_files=[private]))
    with pytest.raises(ConfigError, match=r"^auth\.public_key_files: .*missing\.pem: cannot read"):
        KeyRing.from_settings(Auth(algorithms=["RS256"], public_key_files=[tmp_path / "missing.pem"]))


def test_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    weak = make_rsa_key("weak", bits=1024)
    with pytest.raises(ConfigError, match="at least 2048 bits"):
        KeyRing.from_settings(Auth(algorithms=["RS256"], public_key_files=[weak.write_pem(tmp_path)]))


def test_hs256_mixed_with_an_asymmetric_algorithm_is_a_config_error() -> None:
    environ = {"JWT_SECRET": make_hs256_secret()}
    with pytest.raises(ConfigError, match=r"^auth\.algorithms: HS256 cannot be combined"):
        KeyRing.from_settings(Auth(algorithms=["HS256", "RS256"], hs256_secret_env="JWT_SECRET"), environ)


def test_hs256_secret_comes_from_the_named_environment_variable() -> None:
    secret = make_hs256_secret()
    ring = KeyRing.from_settings(Auth(algorithms=["HS256"], hs256_secret_env="JWT_SECRET"), {"JWT_SECRET": secret})
    key = ring.single("HS256")
    assert key is not None and key.key == secret.encode() and key.kid is None
    assert secret not in repr(key)


@pytest.mark.parametrize(
    ("auth", "environ", "message"),
    [
        (Auth(algorithms=["HS256"], hs256_secret_env="JWT_SECRET"), {}, r"^auth\.hs256_secret_env: .* not set"),
        (Auth(algorithms=["HS256"], hs256_secret_env="JWT_SECRET"), {"JWT_SECRET": "short"}, "at least 32 bytes"),
        (Auth(algorithms=["HS256"]), {}, r"^auth\.hs256_secret_env: required"),
        (
            Auth(algorithms=["RS256"], hs256_secret_env="JWT_SECRET"),
            {"JWT_SECRET": "x" * 40},
            r"^auth\.hs256_secret_env: set, but HS256 is not in auth\.algorithms",
        ),
    ],
)
def test_hs256_secret_problems_name_the_key(auth: Auth, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KeyRing.from_settings(auth, environ)


def test_two_files_with_the_same_kid_are_a_config_error(tmp_path: Path, rsa_key) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [rsa_key.write_pem(tmp_path / "a"), make_rsa_key("rsa-1").write_pem(tmp_path / "b")]
    with pytest.raises(ConfigError, match="two files give the kid 'rsa-1'"):
        KeyRing.from_settings(Auth(algorithms=["RS256"], public_key_files=files))


# --- KeyRing behaviour ----------------------------------------------------------------------


def test_single_key_is_offered_only_when_it_is_the_only_one_of_its_algorithm(rsa_key, ec_key) -> None:
    one_each = parse_jwks(jwks_document([rsa_key, ec_key]), ASYMMETRIC)
    ring = KeyRing(one_each, algorithms=ASYMMETRIC)
    assert ring.single("RS256").kid == "rsa-1"
    ring.replace_jwks([*one_each, *parse_jwks(jwks_document([make_rsa_key("rsa-2")]), ASYMMETRIC)])
    assert ring.single("RS256") is None
    assert ring.single("ES256").kid == "ec-1"


def test_generation_changes_only_when_the_keys_do(rsa_key) -> None:
    ring = KeyRing(algorithms=["RS256"])
    keys = parse_jwks(jwks_document([rsa_key]), ["RS256"])
    ring.replace_jwks(keys)
    first = ring.generation
    ring.replace_jwks(parse_jwks(jwks_document([rsa_key]), ["RS256"]))
    assert ring.generation == first
    ring.replace_jwks(parse_jwks(jwks_document([make_rsa_key("rsa-1")]), ["RS256"]))  # same kid, new key
    assert ring.generation == first + 1


def test_configured_file_wins_over_a_jwks_key_with_the_same_kid(tmp_path: Path, rsa_key) -> None:
    ring = KeyRing.from_settings(Auth(algorithms=["RS256"], public_key_files=[rsa_key.write_pem(tmp_path)]))
    impostor = make_rsa_key("rsa-1")
    ring.replace_jwks(parse_jwks(jwks_document([impostor]), ["RS256"]))
    assert ring.get("rsa-1").fingerprint == VerificationKey("x", "RS256", rsa_key.public).fingerprint


def test_replace_jwks_never_takes_a_symmetric_key() -> None:
    ring = KeyRing(algorithms=["HS256"])
    ring.replace_jwks([VerificationKey("sneaky", "HS256", b"k" * 32)])
    assert ring.get("sneaky") is None


# --- parse_jwks -----------------------------------------------------------------------------


def test_parse_jwks_skips_everything_it_cannot_bind_safely(rsa_key, ec_key, ed_key) -> None:
    document = {
        "keys": [
            rsa_key.jwk(),
            ec_key.jwk(alg=None),  # no alg: derived from the curve
            ed_key.jwk(),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "alg": "HS256"},
            {"kty": "oct", "kid": "hmac-no-alg", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
            {"kty": "XYZ", "kid": "odd"},
            make_rsa_key("enc").jwk(use="enc"),
            make_rsa_key("ps").jwk(alg="PS512"),  # alg not allowed
            make_rsa_key("lies").jwk(alg="ES256"),  # alg of another key type
            make_ec_key("p384", "ES384").jwk(alg="ES256"),  # curve does not fit the alg
            make_rsa_key("x" * 300).jwk(),  # kid too long
            make_rsa_key("weak", bits=1024).jwk(),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a jwk",
            rsa_key.jwk(kid="rsa-1"),  # duplicate kid: the first stays
        ]
    }
    keys = parse_jwks(document, ASYMMETRIC)
    assert [(k.kid, k.algorithm) for k in keys] == [("rsa-1", "RS256"), ("ec-1", "ES256"), ("ed-1", "EdDSA")]


def test_parse_jwks_turns_a_leaked_private_jwk_into_its_public_key(rsa_key) -> None:
    from jwt.algorithms import RSAAlgorithm

    private_jwk = RSAAlgorithm.to_jwk(rsa_key.private, as_dict=True) | {"kid": "leaky", "alg": "RS256"}
    [key] = parse_jwks({"keys": [private_jwk]}, ["RS256"])
    assert key.fingerprint == VerificationKey("x", "RS256", rsa_key.public).fingerprint


@pytest.mark.parametrize("document", [[], {"keys": "nope"}, {"no": "keys"}, "text", None])
def test_parse_jwks_rejects_what_is_not_a_jwk_set(document: object) -> None:
    with pytest.raises(ValueError, match="not a JWK set"):
        parse_jwks(document, ASYMMETRIC)


# --- JwksFetcher ----------------------------------------------------------------------------


def _fetcher(
    server: JwksServer, ring: KeyRing, session: aiohttp.ClientSession, clock: FakeClock, **kwargs: float
) -> JwksFetcher:
    options = {"refresh_s": 300.0, "cooldown_s": 30.0, "timeout_s": 2.0} | kwargs
    return JwksFetcher(server.url, ring, session, clock=clock, **options)


async def test_start_fetches_once_and_the_keys_are_there(server: JwksServer, session) -> None:
    ring = KeyRing(algorithms=ASYMMETRIC)
    fetcher = _fetcher(server, ring, session, FakeClock())
    await fetcher.start()
    try:
        assert ring.get("rsa-1") is not None
        assert fetcher.fetch_count == server.hits == 1
    finally:
        await fetcher.close()


async def test_refresh_requests_fetch_at_most_once_per_cooldown(server: JwksServer, session) -> None:
    clock = FakeClock()
    fetcher = _fetcher(server, KeyRing(algorithms=ASYMMETRIC), session, clock)
    await fetcher.start()
    try:
        for _ in range(1000):
            fetcher.request_refresh()
        await wait_until(lambda: server.hits == 2)
        clock.advance(29)
        fetcher.request_refresh()
        await asyncio.sleep(0.1)
        assert server.hits == 2
        clock.advance(2)
        for _ in range(1000):
            fetcher.request_refresh()
        await wait_until(lambda: server.hits == 3)
        await asyncio.sleep(0.1)
        assert server.hits == fetcher.fetch_count == 3
    finally:
        await fetcher.close()


async def test_rotation_brings_in_the_new_kid(server: JwksServer, session, rsa_key) -> None:
    ring = KeyRing(algorithms=ASYMMETRIC)
    fetcher = _fetcher(server, ring, session, FakeClock())
    await fetcher.start()
    try:
        rotated = make_rsa_key("rsa-2")
        server.document = jwks_document([rotated])
        fetcher.request_refresh()
        await wait_until(lambda: ring.get("rsa-2") is not None)
        assert ring.get("rsa-1") is None  # the retired key is gone with the rotation
    finally:
        await fetcher.close()


async def test_periodic_refresh_runs_without_any_request(server: JwksServer, session) -> None:
    fetcher = _fetcher(server, KeyRing(algorithms=ASYMMETRIC), session, FakeClock(), refresh_s=0.05)
    await fetcher.start()
    try:
        await wait_until(lambda: server.hits >= 3)
    finally:
        await fetcher.close()
    hits = server.hits
    await asyncio.sleep(0.15)
    assert server.hits == hits  # closed: no more fetches


@pytest.mark.parametrize("failure", ["status", "garbage", "empty", "too_large", "stopped"])
async def test_failed_fetch_keeps_the_last_good_keys(
    server: JwksServer, session, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    ring = KeyRing(algorithms=ASYMMETRIC)
    fetcher = _fetcher(server, ring, session, clock, max_bytes=4096)
    await fetcher.start()
    try:
        if failure == "status":
            server.status = 503
        elif failure == "garbage":
            server.raw_body = b"\xff{not json"
        elif failure == "empty":
            server.document = {"keys": [{"kty": "oct", "k": "AAAA"}]}
        elif failure == "too_large":
            server.document = {"keys": [], "padding": "x" * 10_000}
        else:
            await server.close()
        clock.advance(31)
        with caplog.at_level(logging.WARNING, logger="gateway.jwks"):
            fetcher.request_refresh()
            await wait_until(lambda: fetcher.fetch_count == 2)
            await wait_until(lambda: "keeping 1 last good keys" in caplog.text)
        assert ring.get("rsa-1") is not None
    finally:
        await fetcher.close()


async def test_slow_endpoint_times_out_and_keys_stay(server: JwksServer, session) -> None:
    clock = FakeClock()
    ring = KeyRing(algorithms=ASYMMETRIC)
    fetcher = _fetcher(server, ring, session, clock, timeout_s=0.2)
    await fetcher.start()
    try:
        server.delay_s = 5.0
        server.document = jwks_document([make_rsa_key("rsa-2")])
        clock.advance(31)
        fetcher.request_refresh()
        await wait_until(lambda: server.hits == 2)
        await asyncio.sleep(0.4)  # past the fetch timeout
        assert ring.get("rsa-1") is not None and ring.get("rsa-2") is None
        assert fetcher.last_success == clock.now - 31
    finally:
        await fetcher.close()


async def test_last_good_keys_serve_only_for_a_bounded_time(
    server: JwksServer, session, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    ring = KeyRing(algorithms=ASYMMETRIC)
    fetcher = _fetcher(server, ring, session, clock, max_stale_s=600)
    await fetcher.start()
    try:
        server.status = 503
        clock.advance(300)
        fetcher.request_refresh()
        await wait_until(lambda: fetcher.fetch_count == 2)
        assert ring.get("rsa-1") is not None
        clock.advance(301)
        with caplog.at_level(logging.ERROR, logger="gateway.jwks"):
            fetcher.request_refresh()
            await wait_until(lambda: ring.get("rsa-1") is None)
        assert "dropped 1 keys" in caplog.text
        server.status = 200  # the IdP is back: the next fetch restores the keys
        clock.advance(31)
        fetcher.request_refresh()
        await wait_until(lambda: ring.get("rsa-1") is not None)
    finally:
        await fetcher.close()


async def test_redirects_are_not_followed(rsa_key, session) -> None:
    async with JwksServer(jwks_document([rsa_key])) as elsewhere, JwksServer() as server:
        server.redirect_to = elsewhere.url
        ring = KeyRing(algorithms=ASYMMETRIC)
        fetcher = _fetcher(server, ring, session, FakeClock())
        await fetcher.start()
        await fetcher.close()
        assert server.hits == 1 and elsewhere.hits == 0
        assert ring.get("rsa-1") is None


def test_jwks_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match=r"^auth\.jwks_url"):
        JwksFetcher(
            "file:///etc/passwd",
            KeyRing(algorithms=["RS256"]),
            None,  # type: ignore[arg-type]
            refresh_s=300,
            cooldown_s=30,
        )
