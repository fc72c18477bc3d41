"""The configuration model: one YAML file plus ``GATEWAY_<SECTION>__<KEY>`` overrides.

This is the only module that reads the process environment for configuration
and for secrets; everything else receives a validated :class:`Settings`.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .storage.keys import AUDIT_SHARDS_MAX

ENV_PREFIX = "GATEWAY_"
TLS_SCHEMES = ("rediss://", "rediss+sentinel://", "rediss+cluster://")
REDIS_SCHEMES = ("redis://", "unix://", "redis+sentinel://", "redis+cluster://", *TLS_SCHEMES)
Stage = Literal["internal", "partners", "general"]


class ConfigError(Exception):
    """A configuration problem, with a message that names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class Approval(_Section):
    """The two-person rule: writes of these effects wait for a second admin's approval."""

    # Empty: off, every write applies at once.
    required_for: list[Literal["loosen", "tighten"]] = Field(default_factory=list)
    # A pending change request expires this long after it was proposed.
    ttl_s: float = Field(86400, gt=0)

    @field_validator("required_for")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return sorted(set(value))


class ImpactSettings(_Section):
    """Bounds of the impact preview (the audit trail decided again under a proposed policy)."""

    hours: float = Field(24, gt=0)  # the default look-back when a preview names none
    max_records: int = Field(1_000_000, ge=1)
    max_callers: int = Field(100_000, ge=1)
    timeout_s: float = Field(10, gt=0)


class Admin(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    token_env: str | None = "GATEWAY_ADMIN_TOKEN"
    tokens_file: Path | None = None
    approval: Approval = Field(default_factory=Approval)
    impact: ImpactSettings = Field(default_factory=ImpactSettings)


class Upstream(_Section):
    url: str
    routes: dict[str, str] = Field(default_factory=dict)
    api_key_env: str | None = None
    connect_timeout_s: float = Field(5, gt=0)
    read_timeout_s: float = Field(300, gt=0)
    max_connections: int = Field(1000, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("routes")
    @classmethod
    def _route_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for glob, url in value.items():
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"route {glob!r} must map to an http:// or https:// URL")
        return {glob: url.rstrip("/") for glob, url in value.items()}


class RedisSettings(_Section):
    url: str | None = None
    timeout_s: float = Field(0.1, gt=0)  # a request's whole wait on Redis, however many calls
    # Policy polls and reads: off the hot path, so a Redis slower than timeout_s is not "no policy".
    policy_timeout_s: float = Field(2.0, gt=0)
    # Standalone: redis://host:port/db, rediss:// (TLS), unix:///path.sock.
    # Sentinel: redis+sentinel://host:port,host:port/service_name (rediss+sentinel:// for TLS).
    # Cluster: redis+cluster://host:port,host:port (seed nodes; rediss+cluster:// for TLS).
    password_env: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(REDIS_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> RedisSettings:
        # Checked at start, so a missing or mismatched file exits 2 naming the key instead of
        # surfacing later as a Redis that never answers (and a gateway failing closed).
        given = [name for name in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, name)]
        if not given:
            return self
        if not (self.url or "").startswith(TLS_SCHEMES):
            raise ValueError(f"redis.{given[0]} needs a TLS url ({', '.join(TLS_SCHEMES)})")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("redis.tls_cert_file and redis.tls_key_file go together")
        try:
            self.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"redis.{given[0]}: cannot load the TLS files: {exc}") from None
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context these files describe (peer and host name verified, TLS 1.2 at least)."""
        context = ssl.create_default_context(cafile=str(self.tls_ca_file) if self.tls_ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert_file and self.tls_key_file:
            context.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file))
        return context

    def tls_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for these TLS settings (empty for a plain-text url).

        redis-py's asyncio connections build their SSLContext from file names, so the
        files are handed over as such; :meth:`ssl_context` checked them at start.
        """
        if not (self.url or "").startswith(TLS_SCHEMES):
            return {}
        return {
            "ssl_ca_certs": str(self.tls_ca_file) if self.tls_ca_file else None,
            "ssl_certfile": str(self.tls_cert_file) if self.tls_cert_file else None,
            "ssl_keyfile": str(self.tls_key_file) if self.tls_key_file else None,
            "ssl_check_hostname": True,
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }


class Claims(_Section):
    subject: str = "sub"
    org: str = "org"
    org_name: str = "org_name"
    country: str = "country"
    tier: str = "tier"


class Auth(_Section):
    issuer: str = "https://idp.example"
    audience: str = "model-gateway"
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    jwks_url: str | None = None
    public_key_files: list[Path] = Field(default_factory=list)
    hs256_secret_env: str | None = None
    leeway_s: float = Field(30, ge=0)
    default_tier: str = "public"
    claims: Claims = Field(default_factory=Claims)
    jwks_refresh_s: float = Field(300, gt=0)
    jwks_cooldown_s: float = Field(30, gt=0)
    token_cache_size: int = Field(100_000, ge=0)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        known = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256"}
        for alg in value:
            if alg not in known:
                raise ValueError(f"unknown algorithm {alg!r}; known: {', '.join(sorted(known))}")
        if not value:
            raise ValueError("at least one algorithm is required")
        return value


class Network(_Section):
    trusted_proxies: list[str] = Field(default_factory=list)
    geoip_db: Path | None = None
    require_ip_country: bool = False
    home_countries: list[str] = Field(default_factory=lambda: ["US"])

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR") from exc
        return value

    @field_validator("home_countries")
    @classmethod
    def _countries(cls, value: list[str]) -> list[str]:
        for code in value:
            if not re.fullmatch(r"[A-Z]{2}", code):
                raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 code (upper case)")
        return value


class PolicySettings(_Section):
    max_staleness_s: float = Field(30, gt=0)
    unknown_model: Literal["deny", "allow"] = "deny"
    model_path_pattern: str | None = None
    blocked_by_url: str | None = None
    block_style: Literal["rfc7725", "openai"] = "rfc7725"
    poll_interval_s: float = Field(0.25, gt=0)
    # GET/HEAD paths a request may reach without naming a model (docs/contract.md §4, row 3a); a path
    # here also names a model as "<path>/<name>", decided as that model. Compared with the raw path.
    modelless_paths: list[str] = Field(default_factory=lambda: ["/v1/models"])

    @field_validator("modelless_paths")
    @classmethod
    def _modelless(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or path != path.strip() or path.endswith("/") or "?" in path:
                raise ValueError(f"{path!r}: each must be a path such as /v1/models (no query, no trailing /)")
        return value

    @field_validator("model_path_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from exc
        if "model" not in compiled.groupindex:
            raise ValueError("needs a group named 'model', e.g. (?P<model>[^/]+)")
        return value


def _general_stage() -> list[Stage]:
    return ["general"]


class Tier(_Section):
    requests_per_minute: int = Field(60, ge=1)
    burst: int = Field(10, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    stages: list[Stage] = Field(default_factory=_general_stage)
    # 401/403/451 answers a caller may get per minute before they become 429 (default: requests_per_minute).
    blocked_per_minute: int | None = Field(None, ge=1)

    @property
    def blocked_limit(self) -> int:
        """``blocked_per_minute``, or ``requests_per_minute`` when unset."""
        return self.blocked_per_minute or self.requests_per_minute


def _default_tiers() -> dict[str, Tier]:
    return {
        "public": Tier(requests_per_minute=60, burst=10, tokens_per_minute=100_000, stages=["general"]),
        "partner": Tier(requests_per_minute=600, burst=60, tokens_per_minute=2_000_000, stages=["partners", "general"]),
        "internal": Tier(
            requests_per_minute=6000, burst=600, tokens_per_minute=None, stages=["internal", "partners", "general"]
        ),
    }


class Limits(_Section):
    max_body_bytes: int = Field(10_485_760, ge=1)
    header_read_timeout_s: float = Field(10, gt=0)
    body_read_timeout_s: float = Field(30, gt=0)  # the whole body, however it trickles: else 408
    max_header_bytes: int = Field(8190, ge=1024)
    shutdown_grace_s: float = Field(30, ge=0)


class AuditSettings(_Section):
    stream_maxlen: int = Field(1_000_000, ge=1)
    spool_dir: Path = Path("./var/audit")
    flush_ms: int = Field(100, ge=1)
    queue_size: int = Field(100_000, ge=1)
    # True while `gateway audit archive` runs: only archived records are trimmed from Redis.
    archive: bool = False
    # Audit stream shards, one per producer's hash: about one per Redis Cluster primary (operations.md).
    shards: int = Field(1, ge=1, le=AUDIT_SHARDS_MAX)


class ScreeningSettings(_Section):
    block_threshold: float = Field(0.92, gt=0, le=1)
    review_threshold: float = Field(0.85, gt=0, le=1)
    cache_size: int = Field(10_000, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ScreeningSettings:
        if self.review_threshold > self.block_threshold:
            raise ValueError("review_threshold must not exceed block_threshold")
        return self


class Authz(_Section):
    """The decision service for data planes that keep their own proxy (off unless the section is given)."""

    host: str = "127.0.0.1"
    port: int = Field(9902, ge=0, le=65535)
    # A header the data plane sets to the model it read from the body (an njs or Lua snippet), for data
    # planes that cannot send the body. Trusted only because the data plane always overwrites it.
    model_header: str | None = None

    @field_validator("model_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
            raise ValueError(f"{value!r} is not an HTTP header name")
        if value is not None and value.lower() in ("authorization", "host", "content-type", "content-length"):
            raise ValueError(f"{value!r} carries something else; name a header of its own, e.g. X-Gateway-Model")
        return value


class RateLimitSettings(_Section):
    # Token charges are counted by the process at once and reach Redis within this many ms.
    charge_flush_ms: int = Field(50, ge=1, le=60_000)
    # How long a process decides on units it reserved in Redis for a caller (0: every check asks Redis).
    lease_ms: int = Field(250, ge=0, le=10_000)


class Logging(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = False


class Settings(_Section):
    listen: Listen = Field(default_factory=Listen)
    admin: Admin = Field(default_factory=Admin)
    upstream: Upstream
    redis: RedisSettings = Field(default_factory=RedisSettings)
    auth: Auth = Field(default_factory=Auth)
    network: Network = Field(default_factory=Network)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    tiers: dict[str, Tier] = Field(default_factory=_default_tiers)
    limits: Limits = Field(default_factory=Limits)
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    screening: ScreeningSettings = Field(default_factory=ScreeningSettings)
    logging: Logging = Field(default_factory=Logging)
    authz: Authz | None = None  # the decision service listener (docs/contract.md §15); off by default

    @model_validator(mode="after")
    def _default_tier_exists(self) -> Settings:
        if self.auth.default_tier not in self.tiers:
            raise ValueError(f"auth.default_tier {self.auth.default_tier!r} is not a key of tiers")
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``GATEWAY_SECTION__KEY[__SUB]=value`` into a nested dict; values parse as YAML scalars."""
    nested: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty key segment in environment override")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: cannot parse value: {exc}") from exc
        node = nested
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: conflicts with another override")
            node = child
        node[path[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        if key in ("upstream", "upstream.url"):
            message = _upstream_message(key, item, message)
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


UPSTREAM_EXAMPLE = "upstream: {url: http://127.0.0.1:8000}"


def _upstream_message(key: str, item: Any, message: str) -> str:
    """Say what belongs under ``upstream``: the one key without a default, so a new user meets it first."""
    if key == "upstream" and item["type"] != "missing":
        given = item.get("input")
        message = "is empty (null)" if given is None else f"must be a mapping, not {type(given).__name__}"
        message += ": it holds the model server's url"
    return f"{message}; give the model server's address, e.g. `{UPSTREAM_EXAMPLE}` (or GATEWAY_UPSTREAM__URL)"


def parse_settings(data: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a config mapping after applying environment overrides."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("(top level): the config file must hold a mapping of sections")
    merged = _merge(dict(data), _env_overrides(os.environ if environ is None else environ))
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML config at ``path``; raises ConfigError naming the key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from None
    return parse_settings(data, environ)


def read_secret(env_name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret from the environment variable ``env_name``; ``NAME_FILE`` may name a file instead."""
    if not env_name:
        return None
    env = os.environ if environ is None else environ
    value = env.get(env_name)
    if value:
        return value
    file_name = env.get(f"{env_name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"{env_name}_FILE: cannot read {file_name}: {exc.strerror}") from None
    return None
