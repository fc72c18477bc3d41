"""Who is calling: a verified identity from a Bearer JWT or API key, or an AuthError.

Verification is pure and synchronous: keys come from a KeyRing that is kept
fresh elsewhere, so no request ever waits on a fetch. Verified JWTs are cached
by token string until their ``exp``, so a hot caller costs one dict lookup.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jwt

from .jwks import MAX_KID_LENGTH, KeyRing, VerificationKey
from .policy.model import Caller
from .policy.names import CredentialKind
from .settings import Auth

API_KEY_PREFIX = "gk_"
MAX_TOKEN_BYTES = 8192
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]*")
_API_KEY_SHAPE = re.compile(r"gk_[A-Za-z0-9_-]{16,128}")
_COUNTRY_SHAPE = re.compile(r"[A-Z]{2}(-[A-Z0-9]{1,3})?")
_NEVER_ALGORITHMS = frozenset({"none"})
# exp, nbf and iat are checked below against the injected clock, not PyJWT's wall clock.
_DECODE_OPTIONS: Any = {"require": ["exp", "iss", "aud"], "verify_exp": False, "verify_nbf": False, "verify_iat": False}


class AuthError(Exception):
    """The credentials are missing, malformed, expired, revoked or not ours.

    ``message`` is for the caller: it never holds a secret or the token.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified credential says the caller is."""

    subject: str
    org: str | None
    org_name: str | None
    tier: str
    country: str | None
    credential: CredentialKind
    expires_at: float | None
    # The API key's id for an API-key caller (None for a JWT): what a key revocation is matched on.
    key_id: str | None = None

    def to_caller(self, ip: str, ip_country: str | None, ip_subdivision: str | None) -> Caller:
        return Caller(
            subject=self.subject,
            org=self.org,
            org_name=self.org_name,
            tier=self.tier,
            claimed_country=self.country,
            ip=ip,
            ip_country=ip_country,
            ip_subdivision=ip_subdivision,
            credential=self.credential,
        )


class ApiKeyLike(Protocol):
    """What the policy snapshot stores for an API key (under the key's hash).

    ``expires_at`` is epoch seconds, or an ISO 8601 instant; a record that also
    has a numeric ``expires_ts`` is judged by that.
    """

    @property
    def subject(self) -> str: ...
    @property
    def org(self) -> str | None: ...
    @property
    def org_name(self) -> str | None: ...
    @property
    def country(self) -> str | None: ...
    @property
    def tier(self) -> str: ...
    @property
    def expires_at(self) -> float | str | None: ...


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def normalise_country(value: Any) -> str | None:
    """An upper-case ISO 3166-1 alpha-2 or 3166-2 code, None when absent; AuthError otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise AuthError("invalid country claim")
    code = value.upper()
    if not _COUNTRY_SHAPE.fullmatch(code):
        raise AuthError("invalid country claim")
    return code


class Authenticator:
    """Turns an ``Authorization`` header into an Identity.

    ``on_unknown_kid`` (e.g. ``JwksFetcher.request_refresh``) is called when a
    token names a key we do not have; it may be set after construction.
    """

    def __init__(
        self,
        auth: Auth,
        tiers: Collection[str],
        keyring: KeyRing,
        *,
        clock: Callable[[], float] = time.time,
        on_unknown_kid: Callable[[], None] | None = None,
    ) -> None:
        self.on_unknown_kid = on_unknown_kid
        self._auth = auth
        self._tiers = frozenset(tiers)
        self._keyring = keyring
        self._clock = clock
        self._jwt = jwt.PyJWT()
        # token -> (identity, exp, keyring generation it was verified under)
        self._cache: OrderedDict[str, tuple[Identity, float, int]] = OrderedDict()
        self._cache_size = auth.token_cache_size

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)

    def authenticate(self, authorization: str | None, api_keys: Mapping[str, ApiKeyLike]) -> Identity:
        if authorization is not None and authorization[:7] == "Bearer ":
            # The common case, a cached JWT sent as exactly "Bearer <token>": cached tokens are what
            # parsing a header gives (stripped, bounded, no API key), so parsing this one would give
            # the very same token, and the cache is asked without it.
            sent = authorization[7:]
            cached = self._cache.get(sent)
            if cached is not None and self._clock() < cached[1] and cached[2] == self._keyring.generation:
                self._cache.move_to_end(sent)
                return cached[0]
        token = _bearer_token(authorization)
        if token.startswith(API_KEY_PREFIX):
            return self._api_key_identity(token, api_keys)
        return self._jwt_identity(token)

    # API keys

    def _api_key_identity(self, key: str, api_keys: Mapping[str, ApiKeyLike]) -> Identity:
        record = api_keys.get(hash_api_key(key)) if _API_KEY_SHAPE.fullmatch(key) else None
        if record is None:
            raise AuthError("API key revoked or unknown")
        expires_at = _api_key_expiry(record)
        if expires_at is not None and self._clock() >= expires_at:
            raise AuthError("API key expired")
        return self._identity(
            subject=record.subject,
            org=record.org,
            org_name=record.org_name,
            tier=record.tier,
            country=record.country,
            credential="api_key",
            expires_at=expires_at,
            key_id=getattr(record, "id", None),
        )

    # JWTs

    def _jwt_identity(self, token: str) -> Identity:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            identity, exp, generation = cached
            # No leeway here: the cache never serves a token at or past its exp.
            if now < exp and generation == self._keyring.generation:
                self._cache.move_to_end(token)
                return identity
            del self._cache[token]
        identity = self._verify(token, now)
        self._remember(token, identity, now)
        return identity

    def _remember(self, token: str, identity: Identity, now: float) -> None:
        if self._cache_size <= 0 or identity.expires_at is None or now >= identity.expires_at:
            return
        self._cache[token] = (identity, identity.expires_at, self._keyring.generation)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _verify(self, token: str, now: float) -> Identity:
        if not _TOKEN_SHAPE.fullmatch(token):
            raise AuthError("malformed token")
        key = self._select_key(_unverified_header(token))
        claims = self._decode(token, key)
        expires_at = _check_times(claims, now, self._auth.leeway_s)
        names = self._auth.claims
        subject = claims.get(names.subject)
        if not isinstance(subject, str) or not subject:
            raise AuthError("token has no subject")
        return self._identity(
            subject=subject,
            org=_optional_str(claims, names.org),
            org_name=_optional_str(claims, names.org_name),
            tier=claims.get(names.tier),
            country=claims.get(names.country),
            credential="jwt",
            expires_at=expires_at,
        )

    def _select_key(self, header: dict[str, Any]) -> VerificationKey:
        alg = header.get("alg")
        allowed = self._keyring.algorithms
        if not isinstance(alg, str) or alg.lower() in _NEVER_ALGORITHMS or alg not in allowed:
            raise AuthError("signing algorithm not allowed")
        kid = header.get("kid")
        if kid is None:
            key = self._keyring.single(alg)
        elif not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
            raise AuthError("invalid key id")
        else:
            key = self._keyring.get(kid)
            if key is None and self.on_unknown_kid is not None:
                self.on_unknown_kid()
        if key is None:
            raise AuthError("unknown signing key")
        if key.algorithm != alg:
            raise AuthError("signing algorithm does not match the key")
        return key

    def _decode(self, token: str, key: VerificationKey) -> dict[str, Any]:
        try:
            decoded = self._jwt.decode_complete(
                token,
                key.key,
                algorithms=[key.algorithm],
                options=_DECODE_OPTIONS,
                audience=self._auth.audience,
                issuer=self._auth.issuer,
            )
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("signing algorithm not allowed") from None
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        except Exception:  # a hostile token must end as a 401, never as a 500
            raise AuthError("malformed token") from None
        # PyJWT types the decoded token as dict[str, Any]; its "payload" is the claims object.
        payload: dict[str, Any] = decoded["payload"]
        return payload

    def _identity(
        self,
        *,
        subject: str,
        org: str | None,
        org_name: str | None,
        tier: Any,
        country: Any,
        credential: CredentialKind,
        expires_at: float | None,
        key_id: str | None = None,
    ) -> Identity:
        if tier is None:
            tier = self._auth.default_tier
        if not isinstance(tier, str) or tier not in self._tiers:
            raise AuthError("unknown tier")
        return Identity(
            subject=subject,
            org=org,
            org_name=org_name,
            tier=tier,
            country=normalise_country(country),
            credential=credential,
            expires_at=expires_at,
            key_id=key_id,
        )


def _api_key_expiry(record: ApiKeyLike) -> float | None:
    """Epoch seconds of the key's expiry; an expiry that cannot be read counts as already past."""
    value = getattr(record, "expires_ts", None)
    if value is None:
        value = record.expires_at
    if value is None:
        return None
    if isinstance(value, str):
        try:
            instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return -math.inf
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        return instant.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return -math.inf
    return float(value)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("missing credentials")
    if len(authorization) > MAX_TOKEN_BYTES + 16:
        raise AuthError("token too large")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("expected a Bearer token")
    token = token.strip()
    if not token:
        raise AuthError("missing credentials")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("token too large")
    return token


def _unverified_header(token: str) -> dict[str, Any]:
    # Only alg and kid are read; jku, x5u, x5c and jwk are never followed or trusted.
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise AuthError("malformed token") from None
    except jwt.InvalidTokenError:
        raise AuthError("invalid token header") from None
    except Exception:  # a hostile token must end as a 401, never as a 500
        raise AuthError("malformed token") from None
    if "crit" in header:
        # We implement no JWS extension, so any critical one is unknown to us (RFC 7515 §4.1.11).
        raise AuthError("unsupported critical header")
    return header


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"invalid {name} claim")
    try:
        number = float(value)
    except OverflowError:
        raise AuthError(f"invalid {name} claim") from None
    if not math.isfinite(number):
        raise AuthError(f"invalid {name} claim")
    return number


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> float:
    """The token's ``exp``, after checking exp, nbf and iat against ``now`` with ``leeway``."""
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise AuthError("token has no exp claim")
    if now >= exp + leeway:
        raise AuthError("token expired")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise AuthError("token not yet valid")
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise AuthError("token issued in the future")
    return exp


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    raise AuthError(f"invalid {name} claim")
