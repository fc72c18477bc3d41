"""Reading an admin request: JSON bodies, query parameters, path parts, import sections, and the
caller a ``POST /admin/v1/decide`` body describes. Each refusal is a 400 naming the field."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from ..countries import validate_region
from ..errors import invalid, not_found
from ..identity import Identity
from ..policy.names import LIST_NAMES
from ..policy.validate import normalize_key
from ..screening import ScreeningFormatError, parse_csl
from ..storage.ops import OpsPlan, policy_ops

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
DECIDE_FIELDS = ("subject", "org", "org_name", "country", "tier", "ip", "model")


# Sections a whole-policy import may name in ``?sections=``; without it, an import into a Redis that
# holds a policy writes every section the document carries except ``api_keys`` (revocations stick).
IMPORT_SECTIONS = ("lists", "models", "api_keys", "screening")


async def read_json(request: web.Request) -> Any:
    return parse_json(await request.read())


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; 400 naming ``body`` when it is empty or not JSON."""
    if not raw.strip():
        raise invalid("body", "a JSON object is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid("body", f"is not valid JSON ({exc})") from None


def json_object(body: Any, allowed: Sequence[str], where: str = "body") -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise invalid(where, "must be a JSON object")
    for name in body:
        if name not in allowed:
            shown = name if len(name) <= 60 else name[:60] + "..."  # the message echoes it back
            raise invalid(
                shown if where == "body" else f"{where}.{shown}",
                f"unknown field; expected one of {', '.join(sorted(allowed))}",
            )
    return body


def query_limit(request: web.Request) -> int:
    return limit_of(request.query.get("limit"))


def limit_of(raw: str | None) -> int:
    """``?limit=``: 1 to MAX_LIMIT, DEFAULT_LIMIT when absent."""
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def list_name(request: web.Request) -> str:
    return list_name_of(request.match_info["list"])


def list_name_of(name: str) -> str:
    """``name`` if it names a list; 404 otherwise."""
    if name not in LIST_NAMES:
        raise not_found(f"No list named {name[:60]!r}; the lists are {', '.join(LIST_NAMES)}.")
    return name


def optional_text(value: Any, field: str, limit: int = 256) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "must be a non-empty string or null")
    if len(value) > limit:
        raise invalid(field, f"must be at most {limit} characters")
    return value


def sorted_by_key(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {key: mapping[key] for key in sorted(mapping)}


def entry_key(request: web.Request, name: str) -> str:
    return entry_key_of(request.match_info["key"], name)


def entry_key_of(raw: str, name: str) -> str:
    """An entry key from the path, normalised for list ``name``; 400 naming ``key`` when empty or invalid."""
    if not raw:
        raise invalid(
            "key",
            f"is empty: name the entry in the path, e.g. /admin/v1/lists/{name}/"
            f"{_EXAMPLE_KEYS[name]} (percent-encode a CIDR's / as %2F)",
        )
    return normalize_key(name, raw)


_EXAMPLE_KEYS = {
    "deny-countries": "CU",
    "deny-entities": "example-org",
    "partners": "example-org",
    "ip-ranges": "203.0.113.0%2F24",
}


def no_meta(body: Any) -> None:
    if isinstance(body, dict):
        for field in ("added_by", "added_at"):
            if field in body:
                raise invalid(field, "is set by the gateway; it is accepted only by PUT /admin/v1/policy")


def import_sections(raw: str | None) -> frozenset[str] | None:
    """``?sections=lists,models,...``: the sections an import writes; None when not given."""
    if raw is None:
        return None
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        raise invalid("sections", f"names no section; expected some of {', '.join(IMPORT_SECTIONS)}")
    for name in names:
        if name not in IMPORT_SECTIONS:
            raise invalid("sections", f"{name[:40]!r} is not a section; expected some of {', '.join(IMPORT_SECTIONS)}")
    return frozenset(names)


def import_plan(
    document: Mapping[str, Any], sections: frozenset[str] | None, skipped: list[str] | None = None
) -> OpsPlan:
    """The operations of an import, chosen in the write's transaction: into a Redis that holds a policy,
    the sections named (by default every one the document carries but ``api_keys``); into one that
    holds none, the whole document (a restore, which the store checks is complete). Revocations the
    document carries are always kept. ``skipped`` receives the sections the document carries but the
    write leaves alone."""

    def plan(has_policy: bool) -> list[Any]:
        chosen = dict(document)
        if has_policy:
            named = sections if sections is not None else frozenset(IMPORT_SECTIONS) - {"api_keys"}
            chosen = {k: v for k, v in document.items() if k in named or k == "revoked_api_keys"}
        if skipped is not None:
            skipped[:] = [name for name in IMPORT_SECTIONS if name in document and name not in chosen]
        return policy_ops(chosen)

    return plan


def parse_min_score(raw: str | None) -> float:
    if raw is None:
        return 0.5
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:  # also refuses NaN
        raise invalid("min_score", "must be a number from 0 to 1")
    return value


async def screening_section(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``screening`` section of a policy document: ``{"entries": [...]}``, read like an import."""
    json_object(dict(section), ("entries",), "screening")
    entries = section.get("entries", [])
    if not isinstance(entries, list):
        raise invalid("screening.entries", "must be a list of screening entries")
    if not entries:
        return []
    document = orjson.dumps({"entries": entries})
    try:
        return await asyncio.to_thread(parse_csl, document, content_type="application/json")
    except ScreeningFormatError as exc:
        raise invalid("screening", str(exc)) from None


def decide_request(body: Any, tiers: Sequence[str]) -> tuple[Identity, str, str | None]:
    """The caller (as a verified credential would describe it), address and model a
    ``POST /admin/v1/decide`` body names; its countries are the admission step's (admission.py), as
    for a public request."""
    fields = decide_fields(json_object(body, DECIDE_FIELDS), tiers)
    identity = Identity(
        subject=fields["subject"],
        org=fields["org"],
        org_name=fields["org_name"],
        tier=fields["tier"],
        country=fields["claimed_country"],
        credential="jwt",
        expires_at=None,
    )
    return identity, fields["ip"], fields["model"]


def decide_fields(body: Mapping[str, Any], tiers: Sequence[str]) -> dict[str, Any]:
    subject = optional_text(body.get("subject"), "subject")
    if subject is None:
        raise invalid("subject", "is required")
    tier = body.get("tier")
    if not isinstance(tier, str) or tier not in tiers:
        raise invalid("tier", f"must be one of {', '.join(tiers)}")
    ip = body.get("ip")
    try:
        if not isinstance(ip, str) or len(ip) > 64:
            raise ValueError
        address = str(ipaddress.ip_address(ip))
    except ValueError:
        raise invalid("ip", "must be an IPv4 or IPv6 address such as 203.0.113.7") from None
    country = body.get("country")
    if country is not None:
        try:
            country = validate_region(country)
        except ValueError as exc:
            raise invalid("country", str(exc)) from None
    return {
        "subject": subject,
        "org": optional_text(body.get("org"), "org"),
        "org_name": optional_text(body.get("org_name"), "org_name", 1000),
        "claimed_country": country,
        "tier": tier,
        "ip": address,
        "model": optional_text(body.get("model"), "model"),
    }
