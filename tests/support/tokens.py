"""JWT minting for tests: signing keys, minted and forged tokens, JWK sets, and the HS256 tokens that
gateway processes accept."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.example"
AUDIENCE = "model-gateway"
DROP = object()  # a claim value meaning "leave this claim out"
# The HS256 secret GatewayProcess hands its gateways (as TEST_HS256_SECRET).
HS_SECRET = "test-hs256-secret-of-sufficient-length-0123456789"


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
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_ssh(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    def jwk(self, *, alg: str | object | None = DROP, **extra: Any) -> dict[str, Any]:
        """The public JWK; ``alg`` defaults to the key's own, None leaves it out."""
        algorithm = {rsa.RSAPublicKey: RSAAlgorithm, ec.EllipticCurvePublicKey: ECAlgorithm}
        to_jwk = next((a.to_jwk for cls, a in algorithm.items() if isinstance(self.public, cls)), OKPAlgorithm.to_jwk)
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


def mint(key: SigningKey | Any, alg: str, claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
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


def sign_payload(key: SigningKey, payload: bytes | Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
    """A correctly signed token around any payload bytes (PyJWT's encoder refuses some claim values)."""
    if isinstance(payload, Mapping):
        payload = json.dumps(payload).encode()
    header = ({"kid": key.kid} if key.kid is not None else {}) | dict(headers or {})
    return jwt.api_jws.encode(payload, key.private, algorithm=key.alg, headers=header)


def claims(now: float, **overrides: Any) -> dict[str, Any]:
    """Valid claims for ``now``; an override of DROP removes that claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "org": "org-1",
        "org_name": "Example Corp",
        "country": "US",
        "tier": "public",
        "iat": int(now),
        "exp": int(now) + 600,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not DROP}


def b64url(data: bytes | str | Mapping[str, Any]) -> str:
    if isinstance(data, Mapping):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes, signature: bytes = b"") -> str:
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


def hs_token(
    subject: str = "alice",
    *,
    org: str | None = "acme",
    country: str | None = "US",
    tier: str | None = "partner",
    org_name: str | None = None,
    ttl: int = 3600,
    **extra: Any,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + ttl,
        "org": org,
        "country": country,
        "tier": tier,
        "org_name": org_name,
        **extra,
    }
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, HS_SECRET, algorithm="HS256")


def auth(token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or hs_token()}"}


def admin_tokens_file(directory: Path, tokens: Mapping[str, str]) -> Path:
    """An ``admin.tokens_file`` naming each actor (``name: sha256 of its token``) in ``directory``."""
    path = directory / "admin-tokens"
    path.write_text(
        "".join(f"{name}: {hashlib.sha256(token.encode()).hexdigest()}\n" for name, token in tokens.items())
    )
    return path
