"""The decision: docs/contract.md §4 rows 2-8, 3a and 10 on a :class:`~gateway.policy.model.Snapshot`.

Pure: no aiohttp, no Redis, no clock. Time arrives as ``now`` (epoch seconds), so an entry that
expires stops applying at its ``expires_at`` without any reload, and a model's timeline moves on
its own. The messages it answers with are built here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gateway.policy.model import (
    Caller,
    Decision,
    Entry,
    Model,
    ScreeningHitLike,
    ScreeningLike,
    Snapshot,
    fold_model_name,
)
from gateway.policy.names import (
    AMBIGUOUS_REQUEST,
    COUNTRY_DENIED,
    DENY_COUNTRIES,
    DENY_ENTITIES,
    ENTITY_DENIED,
    EXPORT_RESTRICTED,
    EXPORT_SUSPENDED,
    MODEL_REQUIRED,
    MODEL_UNKNOWN,
    NOT_RELEASED,
    PARTNER_REQUIRED,
    PARTNERS,
    POLICY_STALE,
)

if TYPE_CHECKING:
    from gateway.settings import Settings

# The most of any one caller-controlled value an answer or an audit field repeats (docs/contract.md §4a).
ECHO_LIMIT = 256


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
        message = (
            "The gateway has no confirmed export-control policy, so it admits no requests "
            "until one is loaded (policy_stale)."
        )
        return Decision(False, 503, POLICY_STALE, message, 0)
    message = (
        f"The gateway cannot confirm that export-control policy version {snapshot.version} is "
        "current, so it admits no requests until it can (policy_stale)."
    )
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
    by_group = snapshot.group_denied
    if not deny and not by_group:
        return None
    for code in caller.countries:
        entry = deny.get(code)
        if entry is not None and entry.active(now):
            break
        # Only a code in a denied group (or a subdivision, or an undefined group) costs a call.
        if by_group and (code in by_group or "-" in code or "*" in by_group) and _group_denies(by_group, code, now):
            break
    else:
        return None
    for code in _denied_codes_in_order(caller):
        entry = deny.get(code)
        if entry is not None and entry.active(now):
            message = (
                f"Access{_to_model(model)} from {_place(code)} is not permitted: {code} is on the "
                f"denied countries and regions list (country_denied)."
            )
            return _block(snapshot, COUNTRY_DENIED, message, screening=screening)
        group = _group_denies(by_group, code, now) if by_group else None
        if group is not None:
            message = (
                f"Access{_to_model(model)} from {_place(code)} is not permitted: {code} is in country group "
                f"{group.key[1:]}, which is on the denied countries and regions list (country_denied)."
                if group.key[1:] in snapshot.groups
                else f"Access{_to_model(model)} is not permitted: the denied countries list names country group "
                f"{group.key[1:]}, which the policy does not define, so it denies every caller (country_denied)."
            )
            return _block(snapshot, COUNTRY_DENIED, message, screening=screening)
    return None  # unreachable: the first loop found a denied code


def _group_denies(by_group: Mapping[str, tuple[Entry, ...]], code: str, now: float) -> Entry | None:
    """The active deny-countries entry naming a group that holds ``code`` (or an undefined group)."""
    for entry in by_group.get(code, ()) + by_group.get("*", ()):
        if entry.active(now):
            return entry
    if "-" in code:  # a subdivision is denied where its country is
        return _group_denies(by_group, code.split("-", 1)[0], now)
    return None


def _entity_denied(
    snapshot: Snapshot, caller: Caller, model: str | None, *, now: float
) -> tuple[Decision | None, dict[str, Any] | None]:
    deny = snapshot.lists[DENY_ENTITIES]
    if deny:
        entry = deny.get(caller.subject)
        if entry is not None and entry.active(now):
            message = (
                f"Access{_to_model(model)} is not permitted: the caller '{clip(caller.subject)}' is on "
                "the denied entities list (entity_denied)."
            )
            return _block(snapshot, ENTITY_DENIED, message, screening=None), None
        org = caller.org
        if org:
            entry = deny.get(org)
            if entry is not None and entry.active(now):
                message = (
                    f"Access{_to_model(model)} is not permitted: the organisation '{clip(org)}' is on "
                    "the denied entities list (entity_denied)."
                )
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
        message = (
            f"Access{_to_model(model)} is not permitted: the caller's organisation matches the "
            "denied-party screening list (entity_denied)."
        )
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
            name = path[len(base) + 1 :]
            return name if "/" not in name else None
    return None


def _canonical_name(name: str) -> bool:
    # A name a server could read otherwise (percent-decoded, a dot segment, ;params) is not decided on.
    return not ("%" in name or ";" in name or "\\" in name or name in (".", ".."))


def _request_model(
    snapshot: Snapshot,
    model: str | None,
    method: str,
    path: str,
    rules: Rules,
    screening: dict[str, Any] | None,
) -> tuple[str | None, Decision | None]:
    """Row 3a: the model a proxied request is decided on, or the refusal; (None, None) for a modelless path."""
    named = path_model(method, path, rules)
    if named is not None:
        if not _canonical_name(named):
            message = (
                "The request path could name a model in more than one way (encoded characters, a dot "
                "segment, a backslash or ';' parameters); send the canonical path (ambiguous_request)."
            )
            return None, _block(snapshot, AMBIGUOUS_REQUEST, message, screening=screening)
        if model is not None and model != named:
            message = (
                f"The request path names model '{clip(named)}' and the request names '{clip(model)}' "
                "(ambiguous_request)."
            )
            return None, _block(snapshot, AMBIGUOUS_REQUEST, message, screening=screening)
        return named, None
    if model is not None or (method in _MODELLESS_METHODS and path in rules.modelless_paths):
        return model, None
    message = (
        "The request names no model. Name the model in the JSON body's 'model' field; only GET and HEAD "
        "to " + ", ".join(sorted(rules.modelless_paths)) + " need none (model_required)."
    )
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
        refused = _unregistered(snapshot, model, rules, screening)
        if refused is not None:
            return refused
        # With nothing registered there is no suspension, country set or stage to apply.
        return snapshot.allow if screening is None else _allow(snapshot, screening)
    return _model_rows(snapshot, entry, caller, model, now, rules, screening)


def _unregistered(snapshot: Snapshot, model: str, rules: Rules, screening: dict[str, Any] | None) -> Decision | None:
    """Row 4 (and a near spelling of a registered name) for a model the registry lacks."""
    if fold_model_name(model) in snapshot.folded_models:
        message = (
            f"Model '{clip(model)}' is not registered, but a model that differs from it only in letter "
            "case, character width or surrounding spaces is, and a model server may read one as the "
            "other; send the registered name exactly (ambiguous_request)."
        )
        return _block(snapshot, AMBIGUOUS_REQUEST, message, screening=screening)
    if rules.unknown_model != "allow":
        message = (
            f"Model '{clip(model)}' is not in the gateway's model registry, and unregistered models "
            "are not served (model_unknown)."
        )
        return _block(snapshot, MODEL_UNKNOWN, message, screening=screening)
    return None


def _model_rows(
    snapshot: Snapshot,
    entry: Model,
    caller: Caller,
    model: str,
    now: float,
    rules: Rules,
    screening: dict[str, Any] | None,
) -> Decision:
    """Rows 5-8 for a registered model, in its state at ``now`` (timeline entries applied)."""
    states = entry.states
    state = states[0][1] if len(states) == 1 else entry.state(now)
    if state.export_suspended:
        refused = _suspended(snapshot, caller, model, rules, screening)
        if refused is not None:
            return refused
    licence = None
    allowed_countries = state.allowed_countries
    if allowed_countries is not None:
        outside = _outside(caller, allowed_countries, rules.require_ip_country)
        if outside is not None:
            licence = _licence(snapshot, caller, model, now, rules)
            if licence is None:
                message = _restricted_message(model, outside)
                return _block(snapshot, EXPORT_RESTRICTED, message, screening=screening)
    refused = _released(snapshot, caller, model, state.stage, now, rules, screening)
    if refused is not None:
        return refused
    if screening is None and licence is None:
        return snapshot.allow
    return _allow(snapshot, screening, licence)


def _suspended(
    snapshot: Snapshot, caller: Caller, model: str, rules: Rules, screening: dict[str, Any] | None
) -> Decision | None:
    """Row 5, for a model whose export is suspended now."""
    outside = _outside(caller, rules.home_countries, rules.require_ip_country)
    if outside is None:
        return None
    message = _suspended_message(model, outside, rules.home_countries)
    return _block(snapshot, EXPORT_SUSPENDED, message, screening=screening)


def _licence(snapshot: Snapshot, caller: Caller, model: str, now: float, rules: Rules) -> str | None:
    """The id of a licence of the caller's org that covers ``model`` from every one of the caller's
    countries (claim and IP, as row 6 checks them), or None."""
    org = caller.org
    if not org or not snapshot.licences:
        return None
    for licence in snapshot.licences.get(org, ()):
        if licence.covers(model, now) and _outside(caller, licence.countries, rules.require_ip_country) is None:
            return licence.id
    return None


def _released(
    snapshot: Snapshot,
    caller: Caller,
    model: str,
    stage: str,
    now: float,
    rules: Rules,
    screening: dict[str, Any] | None,
) -> Decision | None:
    """Rows 7 and 8: the model's current stage against the caller's tier and the partners list."""
    stages = rules.tier_stages.get(caller.tier)
    if stages is None or stage not in stages:
        message = (
            f"Model '{clip(model)}' is not released to the '{clip(caller.tier)}' tier: its current stage is "
            f"'{stage}' (not_released)."
        )
        return _block(snapshot, NOT_RELEASED, message, screening=screening)
    if stage == "partners" and "internal" not in stages:
        org = caller.org
        partner = snapshot.lists[PARTNERS].get(org) if org else None
        if partner is None or not partner.active(now):
            who = f"the organisation '{clip(org)}' is" if org else "the caller has no organisation, so it is"
            message = (
                f"Model '{clip(model)}' is released to approved partners only, and {who} not on the "
                "partners list (partner_required)."
            )
            return _block(snapshot, PARTNER_REQUIRED, message, screening=screening)
    return None


def blocking_rules(
    snapshot: Snapshot | None, caller: Caller, model: str | None, now: float, rules: Rules
) -> list[Decision]:
    """Every rule of rows 2-8 (and 10) that refuses ``caller`` the ``model``, each as its own decision,
    in the table's order; empty when the request would be allowed. ``decide`` stops at the first."""
    if snapshot is None:
        return [_stale(snapshot)]
    found: list[Decision] = []
    entity, screening = _entity_denied(snapshot, caller, model, now=now)
    if entity is not None:
        found.append(entity)
    country = _country_denied(snapshot, caller, model, now=now, screening=screening)
    if country is not None:
        found.append(country)
    if model is None:
        return found
    entry = snapshot.models.get(model)
    if entry is None:
        refused = _unregistered(snapshot, model, rules, screening)
        return found + ([refused] if refused is not None else [])
    state = entry.state(now)
    if state.export_suspended:
        suspended = _suspended(snapshot, caller, model, rules, screening)
        if suspended is not None:
            found.append(suspended)
    if state.allowed_countries is not None:
        outside = _outside(caller, state.allowed_countries, rules.require_ip_country)
        if outside is not None and _licence(snapshot, caller, model, now, rules) is None:
            found.append(_block(snapshot, EXPORT_RESTRICTED, _restricted_message(model, outside), screening=screening))
    released = _released(snapshot, caller, model, state.stage, now, rules, screening)
    if released is not None:
        found.append(released)
    return found


def _allow(snapshot: Snapshot, screening: dict[str, Any] | None, licence: str | None = None) -> Decision:
    allow = snapshot.allow
    message = allow.message if licence is None else f"{allow.message[:-1]}, under licence {clip(licence)}."
    return Decision(True, 200, "", message, snapshot.version, screening, licence)


def _suspended_message(model: str, outside: tuple[str, str], home: frozenset[str]) -> str:
    code, unknown = outside
    model = clip(model)
    homes = ", ".join(sorted(home)) or "no country"
    if code:
        return (
            f"Access to model '{model}' from {_place(code)} is not permitted: the model's export is "
            f"suspended and {code} is outside the home countries ({homes}) (export_suspended)."
        )
    return (
        f"Access to model '{model}' is not permitted: the model's export is suspended outside the home "
        f"countries ({homes}) and the caller's country is unknown ({unknown}) (export_suspended)."
    )


def _restricted_message(model: str, outside: tuple[str, str]) -> str:
    code, unknown = outside
    model = clip(model)
    if code:
        return (
            f"Access to model '{model}' from {_place(code)} is not permitted: {code} is outside the "
            "model's allowed countries (export_restricted)."
        )
    return (
        f"Access to model '{model}' is not permitted: the model is limited to its allowed countries and "
        f"the caller's country is unknown ({unknown}) (export_restricted)."
    )


def differs(live: Decision, shadow: Decision) -> bool:
    """Whether the decision under the shadow policy (shadow entries and model shadows enforced) is
    another outcome than the live one: allowed where the live one blocks or the reverse, or another code."""
    return live.allowed is not shadow.allowed or live.code != shadow.code
