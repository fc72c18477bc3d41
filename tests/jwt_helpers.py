"""Test helpers for identity: signing keys, minted and forged tokens, JWK sets and a loopback JWKS server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.example"
AUDIENCE = "model-gateway"
DROP = object()  # a claim value meaning "leave this claim out"


@dataclass(frozen=True)
class SigningKey:
    """A private key (or HS256 secret) with the kid and algorithm it signs under."""

    kid: str | None
    alg: str
    private: Any  # a cryptography private key, or bytes for HS256

    @property
    def public(self) -> Any:
        return self.private if isinstance(self.private, bytes) else self.private.public_key()

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_ssh(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    def jwk(self, *, alg: str | object | None = DROP, **extra: Any) -> dict[str, Any]:
        """The public JWK; ``alg`` defaults to the key's own, None leaves it out."""
        algorithm = {rsa.RSAPublicKey: RSAAlgorithm, ec.EllipticCurvePublicKey: ECAlgorithm}
        to_jwk = next((a.to_jwk for cls, a in algorithm.items() if isinstance(self.public, cls)),
                      OKPAlgorithm.to_jwk)
        data: dict[str, Any] = to_jwk(self.public, as_dict=True)  # type: ignore[operator]
        data["use"] = "sig"
        if self.kid is not None:
            data["kid"] = self.kid
        chosen = self.alg if alg is DROP else alg
        if chosen is not None:
            data["alg"] = chosen
        data.update(extra)
        return data

    def write_pem(self, directory: Path, name: str | None = None) -> Path:
        """The public key as ``<kid>.pem`` (the gateway takes the kid from the file name)."""
        path = directory / f"{name or self.kid}.pem"
        path.write_bytes(self.public_pem())
        return path

    def mint(self, claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
        return mint(self, self.alg, claims, headers)


def make_rsa_key(kid: str | None = "rsa-1", alg: str = "RS256", bits: int = 2048) -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))


def make_ec_key(kid: str | None = "ec-1", alg: str = "ES256") -> SigningKey:
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
    return SigningKey(kid, alg, ec.generate_private_key(curve))


def make_ed25519_key(kid: str | None = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def make_hs256_secret() -> str:
    return secrets.token_urlsafe(48)


def make_hs256_key(secret: str | None = None, kid: str | None = None) -> SigningKey:
    return SigningKey(kid, "HS256", (secret or make_hs256_secret()).encode())


def mint(key: SigningKey | Any, alg: str, claims: Mapping[str, Any],
         headers: Mapping[str, Any] | None = None) -> str:
    """A token signed the ordinary way; the key's kid goes in the header unless ``headers`` sets one."""
    header: dict[str, Any] = {}
    private = key
    if isinstance(key, SigningKey):
        private = key.private
        if key.kid is not None:
            header["kid"] = key.kid
    header.update(headers or {})
    header = {name: value for name, value in header.items() if value is not DROP}
    return jwt.encode(dict(claims), private, algorithm=alg, headers=header)


def sign_payload(key: SigningKey, payload: bytes | Mapping[str, Any],
                 headers: Mapping[str, Any] | None = None) -> str:
    """A correctly signed token around any payload bytes (PyJWT's encoder refuses some claim values)."""
    if isinstance(payload, Mapping):
        payload = json.dumps(payload).encode()
    header = ({"kid": key.kid} if key.kid is not None else {}) | dict(headers or {})
    return jwt.api_jws.encode(payload, key.private, algorithm=key.alg, headers=header)


def claims(now: float, **overrides: Any) -> dict[str, Any]:
    """Valid claims for ``now``; an override of DROP removes that claim."""
    base: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "org": "org-1", "org_name": "Example Corp",
        "country": "US", "tier": "public", "iat": int(now), "exp": int(now) + 600,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not DROP}


def b64url(data: bytes | str | Mapping[str, Any]) -> str:
    if isinstance(data, Mapping):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes,
          signature: bytes = b"") -> str:
    """A token assembled by hand, with any header and signature an attacker likes."""
    return f"{b64url(header)}.{b64url(payload)}.{b64url(signature)}"


def sign_raw(key: SigningKey, header: Mapping[str, Any], payload: Mapping[str, Any] | bytes) -> str:
    """A correctly signed token with exactly this header (PyJWT's encoder rewrites some headers)."""
    algorithm = jwt.get_algorithm_by_name(key.alg)
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key.private))
    return f"{signing_input}.{b64url(signature)}"


def forge_hs256(secret: bytes, header: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    """HS256 with any bytes as the secret (PyJWT refuses PEM-looking secrets, an attacker does not)."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def jwks_document(keys: Iterable[SigningKey | Mapping[str, Any]]) -> dict[str, Any]:
    """A JWK set of the public halves (or of JWK dicts given as they are)."""
    return {"keys": [dict(k) if isinstance(k, Mapping) else k.jwk() for k in keys]}


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class JwksServer:
    """A loopback HTTP server publishing a JWK set at ``/jwks.json``; counts hits, can fail or stall."""

    def __init__(self, document: Mapping[str, Any] | None = None) -> None:
        self.document: Any = dict(document or {"keys": []})
        self.hits = 0  # requests received
        self.served = 0  # responses completed
        self.status = 200
        self.delay_s = 0.0
        self.redirect_to: str | None = None
        self.raw_body: bytes | None = None
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def start(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Let the requests stalled so far finish now; later ones stall for ``delay_s`` again."""
        self._release.set()
        self._release = asyncio.Event()

    async def __aenter__(self) -> JwksServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.delay_s)
        self.served += 1
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        body = self.raw_body if self.raw_body is not None else json.dumps(self.document).encode()
        return web.Response(body=body, content_type="application/json")


class ConnectionCounter:
    """A loopback TCP listener that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/keys"

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


async def eventually(condition: Any, timeout_s: float = 5.0) -> None:
    """Wait (polling the loop) until ``condition()`` is true; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class BackgroundLoop:
    """An asyncio loop in a daemon thread, so loopback servers (JwksServer, ConnectionCounter) keep
    serving a gateway process while test code blocks or runs an event loop of its own."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-background-loop")
        self._thread.start()

    def run(self, coroutine: Any, timeout_s: float = 10.0) -> Any:
        """Run ``coroutine`` on the background loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def call(self, function: Any, *args: Any) -> None:
        """Call ``function(*args)`` on the background loop (e.g. to set one of its asyncio.Events)."""
        self.loop.call_soon_threadsafe(function, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
