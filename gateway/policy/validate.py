"""Operator input -> the normalised stored dicts, and what a write would change or risk.

* ``validate_*`` turn operator input (admin API bodies, policy files) into the dicts the store
  keeps, or raise :class:`PolicyValidationError` naming the field.
* :func:`drop_expired`, :func:`merge_patch`, :func:`policy_diff`: an import's and a patch's
  preparation and preview.
* ``*_warnings``: writes that are valid but may be mistakes (docs/hardening.md).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.countries import validate_region
from gateway.policy.names import (
    COUNTRY_GROUPS,
    DENY_COUNTRIES,
    DENY_ENTITIES,
    GROUP_PREFIX,
    IP_RANGES,
    LATER_LISTS,
    LICENCES,
    LIST_NAMES,
    PARTNERS,
    STAGES,
)

MAX_REASON_CHARS = 1000
MAX_KEY_CHARS = 256
MAX_MODEL_NAME_CHARS = 200
_MAX_INSTANT_CHARS = 64
_ECHO_LIMIT = 60


class PolicyValidationError(ValueError):
    """Operator input that cannot become policy; ``field`` is the path to the bad value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- small validators


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shown(value: str) -> str:
    return repr(value if len(value) <= _ECHO_LIMIT else value[:_ECHO_LIMIT] + "...")


def _mapping(value: object, where: str, what: str = "an object") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyValidationError(where or "body", f"must be {what}, got {_type_name(value)}")
    return value


def _type_name(value: object) -> str:
    names = {
        type(None): "null",
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }
    return names.get(type(value), type(value).__name__)


def _no_unknown(body: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    for name in body:
        if name not in allowed:
            shown = name if isinstance(name, str) else repr(name)
            raise PolicyValidationError(
                _join(where, shown), f"unknown field; expected one of {', '.join(sorted(allowed))}"
            )


def _is_control(ch: str) -> bool:
    # Unicode category C: controls, format characters (zero-width joiners,
    # direction overrides), surrogates, private use and unassigned. None belong
    # in an identifier an operator has to read and match exactly.
    return unicodedata.category(ch).startswith("C")


def _text(value: object, where: str, *, required: bool, limit: int = MAX_REASON_CHARS) -> str:
    """Free text (reason, source): stripped, bounded, no control characters except tab and newline."""
    if value is None:
        if required:
            raise PolicyValidationError(where, "is required and must not be empty")
        return ""
    if not isinstance(value, str):
        raise PolicyValidationError(where, f"must be a string, got {_type_name(value)}")
    text = value.strip()
    if required and not text:
        raise PolicyValidationError(where, "is required and must not be empty")
    if len(text) > limit:
        raise PolicyValidationError(where, f"must be at most {limit} characters, got {len(text)}")
    if any(_is_control(ch) and ch not in "\t\n" for ch in text):
        raise PolicyValidationError(where, "must not contain control characters")
    return text


def _identifier(value: object, where: str, *, limit: int = MAX_KEY_CHARS, spaces: bool = True) -> str:
    """A name matched exactly (subject, org, model, key id): no surrounding space, no control chars."""
    if not isinstance(value, str):
        raise PolicyValidationError(where, f"must be a string, got {_type_name(value)}")
    if not value:
        raise PolicyValidationError(where, "must not be empty")
    if len(value) > limit:
        raise PolicyValidationError(where, f"must be at most {limit} characters, got {len(value)}")
    if any(_is_control(ch) for ch in value):
        raise PolicyValidationError(where, "must not contain control or invisible format characters")
    if not spaces and any(ch.isspace() for ch in value):
        raise PolicyValidationError(where, f"{_shown(value)} must not contain whitespace")
    if value != value.strip():
        raise PolicyValidationError(where, f"{_shown(value)} must not start or end with whitespace")
    return value


def region_code(value: object, where: str) -> str:
    try:
        return validate_region(value)
    except ValueError as exc:
        raise PolicyValidationError(where, str(exc)) from None


_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.-]{0,63}")


def group_name(value: object, where: str) -> str:
    """A country group's name (``E:1``, ``tier-1``): letters, digits, ``:_.-``, at most 64."""
    if not isinstance(value, str) or not _GROUP_NAME.fullmatch(value):
        shown = _shown(value) if isinstance(value, str) else _type_name(value)
        raise PolicyValidationError(
            where, f"{shown} is not a country group name (letters, digits and :_.- , at most 64, e.g. E:1)"
        )
    return value


def place_code(value: object, where: str) -> str:
    """A country or subdivision code, or ``@NAME`` naming a country group."""
    if isinstance(value, str) and value[:1] == GROUP_PREFIX:
        return GROUP_PREFIX + group_name(value[1:], where)
    return region_code(value, where)


def _places(value: object, where: str, *, groups: bool = True, required: bool = True) -> list[str]:
    """A non-empty list of codes (and, with ``groups``, ``@GROUP`` references), sorted, without repeats."""
    if not isinstance(value, list):
        raise PolicyValidationError(where, f"must be a list of country codes, got {_type_name(value)}")
    if required and not value:
        raise PolicyValidationError(where, "must name at least one country")
    check = place_code if groups else region_code
    return sorted({check(code, f"{where}[{i}]") for i, code in enumerate(value)})


def _bool(value: object, where: str) -> bool:
    # A string "false" must never read as true: only JSON booleans are accepted.
    if not isinstance(value, bool):
        raise PolicyValidationError(where, f"must be true or false, got {_type_name(value)}")
    return value


def stage_name(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in STAGES:
        shown = _shown(value) if isinstance(value, str) else _type_name(value)
        raise PolicyValidationError(where, f"{shown} is not a stage; expected one of {', '.join(STAGES)}")
    return value


def _format_utc(moment: datetime) -> str:
    text = moment.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def format_instant(ts: float) -> str:
    """Epoch seconds as the ISO-8601 UTC form the policy stores, e.g. ``2026-01-31T09:30:00Z``."""
    return _format_utc(datetime.fromtimestamp(ts, UTC))


_INSTANT_FORM = "an ISO-8601 date-time with a time zone, e.g. 2027-01-31T00:00:00Z or 2027-01-31T09:00:00+01:00"


def parse_instant(value: object, where: str) -> tuple[str, float]:
    """An ISO-8601 date-time with a time zone -> (normalised UTC text, epoch seconds)."""
    if not isinstance(value, str) or not value or len(value) > _MAX_INSTANT_CHARS:
        raise PolicyValidationError(where, f"must be {_INSTANT_FORM}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PolicyValidationError(where, f"{_shown(value)} is not {_INSTANT_FORM}") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise PolicyValidationError(
            where, f"{_shown(value)} has no time zone; the accepted form is {_INSTANT_FORM} (add Z for UTC)"
        )
    try:
        return _format_utc(moment), moment.timestamp()
    except (OverflowError, ValueError):
        raise PolicyValidationError(where, f"{_shown(value)} is out of range") from None


def optional_instant(value: object, where: str) -> tuple[str | None, float | None]:
    if value is None:
        return None, None
    return parse_instant(value, where)


def _future_expiry(value: object, where: str, now: float | None) -> str | None:
    """An optional ``expires_at``; with ``now`` given it must lie after it.

    An entry that has already expired applies to nobody, so writing one would only remove what
    it replaces (an active deny entry, say) while looking like a change to it: refused.
    """
    text, moment = optional_instant(value, where)
    if now is not None and moment is not None and moment <= now:
        raise PolicyValidationError(
            where,
            f"{text} is not in the future (now is {format_instant(now)}); "
            "give a later instant, or leave expires_at out for no expiry",
        )
    return text


# --------------------------------------------------------------------------- keys and names


def check_list(list_name: object) -> str:
    if list_name not in LIST_NAMES:
        shown = _shown(list_name) if isinstance(list_name, str) else _type_name(list_name)
        raise PolicyValidationError("list", f"{shown} is not a list; expected one of {', '.join(LIST_NAMES)}")
    return list_name


def normalize_key(list_name: str, key: object, *, where: str = "key") -> str:
    """The stored form of a list key: upper-case region, canonical CIDR, or the checked identifier."""
    check_list(list_name)
    if list_name == DENY_COUNTRIES:
        return place_code(key, where)
    if list_name == COUNTRY_GROUPS:
        return group_name(key, where)
    if list_name == LICENCES:
        return _identifier(key, where, spaces=False)
    if list_name == IP_RANGES:
        if not isinstance(key, str) or not key or len(key) > 64:
            raise PolicyValidationError(where, "must be a CIDR such as 203.0.113.0/24 or 2001:db8::/32")
        try:
            # strict=False: "203.0.113.7/24" means the /24 it lies in.
            return str(ipaddress.ip_network(key.strip(), strict=False))
        except ValueError:
            raise PolicyValidationError(
                where, f"{_shown(key)} is not a CIDR such as 203.0.113.0/24 or 2001:db8::/32"
            ) from None
    return _identifier(key, where)


def validate_model_name(name: object, *, where: str = "model") -> str:
    """A registry name: 1-200 characters, no whitespace or control characters."""
    return _identifier(name, where, limit=MAX_MODEL_NAME_CHARS, spaces=False)


# --------------------------------------------------------------------------- validation of operator input

_ENTRY_FIELDS = frozenset({"reason", "source", "expires_at", "added_by", "added_at", "enforce"})
_IP_ENTRY_FIELDS = _ENTRY_FIELDS | {"country"}
# A country group is a definition, not a time-bound rule: it does not expire.
_GROUP_ENTRY_FIELDS = _ENTRY_FIELDS | {"countries"}
_LICENCE_FIELDS = _ENTRY_FIELDS | {"org", "models", "countries"}
_FIELDS_OF = {IP_RANGES: _IP_ENTRY_FIELDS, COUNTRY_GROUPS: _GROUP_ENTRY_FIELDS, LICENCES: _LICENCE_FIELDS}


def validate_entry(
    list_name: str,
    key: object,
    body: object,
    *,
    actor: str,
    now_iso: str,
    keep_meta: bool = False,
    where: str = "",
    now: float | None = None,
) -> dict[str, Any]:
    """Check one list entry and return the dict to store.

    With ``now`` (epoch seconds) an ``expires_at`` must lie in the future.

    ``added_by``/``added_at`` are set to ``actor``/``now_iso`` unless
    ``keep_meta`` and the body carries them (a whole-policy import keeps the
    history it restores). ``where`` prefixes field paths, e.g.
    ``lists.deny-countries.CU``; use :func:`normalize_key` for the stored key.
    """
    check_list(list_name)
    normalize_key(list_name, key, where=where or "key")
    data = _mapping(body, where)
    ip_list = list_name == IP_RANGES
    allowed = _FIELDS_OF.get(list_name, _ENTRY_FIELDS)
    if not ip_list and "country" in data:
        raise PolicyValidationError(_join(where, "country"), f"only ip-ranges entries carry a country, not {list_name}")
    _no_unknown(data, allowed, where)
    if list_name == LICENCES and data.get("expires_at") is None:
        raise PolicyValidationError(_join(where, "expires_at"), "is required: a licence is granted until a date")
    stored: dict[str, Any] = {
        "reason": _text(data.get("reason"), _join(where, "reason"), required=True),
        "source": _text(data.get("source"), _join(where, "source"), required=False),
        "added_by": actor,
        "added_at": now_iso,
        "expires_at": _future_expiry(data.get("expires_at"), _join(where, "expires_at"), now),
    }
    if keep_meta:
        # An empty value counts as absent: the import stamps it like a new entry.
        if data.get("added_by") not in (None, ""):
            stored["added_by"] = _identifier(data["added_by"], _join(where, "added_by"))
        if data.get("added_at") not in (None, ""):
            stored["added_at"] = parse_instant(data["added_at"], _join(where, "added_at"))[0]
    if ip_list:
        if data.get("country") is None:
            raise PolicyValidationError(_join(where, "country"), "is required for ip-ranges entries")
        stored["country"] = region_code(data["country"], _join(where, "country"))
    if list_name == COUNTRY_GROUPS:
        if stored["expires_at"] is not None:
            raise PolicyValidationError(_join(where, "expires_at"), "a country group does not expire; leave it out")
        # Members are plain codes: a group does not name another group, so resolving one is one step.
        stored["countries"] = _places(data.get("countries"), _join(where, "countries"), groups=False)
    elif list_name == LICENCES:
        stored["org"] = _identifier(data.get("org"), _join(where, "org"))
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise PolicyValidationError(_join(where, "models"), "must be a non-empty list of registered model names")
        path = _join(where, "models")
        stored["models"] = sorted({validate_model_name(name, where=f"{path}[{i}]") for i, name in enumerate(models)})
        stored["countries"] = _places(data.get("countries"), _join(where, "countries"))
    # A shadow entry: stored and versioned, decided alongside, not enforced. The default (true) is
    # not stored, so an enforced entry reads as it always has.
    if "enforce" in data and not _bool(data["enforce"], _join(where, "enforce")):
        stored["enforce"] = False
    return stored


def validate_list(
    list_name: str,
    entries: object,
    *,
    actor: str,
    now_iso: str,
    keep_meta: bool = False,
    where: str = "entries",
    now: float | None = None,
) -> dict[str, dict[str, Any]]:
    """A whole list ``{key: entry}``: keys normalised, two spellings of one key refused."""
    check_list(list_name)
    data = _mapping(entries, where, "an object of key: entry")
    out: dict[str, dict[str, Any]] = {}
    for raw_key, body in data.items():
        path = _join(where, raw_key if isinstance(raw_key, str) else repr(raw_key))
        key = normalize_key(list_name, raw_key, where=path)
        if key in out:
            raise PolicyValidationError(path, f"duplicates the key {key!r} once normalised")
        out[key] = validate_entry(
            list_name, key, body, actor=actor, now_iso=now_iso, keep_meta=keep_meta, where=path, now=now
        )
    return out


_MODEL_FIELDS = frozenset({"stage", "timeline", "allowed_countries", "export_suspended"})
# A timeline entry sets any of a model's state fields from its ``at`` on.
_STEP_STATE_FIELDS = ("stage", "export_suspended", "allowed_countries")
_TIMELINE_FIELDS = frozenset({"at", *_STEP_STATE_FIELDS})
_SHADOW_SET_BY = 'is kept by the gateway: write a shadow with "enforce": false (PATCH {"shadow": null} discards one)'


def model_write(name: str, stored: Mapping[str, Any] | None, body: object, *, patch: bool) -> dict[str, Any]:
    """The registry entry after an operator's ``PUT`` (``patch`` false) or ``PATCH`` (RFC 7396) of
    ``body`` on ``stored`` (None: not in the registry; a PATCH of such a model is the caller's 404).

    ``"enforce": false`` writes the model's shadow only (PATCH merges into the shadow, or into the live
    model when it has none) and leaves the live fields as they are; a model not in the registry has no
    live state to keep, so its shadow write is refused naming ``enforce``. ``PATCH`` with
    ``"enforce": true`` promotes the shadow (with the patch's other fields merged) to live and drops
    it; a PATCH without ``enforce`` changes the live fields and keeps the shadow; ``"shadow": null``
    in a PATCH discards the shadow. A plain PUT replaces the model and drops any shadow.
    """
    data = _mapping(body, "body")
    enforce = _bool(data["enforce"], "enforce") if "enforce" in data else None
    fields = {key: value for key, value in data.items() if key != "enforce"}
    discard = patch and "shadow" in fields and fields["shadow"] is None
    if "shadow" in fields and (not discard or enforce is not None):
        raise PolicyValidationError("shadow", _SHADOW_SET_BY)
    fields.pop("shadow", None)
    live = {key: value for key, value in (stored or {}).items() if key != "shadow"}
    held = stored.get("shadow") if stored is not None else None
    if enforce is False:
        if stored is None:
            raise PolicyValidationError(
                "enforce",
                f"model {_shown(name)} is not in the registry: a shadow is kept beside a live model; "
                'add the model first (without "enforce"), then write its shadow',
            )
        shadow = validate_model(name, merge_patch(held or live, fields) if patch else fields)
        return {**live, "shadow": shadow}
    if not patch:
        return validate_model(name, fields)
    if enforce is True and held is not None:
        return validate_model(name, merge_patch(held, fields))  # promoted: the shadow is live now
    out = validate_model(name, merge_patch(live, fields))
    if held is not None and not discard:
        out["shadow"] = held
    return out


def validate_model(name: object, body: object, *, where: str = "", stored: bool = False) -> dict[str, Any]:
    """Check a registry entry; the timeline comes back sorted by time, countries sorted and upper case.

    ``stored``: the model as the registry keeps it (a policy import), which may carry its ``shadow``
    (the model as a shadow write would make it, checked like a model). An operator's write sets a
    shadow through ``enforce`` instead (:func:`model_write`).
    """
    validate_model_name(name, where=where or "model")
    data = _mapping(body, where)
    _no_unknown(data, _MODEL_FIELDS | {"shadow"} if stored else _MODEL_FIELDS, where)
    out = _model_fields(data, where)
    if stored and data.get("shadow") is not None:
        out["shadow"] = validate_model(name, data["shadow"], where=_join(where, "shadow"))
    return out


def _model_fields(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "stage" not in data:
        raise PolicyValidationError(_join(where, "stage"), f"is required; one of {', '.join(STAGES)}")
    stage = stage_name(data["stage"], _join(where, "stage"))
    timeline = _validate_timeline(data.get("timeline"), _join(where, "timeline"))
    allowed = data.get("allowed_countries")
    countries: list[str] | None = None
    if allowed is not None:
        path = _join(where, "allowed_countries")
        if not isinstance(allowed, list):
            raise PolicyValidationError(path, f"must be a list of country codes or null, got {_type_name(allowed)}")
        countries = sorted({place_code(code, f"{path}[{i}]") for i, code in enumerate(allowed)})
    suspended = data.get("export_suspended", False)
    return {
        "stage": stage,
        "timeline": timeline,
        "allowed_countries": countries,
        "export_suspended": _bool(suspended, _join(where, "export_suspended")),
    }


def _validate_timeline(value: object, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyValidationError(
            where, f"must be a list of {{at, stage?, export_suspended?, allowed_countries?}}, got {_type_name(value)}"
        )
    steps: list[tuple[float, dict[str, Any]]] = []
    seen: dict[float, int] = {}
    for i, item in enumerate(value):
        path = f"{where}[{i}]"
        step = _mapping(item, path)
        _no_unknown(step, _TIMELINE_FIELDS, path)
        if "at" not in step:
            raise PolicyValidationError(f"{path}.at", "is required")
        if not any(name in step for name in _STEP_STATE_FIELDS):
            raise PolicyValidationError(path, f"sets nothing; name at least one of {', '.join(_STEP_STATE_FIELDS)}")
        at_iso, at_ts = parse_instant(step["at"], f"{path}.at")
        # Two entries at one instant leave the state at that instant undefined.
        if at_ts in seen:
            raise PolicyValidationError(f"{path}.at", f"repeats the time of {where}[{seen[at_ts]}]")
        seen[at_ts] = i
        out: dict[str, Any] = {"at": at_iso}
        if "stage" in step:
            out["stage"] = stage_name(step["stage"], f"{path}.stage")
        if "export_suspended" in step:
            out["export_suspended"] = _bool(step["export_suspended"], f"{path}.export_suspended")
        if "allowed_countries" in step:
            allowed = step["allowed_countries"]
            out["allowed_countries"] = (
                None if allowed is None else _places(allowed, f"{path}.allowed_countries", required=False)
            )
        steps.append((at_ts, out))
    steps.sort(key=lambda item: item[0])
    return [out for _ts, out in steps]


_KEY_REQUEST_FIELDS = frozenset({"subject", "org", "org_name", "country", "tier", "expires_at"})
_KEY_RECORD_FIELDS = _KEY_REQUEST_FIELDS | {"hash", "created_at", "created_by"}


def _key_attributes(
    data: Mapping[str, Any], tiers: Collection[str], where: str, now: float | None = None
) -> dict[str, Any]:
    for name in ("subject", "org", "country", "tier"):
        if data.get(name) is None:
            raise PolicyValidationError(_join(where, name), "is required")
    tier = data["tier"]
    if not isinstance(tier, str) or tier not in tiers:
        shown = _shown(tier) if isinstance(tier, str) else _type_name(tier)
        raise PolicyValidationError(
            _join(where, "tier"), f"{shown} is not a tier; expected one of {', '.join(sorted(tiers))}"
        )
    org_name = data.get("org_name")
    return {
        "subject": _identifier(data["subject"], _join(where, "subject")),
        "org": _identifier(data["org"], _join(where, "org")),
        "org_name": None if org_name is None else _text(org_name, _join(where, "org_name"), required=True),
        "country": region_code(data["country"], _join(where, "country")),
        "tier": tier,
        "expires_at": _future_expiry(data.get("expires_at"), _join(where, "expires_at"), now),
    }


def validate_api_key_request(body: object, tiers: Collection[str], *, now: float | None = None) -> dict[str, Any]:
    """``POST /admin/v1/api-keys``: subject, org, org_name?, country, tier, expires_at? (future, given ``now``)."""
    data = _mapping(body, "")
    _no_unknown(data, _KEY_REQUEST_FIELDS, "")
    return _key_attributes(data, tiers, "", now)


def validate_api_key_record(
    key_id: object,
    body: object,
    *,
    tiers: Collection[str],
    actor: str,
    now_iso: str,
    where: str = "",
) -> dict[str, Any]:
    """A stored API key as a policy import carries it: the attributes plus hash and creation record."""
    _identifier(key_id, where or "id", spaces=False)
    data = _mapping(body, where)
    _no_unknown(data, _KEY_RECORD_FIELDS, where)
    if data.get("hash") is None:
        raise PolicyValidationError(_join(where, "hash"), "is required")
    record: dict[str, Any] = {"hash": _identifier(data["hash"], _join(where, "hash"), spaces=False)}
    record.update(_key_attributes(data, tiers, where))
    created_at, created_by = data.get("created_at"), data.get("created_by")
    record["created_at"] = now_iso if created_at is None else parse_instant(created_at, _join(where, "created_at"))[0]
    record["created_by"] = actor if created_by is None else _identifier(created_by, _join(where, "created_by"))
    return record


_DOCUMENT_SECTIONS = frozenset({"version", "lists", "models", "api_keys", "screening", "revoked_api_keys"})
# What a policy document must carry to restore a Redis that holds none (contract §6).
# Lists added later (country groups, licences) may be left out: they are written empty.
WHOLE_POLICY_PARTS = (
    *(f"lists.{name}" for name in LIST_NAMES if name not in LATER_LISTS),
    "models",
    "api_keys",
    "screening",
)
_REVOCATION_FIELDS = frozenset({"hash", "subject", "org", "revoked_at", "revoked_by"})


def validate_revocation(key_id: object, body: object, *, where: str) -> dict[str, Any]:
    """A kept revocation as an export carries it: the key's hash, who revoked it and when."""
    _identifier(key_id, where, spaces=False)
    data = _mapping(body, where)
    _no_unknown(data, _REVOCATION_FIELDS, where)
    for name in ("hash", "revoked_at", "revoked_by"):
        if data.get(name) is None:
            raise PolicyValidationError(_join(where, name), "is required")
    return {
        "hash": _identifier(data["hash"], _join(where, "hash"), spaces=False),
        "subject": None if data.get("subject") is None else _identifier(data["subject"], _join(where, "subject")),
        "org": None if data.get("org") is None else _identifier(data["org"], _join(where, "org")),
        "revoked_at": parse_instant(data["revoked_at"], _join(where, "revoked_at"))[0],
        "revoked_by": _identifier(data["revoked_by"], _join(where, "revoked_by")),
    }


def missing_parts(document: Mapping[str, Any]) -> list[str]:
    """The parts of :data:`WHOLE_POLICY_PARTS` a (validated) document leaves out."""
    lists = document.get("lists") or {}
    present = {f"lists.{name}" for name in lists} | {
        name for name in ("models", "api_keys", "screening") if name in document
    }
    return [part for part in WHOLE_POLICY_PARTS if part not in present]


def validate_policy_document(
    doc: object,
    *,
    actor: str,
    now_iso: str,
    tiers: Collection[str],
) -> dict[str, Any]:
    """``PUT /admin/v1/policy``: each section present comes back normalised; ``version`` is dropped.

    ``added_by``/``added_at`` (and ``created_*`` of keys) are kept as given so
    GET then PUT round-trips. The ``screening`` section is only checked to be
    an object; its entries are the screening module's to validate.
    """
    data = _mapping(doc, "", "an object with lists, models, api_keys or screening")
    _no_unknown(data, _DOCUMENT_SECTIONS, "")
    out: dict[str, Any] = {}
    if "lists" in data:
        lists = _mapping(data["lists"], "lists", "an object of list name: entries")
        out["lists"] = {}
        for list_name, entries in lists.items():
            if list_name not in LIST_NAMES:
                raise PolicyValidationError(
                    f"lists.{list_name}", f"unknown list; expected one of {', '.join(LIST_NAMES)}"
                )
            out["lists"][list_name] = validate_list(
                list_name, entries, actor=actor, now_iso=now_iso, keep_meta=True, where=f"lists.{list_name}"
            )
    if "models" in data:
        models = _mapping(data["models"], "models", "an object of model name: model")
        out["models"] = {
            name: validate_model(name, body, where=f"models.{name}", stored=True) for name, body in models.items()
        }
    if "api_keys" in data:
        keys = _mapping(data["api_keys"], "api_keys", "an object of key id: key")
        out["api_keys"] = {}
        hashes: dict[str, str] = {}
        for key_id, body in keys.items():
            path = f"api_keys.{key_id}"
            record = validate_api_key_record(key_id, body, tiers=tiers, actor=actor, now_iso=now_iso, where=path)
            if record["hash"] in hashes:
                other = hashes[record["hash"]]
                raise PolicyValidationError(f"{path}.hash", f"is also the hash of key {other!r}")
            hashes[record["hash"]] = key_id
            out["api_keys"][key_id] = record
    if "screening" in data:
        screening = _mapping(data["screening"], "screening", 'an object such as {"entries": [...]}')
        out["screening"] = dict(screening)
    if "revoked_api_keys" in data:
        revoked = _mapping(data["revoked_api_keys"], "revoked_api_keys", "an object of key id: revocation")
        out["revoked_api_keys"] = {
            key_id: validate_revocation(key_id, body, where=f"revoked_api_keys.{key_id}")
            for key_id, body in revoked.items()
        }
        for key_id in out.get("api_keys", {}):
            if key_id in out["revoked_api_keys"]:
                raise PolicyValidationError(f"api_keys.{key_id}", "is also listed in revoked_api_keys")
    return out


def drop_expired(document: Mapping[str, Any], now: float) -> tuple[dict[str, Any], list[str]]:
    """A validated document without the list entries whose ``expires_at`` has passed.

    An import replaces each list whole, so an entry that has expired means the same as one left
    out; dropping it (with a warning naming it) keeps an export that holds one importable, while
    a single-entry write with a past ``expires_at`` is refused outright.
    """
    out = dict(document)
    warnings: list[str] = []
    lists: dict[str, Any] = {}
    for name, entries in (document.get("lists") or {}).items():
        kept = {}
        for key, entry in entries.items():
            if _expired(entry, now):
                warnings.append(f"lists.{name}.{key}: expired at {entry['expires_at']}; not imported")
            else:
                kept[key] = entry
        lists[name] = kept
    if "lists" in document:
        out["lists"] = lists
    return out, warnings


def _expired(record: Mapping[str, Any], now: float) -> bool:
    expires = record.get("expires_at")
    return expires is not None and parse_instant(expires, "expires_at")[1] <= now


def merge_patch(target: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch: members named in ``patch`` replace those of ``target``, ``null``
    removes one, objects merge recursively, anything else (arrays too) replaces whole."""
    out = dict(target or {})
    for name, value in patch.items():
        if value is None:
            out.pop(name, None)
        elif isinstance(value, Mapping):
            current = out.get(name)
            out[name] = merge_patch(current if isinstance(current, Mapping) else None, value)
        else:
            out[name] = value
    return out


def patch_body(body: object) -> Mapping[str, Any]:
    """A merge patch must be an object that names at least one field."""
    data = _mapping(body, "body", "a JSON object naming the fields to change (a merge patch)")
    if not data:
        raise PolicyValidationError("body", "names no field to change")
    return data


# --------------------------------------------------------------------------- what an import would change

# Who wrote an entry and when is history, not content: an import restamps entries that carry none.
_HISTORY_FIELDS = frozenset({"added_by", "added_at", "created_by", "created_at"})


def _content(record: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in record.items() if name not in _HISTORY_FIELDS}


def _keyed_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(key for key in set(before) & set(after) if _content(before[key]) != _content(after[key])),
    }


def policy_diff(current: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    """Per section of ``incoming`` (validated, the sections an import would write): the keys it would
    add, remove and change against ``current`` (a policy document; empty sections when none is held).
    ``screening`` compares the entry lists: their counts, and whether they differ at all."""
    out: dict[str, Any] = {}
    current_lists = current.get("lists") or {}
    for name, entries in (incoming.get("lists") or {}).items():
        out[f"lists.{name}"] = _keyed_diff(current_lists.get(name) or {}, entries)
    for section in ("models", "api_keys"):
        if section in incoming:
            out[section] = _keyed_diff(current.get(section) or {}, incoming[section])
    if "screening" in incoming:
        before = (current.get("screening") or {}).get("entries") or []
        after = (incoming.get("screening") or {}).get("entries") or []
        out["screening"] = {"before": len(before), "after": len(after), "changed": before != after}
    if incoming.get("revoked_api_keys"):
        held = current.get("revoked_api_keys") or {}
        out["revoked_api_keys"] = {
            "added": sorted(set(incoming["revoked_api_keys"]) - set(held)),
            "removed": [],
            "changed": [],
        }
    return out


# --------------------------------------------------------------------------- risky-but-valid writes


def entry_warnings(
    list_name: str, key: str, *, home_countries: Collection[str], partners: Collection[str]
) -> list[str]:
    """Why a valid list entry may still be a mistake: a home country denied, an ip-ranges entry wider
    than /8 (IPv4) or /32 (IPv6), a denied entity that is a current partner. Empty when none."""
    if list_name == DENY_COUNTRIES:
        country = key.split("-", 1)[0]
        if key in home_countries or country in home_countries:
            return [
                f"deny-countries {key}: denies a home country (network.home_countries: "
                f"{', '.join(sorted(home_countries))}); callers there are refused every model"
            ]
    elif list_name == IP_RANGES:
        network = ipaddress.ip_network(key, strict=False)
        widest = 8 if network.version == 4 else 32
        if network.prefixlen < widest:
            return [
                f"ip-ranges {key}: wider than /{widest}; it places {network.num_addresses:,} "
                "addresses in one country over the GeoIP database"
            ]
    elif list_name == DENY_ENTITIES and key in partners:
        return [f"deny-entities {key}: is also a current partner; the deny entry wins"]
    return []


def model_warnings(name: str, model: Mapping[str, Any]) -> list[str]:
    """Why a valid model may still be a mistake: an empty ``allowed_countries`` serves nobody (in the
    live model, or in its shadow once promoted)."""
    warnings = []
    for label, state in ((name, model), (f"{name} (shadow)", model.get("shadow"))):
        if isinstance(state, Mapping) and state.get("allowed_countries") == []:
            warnings.append(
                f"models {label}: allowed_countries is empty; no caller in any country may use it "
                "(null means any country)"
            )
    return warnings


def document_warnings(
    document: Mapping[str, Any], *, home_countries: Collection[str], partners: Collection[str]
) -> list[str]:
    """:func:`entry_warnings` and :func:`model_warnings` over a validated policy document; the
    partners are the document's own when it carries them, else ``partners``."""
    lists = document.get("lists") or {}
    current_partners = set(lists[PARTNERS]) if PARTNERS in lists else set(partners)
    warnings: list[str] = []
    for name in LIST_NAMES:
        for key in lists.get(name, {}):
            warnings += entry_warnings(name, key, home_countries=home_countries, partners=current_partners)
    for name, model in (document.get("models") or {}).items():
        warnings += model_warnings(name, model)
    return warnings


# --------------------------------------------------------------------------- references between parts


def group_references(
    *,
    deny_keys: Collection[str] = (),
    models: Mapping[str, Mapping[str, Any]] | None = None,
    licences: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, list[str]]:
    """Which country groups stored parts name, each with where (``deny-countries``, ``models.x``,
    ``licences.L-1``): a group must exist while anything names it."""
    found: dict[str, list[str]] = {}

    def note(codes: object, where: str) -> None:
        for code in codes if isinstance(codes, list | tuple | frozenset | set) else ():
            if isinstance(code, str) and code[:1] == GROUP_PREFIX:
                found.setdefault(code[1:], []).append(where)

    note(list(deny_keys), DENY_COUNTRIES)
    for name, model in (models or {}).items():
        for state in (model, model.get("shadow") or {}):
            note(state.get("allowed_countries"), f"models.{name}")
            for step in state.get("timeline") or ():
                note(step.get("allowed_countries"), f"models.{name}")
    for key, licence in (licences or {}).items():
        note(licence.get("countries"), f"{LICENCES}.{key}")
    return found


def check_references(
    groups: Collection[str],
    models: Collection[str],
    *,
    deny_keys: Collection[str] = (),
    model_bodies: Mapping[str, Mapping[str, Any]] | None = None,
    licences: Mapping[str, Mapping[str, Any]] | None = None,
    where: str = "",
) -> None:
    """Refuse a reference to a country group the policy does not define, or a licence for a model the
    registry does not hold (``groups`` and ``models``: the names the policy holds after the write)."""
    referenced = group_references(deny_keys=deny_keys, models=model_bodies, licences=licences)
    for name, places in sorted(referenced.items()):
        if name not in groups:
            raise PolicyValidationError(
                where or places[0],
                f"names country group @{name}, which the policy does not define; add it to {COUNTRY_GROUPS} first",
            )
    for key, licence in (licences or {}).items():
        for i, model in enumerate(licence.get("models") or ()):
            if model not in models:
                raise PolicyValidationError(
                    where or f"{LICENCES}.{key}.models[{i}]", f"{_shown(model)} is not a registered model"
                )


def document_references(document: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """:func:`check_references` over a validated policy document, the parts it leaves out taken from
    ``current`` (a policy document of what Redis holds; empty when none)."""
    lists = document.get("lists") or {}
    held = current.get("lists") or {}

    def part(name: str) -> Mapping[str, Any]:
        return lists[name] if name in lists else held.get(name) or {}

    models = document["models"] if "models" in document else current.get("models") or {}
    check_references(
        part(COUNTRY_GROUPS),
        models,
        deny_keys=list(part(DENY_COUNTRIES)),
        model_bodies=models,
        licences=part(LICENCES),
    )
