"""Verification keys for JWTs: PEM files, an HS256 secret and a JWKS fetched in the background.

Every key is bound to exactly one algorithm when it is loaded, so a token can
never choose how its key is interpreted (the RS-public-key-as-HMAC-secret
confusion). Fetching never happens on a request's path: a request with an
unknown ``kid`` only asks for a refresh, rate-limited by a cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK

from .settings import Auth, ConfigError, read_secret

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)
# Named here: the shared session sends no automatic headers (the proxy's upstream requests must not
# gain any), and some identity providers refuse requests without a User-Agent.
_JWKS_HEADERS = {"Accept": "application/json", "User-Agent": "export-control-gateway (JWKS refresh)"}

MAX_KID_LENGTH = 256
MIN_RSA_BITS = 2048
MIN_HMAC_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key is at least as long as the hash
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
HMAC_ALGORITHMS = ("HS256",)
_JWK_KEY_TYPES = ("RSA", "EC", "OKP")  # never "oct": a JWKS publishes public keys only
_PRIVATE_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)


def candidate_algorithms(key: Any) -> tuple[str, ...]:
    """The algorithms a public key can serve, most preferred first."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHMS.get(key.curve.name)
        return (algorithm,) if algorithm else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def choose_algorithm(key: Any, allowed: Collection[str]) -> str | None:
    """The one algorithm this key will serve: the first candidate that is allowed."""
    return next((alg for alg in candidate_algorithms(key) if alg in allowed), None)


def _fingerprint(key: Any) -> str:
    if isinstance(key, bytes):
        material = b"hmac:" + key
    else:
        material = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(material).hexdigest()


def _describe(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removesuffix("PublicKey")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One verification key and the single algorithm it serves."""

    kid: str | None
    algorithm: str
    key: Any = field(repr=False, compare=False)  # a cryptography public key, or bytes for HS256
    fingerprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", _fingerprint(self.key))


class KeyRing:
    """All keys the gateway trusts: static ones from the config plus the latest JWKS.

    Lookups are by ``kid`` as a dict key only; ``generation`` changes whenever
    the set of keys does, so caches of verified tokens can tell they are stale.
    """

    def __init__(self, keys: Iterable[VerificationKey] = (), *, algorithms: Collection[str]) -> None:
        self.algorithms = frozenset(algorithms)
        self.generation = 0
        self._static = tuple(keys)
        self._jwks: tuple[VerificationKey, ...] = ()
        self._by_kid: dict[str, VerificationKey] = {}
        self._single: dict[str, VerificationKey] = {}
        self._rebuild()

    @classmethod
    def from_settings(cls, auth: Auth, environ: Mapping[str, str] | None = None) -> KeyRing:
        """PEM files and the HS256 secret of ``auth``; raises ConfigError naming the key at fault."""
        allowed = list(auth.algorithms)
        _check_no_mixing(allowed)
        keys = [_load_pem_file(Path(path), allowed) for path in auth.public_key_files]
        _check_unique_kids(keys)
        secret = _hmac_secret(auth, environ)
        if secret is not None:
            keys.append(VerificationKey(None, "HS256", secret))
        return cls(keys, algorithms=allowed)

    def get(self, kid: str) -> VerificationKey | None:
        return self._by_kid.get(kid)

    def single(self, algorithm: str) -> VerificationKey | None:
        """The key for a token without a ``kid``: only when exactly one key serves ``algorithm``."""
        return self._single.get(algorithm)

    def replace_jwks(self, keys: Iterable[VerificationKey]) -> None:
        """Swap in the keys of a freshly fetched JWKS (symmetric keys are never taken from one)."""
        usable = self.algorithms.difference(HMAC_ALGORITHMS)
        fresh = tuple(k for k in keys if k.algorithm in usable)
        if _signature(fresh) == _signature(self._jwks):
            return
        self._jwks = fresh
        self._rebuild()

    @property
    def jwks_keys(self) -> tuple[VerificationKey, ...]:
        return self._jwks

    def __len__(self) -> int:
        return len(self._all())

    def _all(self) -> list[VerificationKey]:
        static_kids = {k.kid for k in self._static if k.kid is not None}
        # A configured file wins over a JWKS key that claims the same kid.
        return list(self._static) + [k for k in self._jwks if k.kid not in static_kids]

    def _rebuild(self) -> None:
        keys = self._all()
        self._by_kid = {k.kid: k for k in keys if k.kid is not None}
        per_algorithm: dict[str, list[VerificationKey]] = {}
        for key in keys:
            per_algorithm.setdefault(key.algorithm, []).append(key)
        self._single = {alg: found[0] for alg, found in per_algorithm.items() if len(found) == 1}
        self.generation += 1


def _signature(keys: Iterable[VerificationKey]) -> frozenset[tuple[str | None, str, str]]:
    return frozenset((k.kid, k.algorithm, k.fingerprint) for k in keys)


def _check_no_mixing(allowed: list[str]) -> None:
    symmetric = [alg for alg in allowed if alg in HMAC_ALGORITHMS]
    if symmetric and len(symmetric) != len(allowed):
        raise ConfigError(
            "auth.algorithms: HS256 cannot be combined with asymmetric algorithms "
            "(a public key must never double as an HMAC secret)"
        )


def _check_unique_kids(keys: list[VerificationKey]) -> None:
    seen: set[str | None] = set()
    for key in keys:
        if key.kid in seen:
            raise ConfigError(f"auth.public_key_files: two files give the kid {key.kid!r}")
        seen.add(key.kid)


def _hmac_secret(auth: Auth, environ: Mapping[str, str] | None) -> bytes | None:
    wants_hmac = "HS256" in auth.algorithms
    if not wants_hmac:
        if auth.hs256_secret_env:
            raise ConfigError("auth.hs256_secret_env: set, but HS256 is not in auth.algorithms")
        return None
    if not auth.hs256_secret_env:
        raise ConfigError("auth.hs256_secret_env: required when auth.algorithms has HS256")
    secret = read_secret(auth.hs256_secret_env, environ)
    if not secret:
        raise ConfigError(
            f"auth.hs256_secret_env: environment variable {auth.hs256_secret_env} "
            f"(or {auth.hs256_secret_env}_FILE) is not set"
        )
    raw = secret.encode("utf-8")
    if len(raw) < MIN_HMAC_SECRET_BYTES:
        raise ConfigError(f"auth.hs256_secret_env: the HS256 secret must be at least {MIN_HMAC_SECRET_BYTES} bytes")
    return raw


def _public_key_from_pem(data: bytes) -> Any | None:
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        pass
    try:
        return x509.load_pem_x509_certificate(data).public_key()
    except (ValueError, TypeError):
        return None


def _load_pem_file(path: Path, allowed: list[str]) -> VerificationKey:
    where = f"auth.public_key_files: {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    key = _public_key_from_pem(data)
    if key is None:
        raise ConfigError(f"{where}: not a PEM public key or certificate (private keys are refused)")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{where}: RSA keys need at least {MIN_RSA_BITS} bits")
    algorithm = choose_algorithm(key, allowed)
    if algorithm is None:
        raise ConfigError(f"{where}: a {_describe(key)} key serves none of auth.algorithms ({', '.join(allowed)})")
    return VerificationKey(path.stem, algorithm, key)


def parse_jwks(document: Any, allowed: Collection[str]) -> list[VerificationKey]:
    """The usable keys of a JWK set; unusable members are skipped, a non-set raises ValueError."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set (no 'keys' list)")
    keys: list[VerificationKey] = []
    seen: set[str | None] = set()
    for member in document["keys"]:
        key = _parse_jwk(member, allowed)
        if key is None:
            continue
        if key.kid in seen:
            log.warning("JWKS lists kid %r twice; keeping the first", key.kid)
            continue
        seen.add(key.kid)
        keys.append(key)
    return keys


def _parse_jwk(jwk: Any, allowed: Collection[str]) -> VerificationKey | None:
    if not isinstance(jwk, dict) or jwk.get("kty") not in _JWK_KEY_TYPES:
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH):
        return None
    declared = jwk.get("alg")
    if declared is not None and (not isinstance(declared, str) or declared not in allowed):
        return None
    try:
        key = PyJWK(jwk, algorithm=declared).key
    except Exception:  # whatever a hostile JWKS holds, it only costs that one member
        return None
    if isinstance(key, _PRIVATE_KEY_TYPES):
        key = key.public_key()  # an IdP that leaks its private key still only gets verified against
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return None
    if declared is not None:
        algorithm = declared if declared in candidate_algorithms(key) else None
    else:
        algorithm = choose_algorithm(key, allowed)
    return VerificationKey(kid, algorithm, key) if algorithm else None


class JwksFetcher:
    """Keeps ``keyring``'s JWKS keys fresh from ``url`` in a background task.

    A failed or slow fetch keeps the last good keys, for at most ``max_stale_s``
    after the last success; past that they are dropped (fail closed) until a
    fetch succeeds again.
    """

    def __init__(
        self,
        url: str,
        keyring: KeyRing,
        session: aiohttp.ClientSession,
        *,
        refresh_s: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 5.0,
        max_stale_s: float | None = None,
        max_bytes: int = 1 << 20,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ConfigError("auth.jwks_url: must be an http:// or https:// URL")
        self.url = url
        self.fetch_count = 0
        self.last_success: float | None = None
        self.max_stale_s = max_stale_s if max_stale_s is not None else max(3600.0, 3 * refresh_s)
        self._keyring = keyring
        self._session = session
        self._refresh_s = refresh_s
        self._cooldown_s = cooldown_s
        self._clock = clock
        # Imported here so that the key ring, and identity with it, never load the HTTP client.
        import aiohttp

        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_bytes = max_bytes
        self._last_requested = -math.inf
        self._healthy = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls,
        auth: Auth,
        keyring: KeyRing,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> JwksFetcher:
        if not auth.jwks_url:
            raise ConfigError("auth.jwks_url: not set")
        return cls(
            auth.jwks_url, keyring, session, refresh_s=auth.jwks_refresh_s, cooldown_s=auth.jwks_cooldown_s, clock=clock
        )

    async def start(self) -> None:
        """Fetch once (bounded by the timeout) so the first requests find keys, then keep refreshing."""
        if self._task is not None:
            return
        await self._fetch()
        self._task = asyncio.create_task(self._run(), name="jwks-fetcher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request_refresh(self) -> None:
        """Ask for a fetch soon (an unknown kid was seen); at most once per cooldown; never blocks."""
        now = self._clock()
        if now - self._last_requested < self._cooldown_s:
            return
        self._last_requested = now
        self._wake.set()

    async def _run(self) -> None:
        while True:
            # After a failure, retry sooner than the regular refresh.
            delay = self._refresh_s if self._healthy else min(self._cooldown_s, self._refresh_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            await self._fetch()

    async def _fetch(self) -> None:
        self.fetch_count += 1
        try:
            keys = parse_jwks(await self._download(), self._keyring.algorithms)
            if not keys:
                raise ValueError("no usable keys")
        except Exception as exc:  # the loop must outlive any answer the IdP gives
            self._on_failure(exc)
            return
        self._keyring.replace_jwks(keys)
        self.last_success = self._clock()
        self._healthy = True

    async def _download(self) -> Any:
        async with self._session.get(
            self.url, allow_redirects=False, timeout=self._timeout, headers=_JWKS_HEADERS
        ) as response:
            if response.status != 200:
                raise ValueError(f"HTTP status {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > self._max_bytes:
                    raise ValueError(f"document larger than {self._max_bytes} bytes")
        return json.loads(body)

    def _on_failure(self, exc: Exception) -> None:
        self._healthy = False
        reason = str(exc) or type(exc).__name__
        kept = len(self._keyring.jwks_keys)
        stale = self.last_success is not None and self._clock() - self.last_success > self.max_stale_s
        if stale and kept:
            self._keyring.replace_jwks(())
            log.error(
                "JWKS fetch from %s failed (%s); last good keys are older than %.0f s, dropped %d keys",
                self.url,
                reason,
                self.max_stale_s,
                kept,
            )
        else:
            log.warning("JWKS fetch from %s failed (%s); keeping %d last good keys", self.url, reason, kept)
