"""decide() with country groups, licences and timeline entries that set each state field.

Table tests over snapshots built by ``build_snapshot`` (groups resolved once per version), with a
fake clock read before, at and after each scheduled change.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy.decide import Rules, blocking_rules, decide
from gateway.policy.model import Caller, Snapshot
from gateway.policy.validate import PolicyValidationError, format_instant, validate_entry, validate_model
from gateway.policy.wire import build_snapshot, policy_document
from tests.support.clock import FakeClock

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
LATER = NOW + 3600
RULES = Rules(
    home_countries=frozenset({"US"}),
    unknown_model="deny",
    tier_stages={
        "public": frozenset({"general"}),
        "partner": frozenset({"partners", "general"}),
        "internal": frozenset({"internal", "partners", "general"}),
    },
)


def entry(**extra: Any) -> dict[str, Any]:
    return {"reason": "test", "source": "test", "added_by": "t", "added_at": "2026-01-01T00:00:00Z", **extra}


def group(*codes: str, **extra: Any) -> dict[str, Any]:
    return entry(countries=list(codes), expires_at=None, **extra)


def licence(
    org: str, models: list[str], countries: list[str], *, expires: float = LATER, **extra: Any
) -> dict[str, Any]:
    return entry(org=org, models=models, countries=countries, expires_at=format_instant(expires), **extra)


def model(
    stage: str = "general", *, allowed: list[str] | None = None, suspended: bool = False, timeline: Any = ()
) -> Any:
    return {"stage": stage, "timeline": list(timeline), "allowed_countries": allowed, "export_suspended": suspended}


GROUPS = {"E:1": group("IR", "KP", "SY"), "A:1": group("GB", "JP", "DE"), "D:5": group("CN", "RU")}


def snapshot(
    *,
    deny: dict[str, Any] | None = None,
    groups: dict[str, Any] | None = None,
    licences: dict[str, Any] | None = None,
    models: dict[str, Any] | None = None,
    partners: dict[str, Any] | None = None,
    deny_entities: dict[str, Any] | None = None,
) -> Snapshot:
    return build_snapshot(
        version=7,
        generation="g",
        loaded_at=NOW,
        lists={
            "deny-countries": deny if deny is not None else {"@E:1": entry(expires_at=None)},
            "deny-entities": deny_entities or {},
            "partners": partners or {},
            "ip-ranges": {},
            "country-groups": groups if groups is not None else GROUPS,
            "licences": licences or {},
        },
        models=models
        if models is not None
        else {
            "open": model(),
            "allied": model(allowed=["US", "@A:1"]),
            "us-only": model(allowed=["US"]),
            "held": model("partners", allowed=["US"]),
            "suspended": model(suspended=True, allowed=["US"]),
        },
        api_keys={},
    )


def caller(
    country: str | None, *, org: str | None = "lab-fr", ip_country: str | None = None, tier: str = "public"
) -> Caller:
    return Caller("alice", org, None, tier, country, "198.51.100.7", ip_country=ip_country)


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize(
    ("country", "model_name", "code"),
    [
        ("IR", "open", "country_denied"),  # E:1 named in deny-countries
        ("SY", "open", "country_denied"),
        ("FR", "open", ""),
        ("GB", "allied", ""),  # A:1 named in allowed_countries
        ("JP", "allied", ""),
        ("US", "allied", ""),
        ("FR", "allied", "export_restricted"),
        ("CN", "allied", "export_restricted"),
    ],
)
def test_groups_named_in_deny_countries_and_allowed_countries(country: str, model_name: str, code: str) -> None:
    decision = decide(snapshot(), caller(country), model_name, NOW, RULES)
    assert decision.code == code


def test_a_subdivision_is_denied_where_its_country_is_in_a_denied_group() -> None:
    snap = snapshot(groups={**GROUPS, "crimea-etc": group("UA")}, deny={"@crimea-etc": entry(expires_at=None)})
    decision = decide(snap, caller("UA-43"), "open", NOW, RULES)
    assert decision.code == "country_denied" and "country group crimea-etc" in decision.message


def test_a_group_change_is_resolved_in_the_next_snapshot_whatever_was_reused() -> None:
    first = snapshot()
    assert decide(first, caller("FR"), "allied", NOW, RULES).code == "export_restricted"
    assert decide(first, caller("FR"), "open", NOW, RULES).allowed
    # Only the groups changed: the models and deny-countries are reused, resolved again.
    groups = {**GROUPS, "A:1": group("GB", "JP", "DE", "FR"), "E:1": group("IR", "KP", "SY", "FR")}
    unchanged = ("deny-countries", "deny-entities", "partners", "ip-ranges", "licences", "models", "apikeys")
    second = build_snapshot(
        version=8,
        generation="g",
        loaded_at=NOW,
        lists={"country-groups": groups},
        models={},
        api_keys={},
        reuse=first,
        unchanged=unchanged,
    )
    assert second.models["allied"] is not first.models["allied"]
    assert second.models["open"] is first.models["open"]  # names no group: kept as it was
    assert decide(second, caller("FR"), "open", NOW, RULES).code == "country_denied"
    # And a later snapshot that changes nothing about groups keeps the resolution.
    third = build_snapshot(
        version=9, generation="g", loaded_at=NOW, lists={}, models={}, api_keys={}, reuse=second,
        unchanged=(*unchanged, "country-groups"),
    )  # fmt: skip
    assert third.groups is second.groups and third.models is second.models
    assert third.group_denied is second.group_denied


def test_a_reference_to_a_group_the_policy_lacks_fails_closed() -> None:
    snap = snapshot(deny={"@gone": entry(expires_at=None)}, models={"m": model(allowed=["@gone"])})
    assert decide(snap, caller("FR"), "m", NOW, RULES).code == "country_denied"
    snap = snapshot(deny={}, models={"m": model(allowed=["@gone"])})
    assert decide(snap, caller("US"), "m", NOW, RULES).code == "export_restricted"


def test_a_shadow_group_change_is_decided_alongside_only() -> None:
    snap = snapshot(groups={**GROUPS, "A:1": group("GB", "JP", "DE", "FR", enforce=False)})
    assert decide(snap, caller("FR"), "allied", NOW, RULES).code == "export_restricted"
    assert snap.shadow is not None
    assert decide(snap.shadow, caller("FR"), "allied", NOW, RULES).allowed


# --------------------------------------------------------------------------- licences


LIC = {"L-42": licence("lab-fr", ["us-only", "held", "suspended"], ["FR", "@A:1"])}


@pytest.mark.parametrize(
    ("who", "model_name", "code", "licence_id"),
    [
        # Row 6: overridden for the licence's org, models and countries.
        (caller("FR"), "us-only", "", "L-42"),
        (caller("FR", ip_country="FR"), "us-only", "", "L-42"),
        (caller("JP"), "us-only", "", "L-42"),  # a country of a group the licence names
        (caller("FR", ip_country="CN"), "us-only", "export_restricted", None),  # the IP is not covered
        (caller("DE", org="other-lab"), "us-only", "export_restricted", None),  # another org
        (caller(None), "us-only", "export_restricted", None),  # no claim: row 6 needs a known country
        (caller("BR"), "us-only", "export_restricted", None),  # a country the licence does not name
        # Row 2 still wins.
        (caller("FR", org="bad-org"), "us-only", "entity_denied", None),
        # Row 3 still wins.
        (caller("FR", ip_country="IR"), "us-only", "country_denied", None),
        # Row 5 still wins.
        (caller("FR"), "suspended", "export_suspended", None),
        # Row 7 is not a licence's to lift: a partners-stage model is still not released to public.
        (caller("FR"), "held", "not_released", None),
        # Row 8 neither: the partner tier still needs the partners list.
        (caller("FR", tier="partner"), "held", "partner_required", None),
        # A model the licence does not name.
        (caller("FR"), "allied", "export_restricted", None),
    ],
)
def test_licence_overrides_row_6_only(who: Caller, model_name: str, code: str, licence_id: str | None) -> None:
    licences = {**LIC, "L-7": licence("bad-org", ["us-only"], ["FR"])}
    snap = snapshot(licences=licences, deny_entities={"bad-org": entry(expires_at=None)})
    decision = decide(snap, who, model_name, NOW, RULES)
    assert decision.code == code
    assert decision.licence == licence_id
    if licence_id:
        assert decision.to_dict()["licence"] == licence_id and licence_id in decision.message


def test_a_licence_stops_at_its_expiry_with_no_new_snapshot() -> None:
    snap = snapshot(licences=LIC)
    clock = FakeClock(NOW)
    assert decide(snap, caller("FR"), "us-only", clock(), RULES).licence == "L-42"
    clock.advance(LATER - NOW - 1)
    assert decide(snap, caller("FR"), "us-only", clock(), RULES).allowed
    clock.advance(1)  # at expires_at
    assert decide(snap, caller("FR"), "us-only", clock(), RULES).code == "export_restricted"


def test_a_licence_follows_a_group_change() -> None:
    snap = snapshot(licences=LIC, groups={**GROUPS, "A:1": group("GB", "JP")})
    assert decide(snap, caller("DE"), "us-only", NOW, RULES).code == "export_restricted"


# --------------------------------------------------------------------------- timeline entries


AT = NOW + 600
FUTURE, PAST = "2099-01-01T00:00:00Z", "2020-01-01T00:00:00Z"
LIC_BODY = {"reason": "r", "org": "o", "models": ["m"], "countries": ["FR"], "expires_at": FUTURE}


@pytest.mark.parametrize(
    ("start", "step", "who", "before", "after"),
    [
        ({"stage": "partners"}, {"stage": "general"}, caller("US"), "not_released", ""),
        ({"stage": "general"}, {"stage": "internal"}, caller("US", tier="partner"), "", "not_released"),
        ({"export_suspended": False}, {"export_suspended": True}, caller("FR"), "", "export_suspended"),
        ({"export_suspended": True}, {"export_suspended": False}, caller("FR"), "export_suspended", ""),
        ({"allowed_countries": ["US"]}, {"allowed_countries": ["US", "@A:1"]}, caller("GB"), "export_restricted", ""),
        ({"allowed_countries": None}, {"allowed_countries": ["US"]}, caller("FR"), "", "export_restricted"),
        ({"allowed_countries": ["US"]}, {"allowed_countries": None}, caller("BR"), "export_restricted", ""),
    ],
)  # fmt: skip
def test_timeline_entry_sets_each_field_before_at_and_after(
    start: dict[str, Any], step: dict[str, Any], who: Caller, before: str, after: str
) -> None:
    body = {"stage": "general", **start, "timeline": [{"at": format_instant(AT), **step}]}
    snap = snapshot(models={"m": validate_model("m", body)})
    assert snap.next_change_at == AT
    clock = FakeClock(AT - 1)
    assert decide(snap, who, "m", clock(), RULES).code == before
    clock.advance(1)
    assert decide(snap, who, "m", clock(), RULES).code == after
    clock.advance(86400)
    assert decide(snap, who, "m", clock(), RULES).code == after


def test_suspend_now_lift_on_a_date_is_one_write() -> None:
    lift = NOW + 21 * 86400
    stored = validate_model(
        "frontier-x",
        {
            "stage": "general",
            "export_suspended": False,
            "timeline": [
                {"at": format_instant(NOW - 1), "export_suspended": True},
                {"at": format_instant(lift), "export_suspended": False, "allowed_countries": ["US", "@A:1"]},
            ],
        },
    )
    snap = snapshot(models={"frontier-x": stored})
    assert snap.next_change_at == lift
    assert decide(snap, caller("GB"), "frontier-x", NOW, RULES).code == "export_suspended"
    assert decide(snap, caller("US"), "frontier-x", NOW, RULES).allowed  # home country
    assert decide(snap, caller("GB"), "frontier-x", lift, RULES).allowed
    assert decide(snap, caller("FR"), "frontier-x", lift, RULES).code == "export_restricted"
    # Later entries keep what earlier ones set unless they name the field again.
    assert snap.models["frontier-x"].state(lift).stage == "general"
    document = policy_document(snap)["models"]["frontier-x"]
    assert document["timeline"][0] == {"at": format_instant(NOW - 1), "export_suspended": True}


def test_a_timeline_entry_must_set_something_and_name_known_fields() -> None:
    with pytest.raises(PolicyValidationError) as raised:
        validate_model("m", {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z"}]})
    assert raised.value.field == "timeline[0]"
    with pytest.raises(PolicyValidationError) as raised:
        validate_model("m", {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z", "tier": "x"}]})
    assert raised.value.field == "timeline[0].tier"
    with pytest.raises(PolicyValidationError) as raised:
        validate_model(
            "m", {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z", "export_suspended": "yes"}]}
        )
    assert raised.value.field == "timeline[0].export_suspended"


# --------------------------------------------------------------------------- explain: all


def test_blocking_rules_lists_every_rule_that_blocks_in_order() -> None:
    snap = snapshot(deny_entities={"bad-org": entry(expires_at=None)})
    found = blocking_rules(snap, caller("IR", org="bad-org"), "suspended", NOW, RULES)
    assert [d.code for d in found] == ["entity_denied", "country_denied", "export_suspended", "export_restricted"]
    assert decide(snap, caller("IR", org="bad-org"), "suspended", NOW, RULES).code == found[0].code
    assert blocking_rules(snap, caller("US"), "open", NOW, RULES) == []
    assert [d.code for d in blocking_rules(snap, caller("US"), "nope", NOW, RULES)] == ["model_unknown"]
    assert [d.code for d in blocking_rules(None, caller("US"), "open", NOW, RULES)] == ["policy_stale"]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("list_name", "body", "field"),
    [
        ("country-groups", {"reason": "r"}, "countries"),
        ("country-groups", {"reason": "r", "countries": []}, "countries"),
        ("country-groups", {"reason": "r", "countries": ["@A:1"]}, "countries[0]"),
        ("country-groups", {"reason": "r", "countries": ["XX"]}, "countries[0]"),
        ("country-groups", {"reason": "r", "countries": ["FR"], "expires_at": FUTURE}, "expires_at"),
        ("licences", {"reason": "r", "org": "o", "models": ["m"], "countries": ["FR"]}, "expires_at"),
        ("licences", {"reason": "r", "org": "o", "models": [], "countries": ["FR"], "expires_at": FUTURE}, "models"),
        ("licences", {"reason": "r", "models": ["m"], "countries": ["FR"], "expires_at": FUTURE}, "org"),
        ("licences", {**LIC_BODY, "countries": ["@a b"]}, "countries[0]"),
        ("licences", {**LIC_BODY, "expires_at": PAST}, "expires_at"),
    ],
)  # fmt: skip
def test_group_and_licence_entries_are_validated(list_name: str, body: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyValidationError) as raised:
        validate_entry(list_name, "k", body, actor="t", now_iso="2026-01-01T00:00:00Z", now=NOW)
    assert raised.value.field == field


def test_a_licence_entry_is_normalised() -> None:
    stored = validate_entry(
        "licences",
        "L-1",
        {"reason": "r", "org": "lab", "models": ["b", "a"], "countries": ["fr", "@A:1"], "expires_at": FUTURE},
        actor="t",
        now_iso="2026-01-01T00:00:00Z",
        now=NOW,
    )  # fmt: skip
    assert stored["models"] == ["a", "b"] and stored["countries"] == ["@A:1", "FR"] and stored["org"] == "lab"
