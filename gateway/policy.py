"""The export-control policy: snapshot types, the §7 wire format, operator-input validation and decide().

Everything here is pure: no aiohttp, no Redis, no clock. Time arrives as
``now`` (epoch seconds), so an entry that expires stops applying at its
``expires_at`` without any reload, and a model's timeline moves on its own.

* Wire format <-> types: ``*_from_dict`` / ``*_to_dict``, :func:`build_snapshot`
  and :func:`policy_document` (the store loads and the admin API shows).
* Validation: ``validate_*`` turn operator input into the normalised stored
  dicts, or raise :class:`PolicyValidationError` naming the field.
* :func:`decide`: docs/contract.md §4 rows 2-8, 3a and 10 on a :class:`Snapshot`.
"""

from __future__ import annotations

import ipaddress
import math
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson

from gateway.countries import validate_region
from gateway.settings import STAGES

if TYPE_CHECKING:
    from gateway.caller import Caller
    from gateway.settings import Settings

DENY_COUNTRIES = "deny-countries"
DENY_ENTITIES = "deny-entities"
_LAZY_LISTS = frozenset({DENY_COUNTRIES, DENY_ENTITIES})
PARTNERS = "partners"
IP_RANGES = "ip-ranges"
LIST_NAMES = (DENY_COUNTRIES, DENY_ENTITIES, PARTNERS, IP_RANGES)

# Decision codes (docs/contract.md §4).
ENTITY_DENIED = "entity_denied"
COUNTRY_DENIED = "country_denied"
MODEL_UNKNOWN = "model_unknown"
EXPORT_SUSPENDED = "export_suspended"
EXPORT_RESTRICTED = "export_restricted"
NOT_RELEASED = "not_released"
PARTNER_REQUIRED = "partner_required"
POLICY_STALE = "policy_stale"
MODEL_REQUIRED = "model_required"
AMBIGUOUS_REQUEST = "ambiguous_request"

MAX_REASON_CHARS = 1000
MAX_KEY_CHARS = 256
MAX_MODEL_NAME_CHARS = 200
_MAX_INSTANT_CHARS = 64
_ECHO_LIMIT = 60
# The most of any one caller-controlled value an answer or an audit field repeats (docs/contract.md §4a).
ECHO_LIMIT = 256

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def clip(value: str, limit: int = ECHO_LIMIT) -> str:
    """``value`` cut to at most ``limit`` UTF-8 bytes (whole characters), for echoing caller input.

    A caller may send names of any length; answers and audit records repeat a bounded prefix only,
    so a long name neither grows the audit stream nor comes back amplified.
    """
    if len(value) <= limit // 4:  # the common case: short enough whatever its characters
        return value
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return value
    return encoded[:limit].decode("utf-8", "ignore")


class PolicyValidationError(ValueError):
    """Operator input that cannot become policy; ``field`` is the path to the bad value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- screening protocol


class ScreeningHitLike(Protocol):
    """A name-screening match: blocked at or above the block threshold, else in the review band."""

    @property
    def blocked(self) -> bool: ...

    @property
    def score(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


class ScreeningLike(Protocol):
    """Anything that screens an organisation name against the imported denied-parties list."""

    def match(self, name: str) -> ScreeningHitLike | None: ...


# --------------------------------------------------------------------------- snapshot types


class LazyEntries(Mapping[str, "Entry"]):
    """A deny list kept as stored JSON until a decision first consults an entry.

    Deny lists can hold hundreds of thousands of entries, of which a decision looks
    up one or two; parsing them all on every reload would cost most of a reload.
    A stored entry that cannot be read still denies (fail closed).
    """

    __slots__ = ("_encoded", "_list", "_parsed", "_raw")

    def __init__(self, list_name: str, raw: Mapping[str, bytes | Mapping[str, Any]] | Mapping[bytes, bytes]) -> None:
        self._list = list_name
        self._raw: Mapping[Any, Any] = raw
        # Keys may stay as Redis returned them (bytes): decoding 100,000 keys is a fifth of a reload,
        # while encoding the one or two a decision looks up costs nothing.
        self._encoded = isinstance(next(iter(raw), ""), bytes)
        self._parsed: dict[str, Entry] = {}

    def _raw_key(self, key: str) -> Any:
        return key.encode("utf-8", "surrogatepass") if self._encoded else key

    def __getitem__(self, key: str) -> Entry:
        entry = self._parsed.get(key)
        if entry is None:
            entry = self._parsed[key] = self._parse(key, self._raw[self._raw_key(key)])
        return entry

    def get(self, key: str, default: Any = None) -> Any:
        entry = self._parsed.get(key)
        if entry is not None:
            return entry
        return self[key] if self._raw_key(key) in self._raw else default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._raw_key(key) in self._raw

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self) -> Iterator[str]:
        if self._encoded:
            return (key.decode("utf-8", "surrogatepass") for key in self._raw)
        return iter(self._raw)

    def patched(self, changes: Mapping[Any, Any]) -> LazyEntries:
        """A copy with ``changes`` applied (entry key -> stored value, None to delete); entries
        already parsed and not changed stay parsed."""
        raw = dict(self._raw)
        parsed = dict(self._parsed)
        for key, value in changes.items():
            text = key.decode("utf-8", "surrogatepass") if isinstance(key, bytes) else key
            raw_key = self._raw_key(text) if raw else key
            parsed.pop(text, None)
            if value is None:
                raw.pop(raw_key, None)
            else:
                raw[raw_key] = value
        patched = LazyEntries(self._list, raw)
        patched._parsed = parsed
        return patched

    def _parse(self, key: str, value: bytes | Mapping[str, Any]) -> Entry:
        try:
            data = orjson.loads(value) if isinstance(value, bytes | bytearray) else value
            if not isinstance(data, Mapping):
                raise PolicyValidationError(f"lists.{self._list}.{key}", "is not an object")
            return entry_from_dict(self._list, key, data)
        except (orjson.JSONDecodeError, PolicyValidationError):
            return Entry(key, "unreadable stored entry (applied: fail closed)", "", "", "", None, None, None)


class Entry(NamedTuple):
    """One entry of a live list; ``country`` is set for ip-ranges only.

    A named tuple rather than a frozen dataclass: a snapshot holds hundreds of
    thousands of them, and tuples are built several times faster and smaller.
    """

    key: str
    reason: str
    source: str
    added_by: str
    added_at: str
    expires_at: str | None = None
    expires_ts: float | None = None
    country: str | None = None

    def active(self, now: float) -> bool:
        """True until ``expires_at``; from that instant on the entry no longer applies."""
        expires = self.expires_ts
        return expires is None or now < expires


@dataclass(frozen=True, slots=True)
class Model:
    """A registry entry; ``timeline`` holds ``(at_ts, at_iso, stage)`` sorted by time."""

    name: str
    stage: str
    timeline: tuple[tuple[float, str, str], ...] = ()
    allowed_countries: frozenset[str] | None = None
    export_suspended: bool = False

    def current_stage(self, now: float) -> str:
        """The stage of the last timeline entry whose ``at`` has passed, else ``stage``."""
        stage = self.stage
        for at_ts, _at_iso, next_stage in self.timeline:
            if at_ts > now:
                break
            stage = next_stage
        return stage


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An issued API key as stored: its hash and what it vouches for, never the key itself."""

    id: str
    key_hash: str
    subject: str
    org: str
    org_name: str | None
    country: str
    tier: str
    expires_at: str | None
    expires_ts: float | None
    created_at: str
    created_by: str

    def active(self, now: float) -> bool:
        expires = self.expires_ts
        return expires is None or now < expires


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request; ``code`` is "" when allowed."""

    allowed: bool
    status: int
    code: str
    message: str
    policy_version: int
    screening: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The shape ``POST /admin/v1/decide`` answers with."""
        return {
            "decision": "allow" if self.allowed else "block",
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "policy_version": self.policy_version,
            "screening": self.screening,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One immutable, confirmed version of the whole policy, queried by :func:`decide`.

    ``lists`` always holds all of :data:`LIST_NAMES`; ``api_keys`` is keyed by
    the key's hash; ``ip_ranges`` maps each ip-ranges CIDR that was active at
    ``loaded_at`` to its country code, until ``ip_ranges_expire_at`` (the first
    ``expires_at`` among them), when the watcher derives the map again.
    """

    version: int
    generation: str
    loaded_at: float
    lists: Mapping[str, Mapping[str, Entry]]
    models: Mapping[str, Model]
    api_keys: Mapping[str, ApiKey]
    screening: ScreeningLike | None = None
    ip_ranges: Mapping[str, str] = field(default_factory=dict)
    ip_ranges_expire_at: float = math.inf
    # The allowed decision for this version, built once so the allowed path
    # allocates nothing per request.
    allow: Decision = field(init=False, repr=False, compare=False)
    # Registered names by their folded spelling: a name the registry lacks but that folds to one
    # it has is another spelling of a controlled model, which a lenient upstream may serve.
    folded_models: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(name not in self.lists for name in LIST_NAMES):
            lists = {name: self.lists.get(name, _EMPTY) for name in LIST_NAMES}
            object.__setattr__(self, "lists", MappingProxyType(lists))
        message = f"Access is permitted under policy version {self.version}."
        object.__setattr__(self, "allow", Decision(True, 200, "", message, self.version))
        object.__setattr__(self, "folded_models", {fold_model_name(name): name for name in self.models})


def fold_model_name(name: str) -> str:
    """``name`` as a lenient model server may read it: compatibility-normalised (NFKC), case-folded,
    without surrounding white space."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


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
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
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


def _region(value: object, where: str) -> str:
    try:
        return validate_region(value)
    except ValueError as exc:
        raise PolicyValidationError(where, str(exc)) from None


def _bool(value: object, where: str) -> bool:
    # A string "false" must never read as true: only JSON booleans are accepted.
    if not isinstance(value, bool):
        raise PolicyValidationError(where, f"must be true or false, got {_type_name(value)}")
    return value


def _stage(value: object, where: str) -> str:
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


_INSTANT_FORM = ("an ISO-8601 date-time with a time zone, e.g. 2027-01-31T00:00:00Z "
                 "or 2027-01-31T09:00:00+01:00")


def parse_instant(value: object, where: str) -> tuple[str, float]:
    """An ISO-8601 date-time with a time zone -> (normalised UTC text, epoch seconds)."""
    if not isinstance(value, str) or not value or len(value) > _MAX_INSTANT_CHARS:
        raise PolicyValidationError(where, f"must be {_INSTANT_FORM}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PolicyValidationError(where, f"{_shown(value)} is not {_INSTANT_FORM}") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise PolicyValidationError(where, f"{_shown(value)} has no time zone; the accepted form is "
                                    f"{_INSTANT_FORM} (add Z for UTC)")
    try:
        return _format_utc(moment), moment.timestamp()
    except (OverflowError, ValueError):
        raise PolicyValidationError(where, f"{_shown(value)} is out of range") from None


def _optional_instant(value: object, where: str) -> tuple[str | None, float | None]:
    if value is None:
        return None, None
    return parse_instant(value, where)


def _future_expiry(value: object, where: str, now: float | None) -> str | None:
    """An optional ``expires_at``; with ``now`` given it must lie after it.

    An entry that has already expired applies to nobody, so writing one would only remove what
    it replaces (an active deny entry, say) while looking like a change to it: refused.
    """
    text, moment = _optional_instant(value, where)
    if now is not None and moment is not None and moment <= now:
        raise PolicyValidationError(where, f"{text} is not in the future (now is {format_instant(now)}); "
                                    "give a later instant, or leave expires_at out for no expiry")
    return text


# --------------------------------------------------------------------------- keys and names


def _check_list(list_name: object) -> str:
    if list_name not in LIST_NAMES:
        shown = _shown(list_name) if isinstance(list_name, str) else _type_name(list_name)
        raise PolicyValidationError("list", f"{shown} is not a list; expected one of {', '.join(LIST_NAMES)}")
    return list_name  # type: ignore[return-value]


def normalize_key(list_name: str, key: object, *, where: str = "key") -> str:
    """The stored form of a list key: upper-case region, canonical CIDR, or the checked identifier."""
    _check_list(list_name)
    if list_name == DENY_COUNTRIES:
        return _region(key, where)
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

_ENTRY_FIELDS = frozenset({"reason", "source", "expires_at", "added_by", "added_at"})
_IP_ENTRY_FIELDS = _ENTRY_FIELDS | {"country"}


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
    _check_list(list_name)
    normalize_key(list_name, key, where=where or "key")
    data = _mapping(body, where)
    ip_list = list_name == IP_RANGES
    allowed = _IP_ENTRY_FIELDS if ip_list else _ENTRY_FIELDS
    if not ip_list and "country" in data:
        raise PolicyValidationError(
            _join(where, "country"), f"only ip-ranges entries carry a country, not {list_name}"
        )
    _no_unknown(data, allowed, where)
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
        stored["country"] = _region(data["country"], _join(where, "country"))
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
    _check_list(list_name)
    data = _mapping(entries, where, "an object of key: entry")
    out: dict[str, dict[str, Any]] = {}
    for raw_key, body in data.items():
        path = _join(where, raw_key if isinstance(raw_key, str) else repr(raw_key))
        key = normalize_key(list_name, raw_key, where=path)
        if key in out:
            raise PolicyValidationError(path, f"duplicates the key {key!r} once normalised")
        out[key] = validate_entry(list_name, key, body, actor=actor, now_iso=now_iso,
                                  keep_meta=keep_meta, where=path, now=now)
    return out


_MODEL_FIELDS = frozenset({"stage", "timeline", "allowed_countries", "export_suspended"})
_TIMELINE_FIELDS = frozenset({"at", "stage"})


def validate_model(name: object, body: object, *, where: str = "") -> dict[str, Any]:
    """Check a registry entry; the timeline comes back sorted by time, countries sorted and upper case."""
    validate_model_name(name, where=where or "model")
    data = _mapping(body, where)
    _no_unknown(data, _MODEL_FIELDS, where)
    if "stage" not in data:
        raise PolicyValidationError(_join(where, "stage"), f"is required; one of {', '.join(STAGES)}")
    stage = _stage(data["stage"], _join(where, "stage"))
    timeline = _validate_timeline(data.get("timeline"), _join(where, "timeline"))
    allowed = data.get("allowed_countries")
    countries: list[str] | None = None
    if allowed is not None:
        path = _join(where, "allowed_countries")
        if not isinstance(allowed, list):
            raise PolicyValidationError(
                path, f"must be a list of country codes or null, got {_type_name(allowed)}"
            )
        countries = sorted({_region(code, f"{path}[{i}]") for i, code in enumerate(allowed)})
    suspended = data.get("export_suspended", False)
    return {
        "stage": stage,
        "timeline": timeline,
        "allowed_countries": countries,
        "export_suspended": _bool(suspended, _join(where, "export_suspended")),
    }


def _validate_timeline(value: object, where: str) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyValidationError(where, f"must be a list of {{at, stage}}, got {_type_name(value)}")
    steps: list[tuple[float, str, str]] = []
    seen: dict[float, int] = {}
    for i, item in enumerate(value):
        path = f"{where}[{i}]"
        step = _mapping(item, path)
        _no_unknown(step, _TIMELINE_FIELDS, path)
        if "at" not in step:
            raise PolicyValidationError(f"{path}.at", "is required")
        if "stage" not in step:
            raise PolicyValidationError(f"{path}.stage", "is required")
        at_iso, at_ts = parse_instant(step["at"], f"{path}.at")
        # Two stages at one instant leave the current stage undefined.
        if at_ts in seen:
            raise PolicyValidationError(f"{path}.at", f"repeats the time of {where}[{seen[at_ts]}]")
        seen[at_ts] = i
        steps.append((at_ts, at_iso, _stage(step["stage"], f"{path}.stage")))
    steps.sort()
    return [{"at": at_iso, "stage": stage} for _ts, at_iso, stage in steps]


_KEY_REQUEST_FIELDS = frozenset({"subject", "org", "org_name", "country", "tier", "expires_at"})
_KEY_RECORD_FIELDS = _KEY_REQUEST_FIELDS | {"hash", "created_at", "created_by"}


def _key_attributes(data: Mapping[str, Any], tiers: Collection[str], where: str,
                    now: float | None = None) -> dict[str, Any]:
    for name in ("subject", "org", "country", "tier"):
        if data.get(name) is None:
            raise PolicyValidationError(_join(where, name), "is required")
    tier = data["tier"]
    if not isinstance(tier, str) or tier not in tiers:
        shown = _shown(tier) if isinstance(tier, str) else _type_name(tier)
        raise PolicyValidationError(_join(where, "tier"), f"{shown} is not a tier; expected one of "
                                    f"{', '.join(sorted(tiers))}")
    org_name = data.get("org_name")
    return {
        "subject": _identifier(data["subject"], _join(where, "subject")),
        "org": _identifier(data["org"], _join(where, "org")),
        "org_name": None if org_name is None else _text(org_name, _join(where, "org_name"), required=True),
        "country": _region(data["country"], _join(where, "country")),
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
    record["created_at"] = (
        now_iso if created_at is None else parse_instant(created_at, _join(where, "created_at"))[0]
    )
    record["created_by"] = (
        actor if created_by is None else _identifier(created_by, _join(where, "created_by"))
    )
    return record


_DOCUMENT_SECTIONS = frozenset({"version", "lists", "models", "api_keys", "screening", "revoked_api_keys"})
# What a policy document must carry to restore a Redis that holds none (contract §6).
WHOLE_POLICY_PARTS = (*(f"lists.{name}" for name in LIST_NAMES), "models", "api_keys", "screening")
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
    present = {f"lists.{name}" for name in lists} | {name for name in ("models", "api_keys", "screening")
                                                       if name in document}
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
            out["lists"][list_name] = validate_list(list_name, entries, actor=actor, now_iso=now_iso,
                                                    keep_meta=True, where=f"lists.{list_name}")
    if "models" in data:
        models = _mapping(data["models"], "models", "an object of model name: model")
        out["models"] = {
            name: validate_model(name, body, where=f"models.{name}") for name, body in models.items()
        }
    if "api_keys" in data:
        keys = _mapping(data["api_keys"], "api_keys", "an object of key id: key")
        out["api_keys"] = {}
        hashes: dict[str, str] = {}
        for key_id, body in keys.items():
            path = f"api_keys.{key_id}"
            record = validate_api_key_record(
                key_id, body, tiers=tiers, actor=actor, now_iso=now_iso, where=path
            )
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
        out["revoked_api_keys"] = {key_id: validate_revocation(key_id, body, where=f"revoked_api_keys.{key_id}")
                                   for key_id, body in revoked.items()}
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
        "changed": sorted(key for key in set(before) & set(after)
                          if _content(before[key]) != _content(after[key])),
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
        out["revoked_api_keys"] = {"added": sorted(set(incoming["revoked_api_keys"]) - set(held)),
                                   "removed": [], "changed": []}
    return out


# --------------------------------------------------------------------------- risky-but-valid writes


def entry_warnings(list_name: str, key: str, *, home_countries: Collection[str],
                   partners: Collection[str]) -> list[str]:
    """Why a valid list entry may still be a mistake: a home country denied, an ip-ranges entry wider
    than /8 (IPv4) or /32 (IPv6), a denied entity that is a current partner. Empty when none."""
    if list_name == DENY_COUNTRIES:
        country = key.split("-", 1)[0]
        if key in home_countries or country in home_countries:
            return [f"deny-countries {key}: denies a home country (network.home_countries: "
                    f"{', '.join(sorted(home_countries))}); callers there are refused every model"]
    elif list_name == IP_RANGES:
        network = ipaddress.ip_network(key, strict=False)
        widest = 8 if network.version == 4 else 32
        if network.prefixlen < widest:
            return [f"ip-ranges {key}: wider than /{widest}; it places {network.num_addresses:,} "
                    "addresses in one country over the GeoIP database"]
    elif list_name == DENY_ENTITIES and key in partners:
        return [f"deny-entities {key}: is also a current partner; the deny entry wins"]
    return []


def model_warnings(name: str, model: Mapping[str, Any]) -> list[str]:
    """Why a valid model may still be a mistake: an empty ``allowed_countries`` serves nobody."""
    if model.get("allowed_countries") == []:
        return [f"models {name}: allowed_countries is empty; no caller in any country may use it "
                "(null means any country)"]
    return []


def document_warnings(document: Mapping[str, Any], *, home_countries: Collection[str],
                      partners: Collection[str]) -> list[str]:
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


# --------------------------------------------------------------------------- stored dicts <-> types


def entry_from_dict(list_name: str, key: str, d: Mapping[str, Any]) -> Entry:
    """A stored entry -> :class:`Entry`; a value that cannot be read raises PolicyValidationError.

    Runs once per entry on every snapshot reload (hundreds of thousands of times), so the
    common case (no expiry, not an ip-range) does no parsing beyond the dict lookups.
    """
    expires = d.get("expires_at")
    if expires is None:
        expires_at = expires_ts = None
    else:
        expires_at, expires_ts = _optional_instant(expires, f"lists.{list_name}.{key}.expires_at")
    country = None
    if list_name == IP_RANGES:
        country = _region(d.get("country"), f"lists.{list_name}.{key}.country")
    return Entry(key, str(d.get("reason") or ""), str(d.get("source") or ""), str(d.get("added_by") or ""),
                 str(d.get("added_at") or ""), expires_at, expires_ts, country)


def entry_to_dict(e: Entry) -> dict[str, Any]:
    d: dict[str, Any] = {
        "reason": e.reason,
        "source": e.source,
        "added_by": e.added_by,
        "added_at": e.added_at,
        "expires_at": e.expires_at,
    }
    if e.country is not None:
        d["country"] = e.country
    return d


def model_from_dict(name: str, d: Mapping[str, Any]) -> Model:
    where = f"models.{name}"
    stage = _stage(d.get("stage"), f"{where}.stage")
    steps = []
    for i, step in enumerate(d.get("timeline") or ()):
        if not isinstance(step, Mapping):
            raise PolicyValidationError(f"{where}.timeline[{i}]", "must be an object with at and stage")
        at_iso, at_ts = parse_instant(step.get("at"), f"{where}.timeline[{i}].at")
        steps.append((at_ts, at_iso, _stage(step.get("stage"), f"{where}.timeline[{i}].stage")))
    steps.sort()
    allowed = d.get("allowed_countries")
    return Model(
        name=name,
        stage=stage,
        timeline=tuple(steps),
        allowed_countries=None if allowed is None else frozenset(str(code).upper() for code in allowed),
        # Anything but an explicit false suspends: a damaged flag fails closed.
        export_suspended=d.get("export_suspended", False) is not False,
    )


def model_to_dict(m: Model) -> dict[str, Any]:
    return {
        "stage": m.stage,
        "timeline": [{"at": at_iso, "stage": stage} for _ts, at_iso, stage in m.timeline],
        "allowed_countries": None if m.allowed_countries is None else sorted(m.allowed_countries),
        "export_suspended": m.export_suspended,
    }


def api_key_from_dict(key_id: str, d: Mapping[str, Any]) -> ApiKey:
    where = f"api_keys.{key_id}"
    expires_at, expires_ts = _optional_instant(d.get("expires_at"), f"{where}.expires_at")
    for name in ("hash", "subject", "org", "country", "tier"):
        if not isinstance(d.get(name), str) or not d[name]:
            raise PolicyValidationError(f"{where}.{name}", "is required")
    org_name = d.get("org_name")
    return ApiKey(
        id=key_id,
        key_hash=d["hash"],
        subject=d["subject"],
        org=d["org"],
        org_name=None if org_name is None else str(org_name),
        country=str(d["country"]).upper(),
        tier=d["tier"],
        expires_at=expires_at,
        expires_ts=expires_ts,
        created_at=str(d.get("created_at") or ""),
        created_by=str(d.get("created_by") or ""),
    )


def api_key_to_dict(k: ApiKey) -> dict[str, Any]:
    return {
        "hash": k.key_hash,
        "subject": k.subject,
        "org": k.org,
        "org_name": k.org_name,
        "country": k.country,
        "tier": k.tier,
        "expires_at": k.expires_at,
        "created_at": k.created_at,
        "created_by": k.created_by,
    }


def build_snapshot(
    *,
    version: int,
    generation: str,
    loaded_at: float,
    lists: Mapping[str, Mapping[str, Mapping[str, Any]]],
    models: Mapping[str, Mapping[str, Any]],
    api_keys: Mapping[str, Mapping[str, Any]],
    screening: ScreeningLike | None = None,
    reuse: Snapshot | None = None,
    unchanged: Collection[str] = (),
    deltas: Mapping[str, Mapping[Any, Any]] | None = None,
) -> Snapshot:
    """Stored dicts -> an immutable :class:`Snapshot`; a list left out is empty.

    Parts named in ``unchanged`` (list names, ``"models"``, ``"apikeys"``) are taken from ``reuse``
    as they are, already parsed: a change to one list does not rebuild the others. Lists in
    ``deltas`` are ``reuse``'s with those entries changed (entry key -> stored value, None: deleted).
    """
    deltas = deltas or {}
    if (unchanged or deltas) and reuse is None:
        raise ValueError("unchanged parts need a snapshot to reuse")
    for list_name in (*lists, *deltas):
        _check_list(list_name)

    def typed_list(name: str) -> Mapping[str, Entry]:
        # Built here rather than per entry: entry_from_dict trusts list_name from LIST_NAMES.
        if reuse is not None and name in unchanged:
            return reuse.lists[name]
        if reuse is not None and name in deltas:
            base = reuse.lists[name]
            if isinstance(base, LazyEntries):
                return base.patched(deltas[name])
            patched = dict(base)
            for key, d in deltas[name].items():
                if d is None:
                    patched.pop(key, None)
                else:
                    patched[key] = entry_from_dict(name, key, d)
            return MappingProxyType(patched)
        if name in _LAZY_LISTS:
            return LazyEntries(name, lists.get(name, {}))
        return MappingProxyType({key: entry_from_dict(name, key, d) for key, d in lists.get(name, {}).items()})

    typed_lists: dict[str, Mapping[str, Entry]] = {name: typed_list(name) for name in LIST_NAMES}
    if reuse is not None and "apikeys" in unchanged:
        keys: Mapping[str, ApiKey] = reuse.api_keys
    else:
        built = {}
        for key_id, d in api_keys.items():
            key = api_key_from_dict(key_id, d)
            built[key.key_hash] = key
        keys = MappingProxyType(built)
    active_ranges = [entry for entry in typed_lists[IP_RANGES].values()
                     if entry.country is not None and entry.active(loaded_at)]
    ip_ranges = {entry.key: entry.country for entry in active_ranges if entry.country is not None}
    expiries = [entry.expires_ts for entry in active_ranges if entry.expires_ts is not None]
    typed_models = (reuse.models if reuse is not None and "models" in unchanged else
                    MappingProxyType({name: model_from_dict(name, d) for name, d in models.items()}))
    return Snapshot(
        version=version,
        generation=generation,
        loaded_at=loaded_at,
        lists=MappingProxyType(typed_lists),
        models=typed_models,
        api_keys=keys,
        screening=screening,
        ip_ranges=MappingProxyType(ip_ranges),
        ip_ranges_expire_at=min(expiries, default=math.inf),
    )


def policy_document(snapshot: Snapshot) -> dict[str, Any]:
    """The §7 ``GET /admin/v1/policy`` shape, without ``screening`` (the screening module adds it)."""
    return {
        "version": snapshot.version,
        "lists": {
            name: {key: entry_to_dict(e) for key, e in sorted(snapshot.lists[name].items())}
            for name in LIST_NAMES
        },
        "models": {name: model_to_dict(m) for name, m in sorted(snapshot.models.items())},
        "api_keys": {
            k.id: api_key_to_dict(k) for k in sorted(snapshot.api_keys.values(), key=lambda k: k.id)
        },
    }


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Rules:
    """The static part of the decision, from the config file."""

    home_countries: frozenset[str]
    unknown_model: str
    tier_stages: Mapping[str, frozenset[str]]
    require_ip_country: bool = False
    modelless_paths: frozenset[str] = frozenset({"/v1/models"})

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            home_countries=frozenset(settings.network.home_countries),
            unknown_model=settings.policy.unknown_model,
            tier_stages=MappingProxyType({name: frozenset(t.stages) for name, t in settings.tiers.items()}),
            require_ip_country=settings.network.require_ip_country,
            modelless_paths=frozenset(settings.policy.modelless_paths),
        )


# Why a caller's country could not be placed (rows 5 and 6).
_NO_CLAIM = "no country claim"
_NO_IP_COUNTRY = "no country known for the client IP"


def _inside(code: str, allowed: frozenset[str]) -> bool:
    # A subdivision is inside when it or its country is: UA-43 with UA allowed.
    return code in allowed or (code[2:3] == "-" and code[:2] in allowed)


def _outside(caller: Caller, allowed: frozenset[str], require_ip_country: bool) -> tuple[str, str] | None:
    """None when every signal is inside ``allowed``; else (code or "", why unknown)."""
    claim = caller.claimed_country
    if not claim:
        return "", _NO_CLAIM
    if not _inside(claim, allowed):
        return claim, ""
    # The IP's most specific code; the claim and the IP are checked on their
    # own, so when they disagree the stricter answer wins.
    ip_code = caller.ip_subdivision or caller.ip_country
    if not ip_code:
        return ("", _NO_IP_COUNTRY) if require_ip_country else None
    if not _inside(ip_code, allowed):
        return ip_code, ""
    return None


def _place(code: str) -> str:
    return f"region {code}" if "-" in code else f"country {code}"


def _to_model(model: str | None) -> str:
    return f" to model '{clip(model)}'" if model else ""


_STATUS = {
    ENTITY_DENIED: 451,
    COUNTRY_DENIED: 451,
    MODEL_UNKNOWN: 403,
    EXPORT_SUSPENDED: 451,
    EXPORT_RESTRICTED: 451,
    NOT_RELEASED: 403,
    PARTNER_REQUIRED: 403,
    POLICY_STALE: 503,
    MODEL_REQUIRED: 400,
    AMBIGUOUS_REQUEST: 400,
}


def _block(snapshot: Snapshot, code: str, message: str, *, screening: dict[str, Any] | None) -> Decision:
    return Decision(False, _STATUS[code], code, message, snapshot.version, screening)


def _stale(snapshot: Snapshot | None) -> Decision:
    if snapshot is None:
        message = ("The gateway has no confirmed export-control policy, so it admits no requests "
                   "until one is loaded (policy_stale).")
        return Decision(False, 503, POLICY_STALE, message, 0)
    message = (f"The gateway cannot confirm that export-control policy version {snapshot.version} is "
               "current, so it admits no requests until it can (policy_stale).")
    return Decision(False, 503, POLICY_STALE, message, snapshot.version)


def _denied_codes_in_order(caller: Caller) -> list[str]:
    # Name the most telling code in the message: the claim before the IP, a
    # subdivision before the country it lies in.
    ordered: list[str] = []
    for code in (caller.claimed_country, caller.ip_subdivision, caller.ip_country):
        if code:
            ordered.append(code)
    for code in sorted(caller.countries):
        if code not in ordered:
            ordered.append(code)
    return ordered


def _country_denied(
    snapshot: Snapshot, caller: Caller, model: str | None, *, now: float, screening: dict[str, Any] | None
) -> Decision | None:
    deny = snapshot.lists[DENY_COUNTRIES]
    if not deny:
        return None
    for code in caller.countries:
        entry = deny.get(code)
        if entry is not None and entry.active(now):
            break
    else:
        return None
    for code in _denied_codes_in_order(caller):
        entry = deny.get(code)
        if entry is not None and entry.active(now):
            message = (f"Access{_to_model(model)} from {_place(code)} is not permitted: {code} is on the "
                       f"denied countries and regions list (country_denied).")
            return _block(snapshot, COUNTRY_DENIED, message, screening=screening)
    return None  # unreachable: the first loop found a denied code


def _entity_denied(
    snapshot: Snapshot, caller: Caller, model: str | None, *, now: float
) -> tuple[Decision | None, dict[str, Any] | None]:
    deny = snapshot.lists[DENY_ENTITIES]
    if deny:
        entry = deny.get(caller.subject)
        if entry is not None and entry.active(now):
            message = (f"Access{_to_model(model)} is not permitted: the caller '{clip(caller.subject)}' is on "
                       "the denied entities list (entity_denied).")
            return _block(snapshot, ENTITY_DENIED, message, screening=None), None
        org = caller.org
        if org:
            entry = deny.get(org)
            if entry is not None and entry.active(now):
                message = (f"Access{_to_model(model)} is not permitted: the organisation '{clip(org)}' is on "
                           "the denied entities list (entity_denied).")
                return _block(snapshot, ENTITY_DENIED, message, screening=None), None
    screening = snapshot.screening
    if screening is None or not (caller.org_name or caller.org):
        return None, None
    found = screen_caller(screening, caller)
    if found is None:
        return None, None
    if found["blocked"]:
        # The rule only: naming the listed entry or the score would let a denied party tune its name
        # until it scores below the threshold. The audit record keeps both.
        message = (f"Access{_to_model(model)} is not permitted: the caller's organisation matches the "
                   "denied-party screening list (entity_denied).")
        return _block(snapshot, ENTITY_DENIED, message, screening=found), found
    # A review-band hit does not block; it rides along for the audit record.
    return None, found


def screen_caller(screening: ScreeningLike, caller: Caller) -> dict[str, Any] | None:
    """The caller's organisation screened by both its names, ``org_name`` and ``org``.

    Either may be the one a denied party is listed under (an API key or token may carry the
    organisation's name as its ``org`` and no ``org_name``). Returns the hit to audit (with
    ``screened``: which name matched), a blocking hit before a review-band one, or None.
    """
    best: tuple[ScreeningHitLike, str] | None = None
    for field_name, name in (("org_name", caller.org_name), ("org", caller.org)):
        if not name or (field_name == "org" and name == caller.org_name):
            continue
        hit = screening.match(name)
        if hit is None:
            continue
        if best is None or (hit.blocked, hit.score) > (best[0].blocked, best[0].score):
            best = (hit, field_name)
    if best is None:
        return None
    return {**best[0].to_dict(), "screened": best[1]}


_MODELLESS_METHODS = frozenset({"GET", "HEAD"})


def path_model(method: str, path: str | None, rules: Rules) -> str | None:
    """The model a ``GET``/``HEAD`` to ``<modelless path>/<name>`` names (``/v1/models/gpt-4o``), or None.

    Such a request is about that one model, so it is decided as a request for it (rows 4-8). The name
    is one path segment: deeper paths name no model here (``model_path_pattern`` may), so they need one.
    """
    if path is None or method not in _MODELLESS_METHODS:
        return None
    for base in rules.modelless_paths:
        if len(path) > len(base) + 1 and path.startswith(base) and path[len(base)] == "/":
            name = path[len(base) + 1:]
            return name if "/" not in name else None
    return None


def _canonical_name(name: str) -> bool:
    # A name a server could read otherwise (percent-decoded, a dot segment, ;params) is not decided on.
    return not ("%" in name or ";" in name or "\\" in name or name in (".", ".."))


def _request_model(
    snapshot: Snapshot, model: str | None, method: str, path: str, rules: Rules,
    screening: dict[str, Any] | None,
) -> tuple[str | None, Decision | None]:
    """Row 3a: the model a proxied request is decided on, or the refusal; (None, None) for a modelless path."""
    named = path_model(method, path, rules)
    if named is not None:
        if not _canonical_name(named):
            message = ("The request path could name a model in more than one way (encoded characters, a dot "
                       "segment, a backslash or ';' parameters); send the canonical path (ambiguous_request).")
            return None, _block(snapshot, AMBIGUOUS_REQUEST, message, screening=screening)
        if model is not None and model != named:
            message = (f"The request path names model '{clip(named)}' and the request names '{clip(model)}' "
                       "(ambiguous_request).")
            return None, _block(snapshot, AMBIGUOUS_REQUEST, message, screening=screening)
        return named, None
    if model is not None or (method in _MODELLESS_METHODS and path in rules.modelless_paths):
        return model, None
    message = ("The request names no model. Name the model in the JSON body's 'model' field; only GET and HEAD "
               "to " + ", ".join(sorted(rules.modelless_paths)) + " need none (model_required).")
    return None, _block(snapshot, MODEL_REQUIRED, message, screening=screening)


def decide(
    snapshot: Snapshot | None,
    caller: Caller,
    model: str | None,
    now: float,
    rules: Rules,
    *,
    stale: bool = False,
    method: str = "POST",
    path: str | None = None,
) -> Decision:
    """docs/contract.md §4 rows 10, 2, 3, 3a, 4-8 in order; the first that applies wins. Row 1
    (credentials) and row 9 (rate limits) belong to the identity and rate-limit steps around this one.

    ``method`` and ``path`` (the raw path, without the query) describe the request to be proxied; a
    request that names no model is refused (row 3a) unless it is a ``GET`` or ``HEAD`` to one of
    ``rules.modelless_paths``. ``path=None`` asks about the caller and ``model`` alone (an operator's
    what-if): without a model, rows 2, 3 and 10 decide.
    """
    if snapshot is None or stale:
        return _stale(snapshot)
    denied, screening = _entity_denied(snapshot, caller, model, now=now)
    if denied is not None:
        return denied
    denied = _country_denied(snapshot, caller, model, now=now, screening=screening)
    if denied is not None:
        return denied
    if path is not None and (model is None or method in _MODELLESS_METHODS):
        model, refused = _request_model(snapshot, model, method, path, rules, screening)
        if refused is not None:
            return refused
    if model is None:
        # A modelless path (or a what-if without a model): rows 2, 3 and 10 decided it.
        return snapshot.allow if screening is None else _allow(snapshot, screening)
    entry = snapshot.models.get(model)
    if entry is None:
        registered = snapshot.folded_models.get(fold_model_name(model))
        if registered is not None:
            message = (f"Model '{clip(model)}' is not registered, but model '{registered}' is, and a model "
                       "server may read one as the other; send the registered name (ambiguous_request).")
            return _block(snapshot, AMBIGUOUS_REQUEST, message, screening=screening)
        if rules.unknown_model != "allow":
            message = (f"Model '{clip(model)}' is not in the gateway's model registry, and unregistered models "
                       "are not served (model_unknown).")
            return _block(snapshot, MODEL_UNKNOWN, message, screening=screening)
        # With nothing registered there is no suspension, country set or stage to apply.
        return snapshot.allow if screening is None else _allow(snapshot, screening)
    if entry.export_suspended:
        outside = _outside(caller, rules.home_countries, rules.require_ip_country)
        if outside is not None:
            message = _suspended_message(model, outside, rules.home_countries)
            return _block(snapshot, EXPORT_SUSPENDED, message, screening=screening)
    allowed_countries = entry.allowed_countries
    if allowed_countries is not None:
        outside = _outside(caller, allowed_countries, rules.require_ip_country)
        if outside is not None:
            message = _restricted_message(model, outside)
            return _block(snapshot, EXPORT_RESTRICTED, message, screening=screening)
    stage = entry.current_stage(now)
    stages = rules.tier_stages.get(caller.tier)
    if stages is None or stage not in stages:
        message = (f"Model '{clip(model)}' is not released to the '{clip(caller.tier)}' tier: its current stage is "
                   f"'{stage}' (not_released).")
        return _block(snapshot, NOT_RELEASED, message, screening=screening)
    if stage == "partners" and "internal" not in stages:
        org = caller.org
        partner = snapshot.lists[PARTNERS].get(org) if org else None
        if partner is None or not partner.active(now):
            who = f"the organisation '{clip(org)}' is" if org else "the caller has no organisation, so it is"
            message = (f"Model '{clip(model)}' is released to approved partners only, and {who} not on the "
                       "partners list (partner_required).")
            return _block(snapshot, PARTNER_REQUIRED, message, screening=screening)
    return snapshot.allow if screening is None else _allow(snapshot, screening)


def _allow(snapshot: Snapshot, screening: dict[str, Any]) -> Decision:
    allow = snapshot.allow
    return Decision(True, 200, "", allow.message, snapshot.version, screening)


def _suspended_message(model: str, outside: tuple[str, str], home: frozenset[str]) -> str:
    code, unknown = outside
    model = clip(model)
    homes = ", ".join(sorted(home)) or "no country"
    if code:
        return (f"Access to model '{model}' from {_place(code)} is not permitted: the model's export is "
                f"suspended and {code} is outside the home countries ({homes}) (export_suspended).")
    return (f"Access to model '{model}' is not permitted: the model's export is suspended outside the home "
            f"countries ({homes}) and the caller's country is unknown ({unknown}) (export_suspended).")


def _restricted_message(model: str, outside: tuple[str, str]) -> str:
    code, unknown = outside
    model = clip(model)
    if code:
        return (f"Access to model '{model}' from {_place(code)} is not permitted: {code} is outside the "
                "model's allowed countries (export_restricted).")
    return (f"Access to model '{model}' is not permitted: the model is limited to its allowed countries and "
            f"the caller's country is unknown ({unknown}) (export_restricted).")


__all__ = [
    "LIST_NAMES",
    "ApiKey",
    "Decision",
    "Entry",
    "Model",
    "PolicyValidationError",
    "Rules",
    "ScreeningHitLike",
    "ScreeningLike",
    "Snapshot",
    "api_key_from_dict",
    "api_key_to_dict",
    "build_snapshot",
    "clip",
    "decide",
    "entry_from_dict",
    "entry_to_dict",
    "format_instant",
    "model_from_dict",
    "model_to_dict",
    "normalize_key",
    "parse_instant",
    "path_model",
    "policy_document",
    "screen_caller",
    "validate_api_key_record",
    "validate_api_key_request",
    "validate_entry",
    "validate_list",
    "validate_model",
    "validate_model_name",
    "validate_policy_document",
]
