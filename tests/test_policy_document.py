"""The §7 policy document: validation of operator input, stored dicts <-> snapshot, the example policy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy.decide import Rules, decide
from gateway.policy.model import ApiKey, Caller, Entry
from gateway.policy.names import LIST_NAMES
from gateway.policy.validate import (
    PolicyValidationError,
    document_references,
    format_instant,
    normalize_key,
    parse_instant,
    validate_api_key_request,
    validate_entry,
    validate_list,
    validate_model,
    validate_model_name,
    validate_policy_document,
)
from gateway.policy.wire import build_snapshot, entry_from_dict, model_from_dict, policy_document

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "policy.example.yaml"
ACTOR = "ops-alice"
NOW_ISO = "2026-03-01T12:00:00Z"
TIERS = ("public", "partner", "internal")


def field_of(exc: pytest.ExceptionInfo[PolicyValidationError]) -> str:
    return exc.value.field


# --------------------------------------------------------------------------- instants


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("2026-07-01T00:00:00Z", "2026-07-01T00:00:00Z"),
        ("2026-07-01T02:00:00+02:00", "2026-07-01T00:00:00Z"),
        ("2026-07-01T00:00:00.250000+00:00", "2026-07-01T00:00:00.250000Z"),
    ],
)
def test_instants_are_normalised_to_utc(raw: str, normalised: str) -> None:
    text, ts = parse_instant(raw, "expires_at")
    assert text == normalised
    assert format_instant(ts) == normalised


@pytest.mark.parametrize("raw", ["2026-07-01T00:00:00", "2026-07-01", "yesterday", "", 1751328000, None])
def test_instants_need_a_time_zone(raw: object) -> None:
    with pytest.raises(PolicyValidationError) as info:
        parse_instant(raw, "timeline[0].at")
    assert info.value.field == "timeline[0].at"


# --------------------------------------------------------------------------- entries


def test_entry_is_normalised_and_stamped_with_actor_and_time() -> None:
    body = {"reason": "  embargo ", "expires_at": "2027-01-01T01:00:00+01:00"}
    stored = validate_entry("deny-countries", "CU", body, actor=ACTOR, now_iso=NOW_ISO)
    assert stored == {
        "reason": "embargo",
        "source": "",
        "added_by": ACTOR,
        "added_at": NOW_ISO,
        "expires_at": "2027-01-01T00:00:00Z",
    }


def test_entry_written_singly_ignores_claimed_history() -> None:
    body = {"reason": "r", "added_by": "mallory", "added_at": "2020-01-01T00:00:00Z"}
    stored = validate_entry("partners", "acme", body, actor=ACTOR, now_iso=NOW_ISO)
    assert (stored["added_by"], stored["added_at"]) == (ACTOR, NOW_ISO)


def test_entry_imported_keeps_its_history() -> None:
    body = {"reason": "r", "added_by": "bob", "added_at": "2025-05-05T05:05:05+00:00"}
    stored = validate_entry("partners", "acme", body, actor=ACTOR, now_iso=NOW_ISO, keep_meta=True)
    assert (stored["added_by"], stored["added_at"]) == ("bob", "2025-05-05T05:05:05Z")
    fresh = validate_entry("partners", "acme", {"reason": "r"}, actor=ACTOR, now_iso=NOW_ISO, keep_meta=True)
    assert (fresh["added_by"], fresh["added_at"]) == (ACTOR, NOW_ISO)


def test_ip_range_entry_needs_and_normalises_a_country() -> None:
    stored = validate_entry(
        "ip-ranges", "203.0.113.0/24", {"reason": "office", "country": "ua-43"}, actor=ACTOR, now_iso=NOW_ISO
    )
    assert stored["country"] == "UA-43"


@pytest.mark.parametrize(
    ("list_name", "key", "body", "field", "fragment"),
    [
        ("deny-countries", "CU", {}, "reason", "required"),
        ("deny-countries", "CU", {"reason": "   "}, "reason", "required"),
        ("deny-countries", "CU", {"reason": "x" * 1001}, "reason", "at most 1000"),
        ("deny-countries", "CU", {"reason": 7}, "reason", "string"),
        ("deny-countries", "CU", {"reason": "bad\x00byte"}, "reason", "control"),
        ("deny-countries", "CU", {"reason": "r", "source": ["OFAC"]}, "source", "string"),
        ("deny-countries", "CU", {"reason": "r", "note": "x"}, "note", "unknown field"),
        ("deny-countries", "CU", {"reason": "r", "country": "CU"}, "country", "only ip-ranges"),
        ("deny-countries", "CU", {"reason": "r", "expires_at": "2027-01-01"}, "expires_at", "time zone"),
        ("deny-countries", "XX", {"reason": "r"}, "key", "ISO 3166"),
        ("deny-countries", "UA-99", {"reason": "r"}, "key", "ISO 3166"),
        ("ip-ranges", "203.0.113.0/24", {"reason": "r"}, "country", "required"),
        ("ip-ranges", "203.0.113.0/24", {"reason": "r", "country": "Narnia"}, "country", "ISO 3166"),
        ("ip-ranges", "203.0.113.0/33", {"reason": "r", "country": "US"}, "key", "CIDR"),
        ("ip-ranges", "not-an-ip", {"reason": "r", "country": "US"}, "key", "CIDR"),
        ("deny-entities", "", {"reason": "r"}, "key", "empty"),
        ("deny-entities", "x" * 257, {"reason": "r"}, "key", "at most 256"),
        ("deny-entities", "evil\nuser", {"reason": "r"}, "key", "control"),
        ("deny-entities", "zero\u200bwidth", {"reason": "r"}, "key", "control"),
        ("partners", " acme", {"reason": "r"}, "key", "whitespace"),
        ("partners", "acme", "not an object", "body", "object"),
    ],
)
def test_entry_errors_name_the_field(list_name: str, key: str, body: Any, field: str, fragment: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_entry(list_name, key, body, actor=ACTOR, now_iso=NOW_ISO)
    assert info.value.field == field
    assert fragment in info.value.message


def test_unknown_list_is_refused() -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_entry("allow-countries", "US", {"reason": "r"}, actor=ACTOR, now_iso=NOW_ISO)
    assert info.value.field == "list"


@pytest.mark.parametrize(
    ("list_name", "raw", "stored"),
    [
        ("deny-countries", "ua-43", "UA-43"),
        ("deny-countries", "kp", "KP"),
        ("ip-ranges", "203.0.113.7/24", "203.0.113.0/24"),
        ("ip-ranges", "203.0.113.7", "203.0.113.7/32"),
        ("ip-ranges", "2001:DB8::/32", "2001:db8::/32"),
        ("deny-entities", "user 42", "user 42"),
        ("partners", "Acme", "Acme"),
    ],
)
def test_keys_are_normalised_per_list(list_name: str, raw: str, stored: str) -> None:
    assert normalize_key(list_name, raw) == stored


def test_whole_list_refuses_two_spellings_of_one_key() -> None:
    entries = {"ua-43": {"reason": "a"}, "UA-43": {"reason": "b"}}
    with pytest.raises(PolicyValidationError) as info:
        validate_list("deny-countries", entries, actor=ACTOR, now_iso=NOW_ISO)
    assert info.value.field == "entries.UA-43"
    assert "duplicates" in info.value.message


def test_whole_list_normalises_keys() -> None:
    out = validate_list(
        "ip-ranges", {"198.51.100.9/24": {"reason": "r", "country": "de"}}, actor=ACTOR, now_iso=NOW_ISO
    )
    assert list(out) == ["198.51.100.0/24"] and out["198.51.100.0/24"]["country"] == "DE"


# --------------------------------------------------------------------------- models


def test_model_is_normalised_with_a_sorted_timeline() -> None:
    body = {
        "stage": "internal",
        "timeline": [
            {"at": "2027-02-01T00:00:00Z", "stage": "general"},
            {"at": "2027-01-01T01:00:00+01:00", "stage": "partners"},
        ],
        "allowed_countries": ["us", "GB", "UA-43", "US"],
        "export_suspended": False,
    }
    assert validate_model("frontier-x", body) == {
        "stage": "internal",
        "timeline": [
            {"at": "2027-01-01T00:00:00Z", "stage": "partners"},
            {"at": "2027-02-01T00:00:00Z", "stage": "general"},
        ],
        "allowed_countries": ["GB", "UA-43", "US"],
        "export_suspended": False,
    }


def test_model_defaults() -> None:
    assert validate_model("m", {"stage": "general"}) == {
        "stage": "general",
        "timeline": [],
        "allowed_countries": None,
        "export_suspended": False,
    }


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({}, "stage", "required"),
        ({"stage": "beta"}, "stage", "not a stage"),
        ({"stage": "general", "owner": "x"}, "owner", "unknown field"),
        ({"stage": "general", "timeline": {"at": "x"}}, "timeline", "list"),
        ({"stage": "general", "timeline": ["2027-01-01T00:00:00Z"]}, "timeline[0]", "object"),
        (
            {
                "stage": "general",
                "timeline": [
                    {"at": "2027-01-01T00:00:00Z", "stage": "general"},
                    {"at": "2027-13-01T00:00:00Z", "stage": "general"},
                ],
            },
            "timeline[1].at",
            "ISO-8601",
        ),
        (
            {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00", "stage": "general"}]},
            "timeline[0].at",
            "time zone",
        ),
        ({"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z"}]}, "timeline[0]", "sets nothing"),
        (
            {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z", "stage": "ga"}]},
            "timeline[0].stage",
            "not a stage",
        ),
        (
            {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z", "stage": "general", "why": "x"}]},
            "timeline[0].why",
            "unknown field",
        ),
        (
            {
                "stage": "general",
                "timeline": [
                    {"at": "2027-01-01T00:00:00Z", "stage": "partners"},
                    {"at": "2027-01-01T01:00:00+01:00", "stage": "general"},
                ],
            },
            "timeline[1].at",
            "repeats",
        ),
        ({"stage": "general", "allowed_countries": "US"}, "allowed_countries", "list"),
        ({"stage": "general", "allowed_countries": ["US", "UK"]}, "allowed_countries[1]", "ISO 3166"),
        ({"stage": "general", "export_suspended": "false"}, "export_suspended", "true or false"),
        ({"stage": "general", "export_suspended": None}, "export_suspended", "true or false"),
    ],
)
def test_model_errors_name_the_field(body: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_model("m", body)
    assert info.value.field == field
    assert fragment in info.value.message


@pytest.mark.parametrize("name", ["", "has space", "tab\there", "x" * 201, "nul\x00", "rtl\u202eoverride", 5])
def test_bad_model_names_are_refused(name: object) -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_model_name(name)
    assert info.value.field == "model"


@pytest.mark.parametrize("name", ["gpt-mock", "org/model:v2", "x" * 200, "modèle-ü"])
def test_good_model_names_pass(name: str) -> None:
    assert validate_model_name(name) == name


# --------------------------------------------------------------------------- API keys


def test_api_key_request_is_normalised() -> None:
    body = {"subject": "svc-batch", "org": "acme", "country": "ua-43", "tier": "partner"}
    assert validate_api_key_request(body, TIERS) == {
        "subject": "svc-batch",
        "org": "acme",
        "org_name": None,
        "country": "UA-43",
        "tier": "partner",
        "expires_at": None,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"org": "acme", "country": "US", "tier": "public"}, "subject"),
        ({"subject": "s", "country": "US", "tier": "public"}, "org"),
        ({"subject": "s", "org": "acme", "tier": "public"}, "country"),
        ({"subject": "s", "org": "acme", "country": "US"}, "tier"),
        ({"subject": "s", "org": "acme", "country": "US", "tier": "gold"}, "tier"),
        ({"subject": "s", "org": "acme", "country": "Atlantis", "tier": "public"}, "country"),
        ({"subject": "s", "org": "acme", "country": "US", "tier": "public", "scopes": ["*"]}, "scopes"),
        ({"subject": "s", "org": "acme", "country": "US", "tier": "public", "expires_at": "soon"}, "expires_at"),
        ({"subject": "s", "org": "acme", "org_name": 5, "country": "US", "tier": "public"}, "org_name"),
    ],
)
def test_api_key_request_errors_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_api_key_request(body, TIERS)
    assert info.value.field == field


# --------------------------------------------------------------------------- the whole document


def api_key_record(key_hash: str, **extra: Any) -> dict[str, Any]:
    record = {
        "hash": key_hash,
        "subject": "svc",
        "org": "acme",
        "org_name": "Acme Inc",
        "country": "US",
        "tier": "partner",
        "expires_at": None,
        "created_at": "2026-02-01T00:00:00Z",
        "created_by": "ops-bob",
    }
    record.update(extra)
    return record


FULL_DOC: dict[str, Any] = {
    "version": 99,
    "lists": {
        "deny-countries": {
            "cu": {"reason": "embargo", "source": "31 CFR part 515"},
            "UA-43": {"reason": "Crimea", "added_by": "ops-bob", "added_at": "2025-01-01T00:00:00Z"},
        },
        "deny-entities": {"bad-org": {"reason": "entity list", "expires_at": "2027-01-01T00:00:00Z"}},
        "partners": {"acme": {"reason": "agreement"}},
        "ip-ranges": {
            "203.0.113.0/24": {"reason": "office", "country": "us"},
            "198.51.100.0/24": {"reason": "old", "country": "DE", "expires_at": "2026-01-01T00:00:00Z"},
        },
        "country-groups": {"A:5": {"reason": "EAR group", "source": "15 CFR 740 Supp. 1", "countries": ["gb", "JP"]}},
        "licences": {
            "L-1": {
                "reason": "licence granted",
                "org": "lab-fr",
                "models": ["frontier-x"],
                "countries": ["FR", "@A:5"],
                "expires_at": "2027-06-01T00:00:00Z",
            }
        },
    },
    "models": {
        "frontier-x": {
            "stage": "partners",
            "timeline": [{"at": "2027-01-01T00:00:00Z", "stage": "general"}],
            "allowed_countries": ["US", "GB"],
            "export_suspended": False,
        },
        "gpt-mock": {"stage": "general"},
    },
    "api_keys": {"k1": api_key_record("h1"), "k2": api_key_record("h2", org_name=None, expires_at=None)},
}


def test_document_is_normalised_and_keeps_history() -> None:
    out = validate_policy_document(copy.deepcopy(FULL_DOC), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    assert "version" not in out
    assert set(out) == {"lists", "models", "api_keys"}
    assert set(out["lists"]["deny-countries"]) == {"CU", "UA-43"}
    assert out["lists"]["deny-countries"]["CU"]["added_by"] == ACTOR
    assert out["lists"]["deny-countries"]["UA-43"]["added_by"] == "ops-bob"
    assert out["lists"]["deny-countries"]["UA-43"]["added_at"] == "2025-01-01T00:00:00Z"
    assert out["lists"]["ip-ranges"]["203.0.113.0/24"]["country"] == "US"
    assert out["api_keys"]["k1"]["created_by"] == "ops-bob"


def test_document_sections_are_optional() -> None:
    out = validate_policy_document(
        {"version": 3, "models": {"m": {"stage": "general"}}}, actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS
    )
    assert out == {
        "models": {"m": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}}
    }
    only_one_list = validate_policy_document({"lists": {"partners": {}}}, actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    assert only_one_list == {"lists": {"partners": {}}}


def test_document_passes_the_screening_section_through() -> None:
    doc = {"screening": {"entries": [{"name": "X"}]}}
    assert validate_policy_document(doc, actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS) == doc


def test_api_key_record_without_creation_is_stamped() -> None:
    record = api_key_record("h1")
    del record["created_at"], record["created_by"]
    out = validate_policy_document({"api_keys": {"k1": record}}, actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    assert (out["api_keys"]["k1"]["created_by"], out["api_keys"]["k1"]["created_at"]) == (ACTOR, NOW_ISO)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], ""),
        ({"extras": {}}, "extras"),
        ({"lists": []}, "lists"),
        ({"lists": {"allow-countries": {}}}, "lists.allow-countries"),
        ({"lists": {"deny-countries": {"XX": {"reason": "r"}}}}, "lists.deny-countries.XX"),
        ({"lists": {"deny-countries": {"CU": {}}}}, "lists.deny-countries.CU.reason"),
        (
            {"lists": {"deny-countries": {"CU": {"reason": "r", "added_at": "yesterday"}}}},
            "lists.deny-countries.CU.added_at",
        ),
        ({"lists": {"ip-ranges": {"203.0.113.0/24": {"reason": "r"}}}}, "lists.ip-ranges.203.0.113.0/24.country"),
        (
            {"models": {"m": {"stage": "general", "timeline": [{"at": "2027-01-01T00:00:00Z", "stage": "x"}]}}},
            "models.m.timeline[0].stage",
        ),
        ({"models": {"bad name": {"stage": "general"}}}, "models.bad name"),
        ({"api_keys": {"k1": api_key_record("h1", tier="gold")}}, "api_keys.k1.tier"),
        ({"api_keys": {"k1": {k: v for k, v in api_key_record("h1").items() if k != "hash"}}}, "api_keys.k1.hash"),
        ({"api_keys": {"k1": api_key_record("h1"), "k2": api_key_record("h1")}}, "api_keys.k2.hash"),
        ({"api_keys": {"k1": api_key_record("h1", key="gk_secret")}}, "api_keys.k1.key"),
        ({"screening": ["x"]}, "screening"),
    ],
)
def test_document_errors_name_the_path(doc: Any, field: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        validate_policy_document(doc, actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    assert info.value.field == (field or "body")
    assert str(info.value).startswith(f"{info.value.field}: ")


# --------------------------------------------------------------------------- snapshot <-> document

LOADED_AT = parse_instant("2026-06-01T00:00:00Z", "t")[1]


def built(doc: dict[str, Any], *, version: int = 5) -> Any:
    return build_snapshot(
        version=version,
        generation="gen-a",
        loaded_at=LOADED_AT,
        lists=doc["lists"],
        models=doc["models"],
        api_keys=doc["api_keys"],
    )


def test_snapshot_round_trips_to_the_document() -> None:
    stored = validate_policy_document(copy.deepcopy(FULL_DOC), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    document = policy_document(built(stored, version=5))
    assert document == {"version": 5, **stored}


def test_get_then_put_changes_nothing() -> None:
    stored = validate_policy_document(copy.deepcopy(FULL_DOC), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    fetched = policy_document(built(stored))
    again = validate_policy_document(fetched, actor="someone-else", now_iso="2030-01-01T00:00:00Z", tiers=TIERS)
    assert again == stored


def test_snapshot_types() -> None:
    stored = validate_policy_document(copy.deepcopy(FULL_DOC), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    snap = built(stored)
    assert set(snap.lists) == set(LIST_NAMES)
    cu = snap.lists["deny-countries"]["CU"]
    assert isinstance(cu, Entry) and cu.key == "CU" and cu.expires_ts is None and cu.country is None
    bad_org = snap.lists["deny-entities"]["bad-org"]
    assert bad_org.expires_ts == parse_instant("2027-01-01T00:00:00Z", "t")[1]
    assert bad_org.active(bad_org.expires_ts - 1) and not bad_org.active(bad_org.expires_ts)
    assert set(snap.api_keys) == {"h1", "h2"}  # keyed by hash, for the per-request lookup
    key = snap.api_keys["h1"]
    assert isinstance(key, ApiKey) and key.id == "k1" and key.tier == "partner"
    model = snap.models["frontier-x"]
    assert model.allowed_countries == frozenset({"US", "GB"})
    assert (model.timeline[0].at_iso, model.timeline[0].stage) == ("2027-01-01T00:00:00Z", "general")
    assert snap.screening is None and snap.generation == "gen-a"


def test_ip_ranges_hold_the_ranges_active_at_load() -> None:
    stored = validate_policy_document(copy.deepcopy(FULL_DOC), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    # 198.51.100.0/24 expired on 2026-01-01, before the load on 2026-06-01.
    assert dict(built(stored).ip_ranges) == {"203.0.113.0/24": "US"}


def test_snapshot_is_read_only() -> None:
    stored = validate_policy_document(copy.deepcopy(FULL_DOC), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    snap = built(stored)
    with pytest.raises(TypeError):
        snap.lists["partners"]["evil"] = snap.lists["partners"]["acme"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.version = 6  # type: ignore[misc]


def test_missing_lists_build_empty() -> None:
    snap = build_snapshot(version=1, generation="g", loaded_at=0.0, lists={}, models={}, api_keys={})
    assert all(len(snap.lists[name]) == 0 for name in LIST_NAMES)
    assert policy_document(snap) == {
        "version": 1,
        "lists": {name: {} for name in LIST_NAMES},
        "models": {},
        "api_keys": {},
    }


def test_unreadable_stored_values_name_the_field() -> None:
    with pytest.raises(PolicyValidationError) as info:
        entry_from_dict("partners", "acme", {"reason": "r", "expires_at": "never"})
    assert info.value.field == "lists.partners.acme.expires_at"
    with pytest.raises(PolicyValidationError) as info:
        model_from_dict("m", {"stage": "beta"})
    assert info.value.field == "models.m.stage"
    with pytest.raises(PolicyValidationError):
        build_snapshot(version=1, generation="g", loaded_at=0.0, lists={"allow": {}}, models={}, api_keys={})


def test_damaged_suspension_flag_fails_closed() -> None:
    assert model_from_dict("m", {"stage": "general", "export_suspended": "no"}).export_suspended is True
    assert model_from_dict("m", {"stage": "general", "export_suspended": False}).export_suspended is False


# --------------------------------------------------------------------------- the example policy


def load_example() -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    # The example names EAR Country Groups that config/country-groups.yaml defines (make run loads both).
    doc["lists"]["country-groups"] = yaml.safe_load((EXAMPLE.parent / "country-groups.yaml").read_text("utf-8"))
    return doc


def test_example_policy_validates() -> None:
    doc = load_example()
    # Every section, so the file restores an empty Redis; no API keys in a file, no screening list.
    assert set(doc) == {"lists", "models", "api_keys", "screening"}
    assert set(doc["lists"]) == {
        "deny-countries",
        "deny-entities",
        "partners",
        "ip-ranges",
        "country-groups",
        "licences",
    }
    assert doc["api_keys"] == {} and doc["screening"] == {"entries": []}
    out = validate_policy_document(doc, actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    assert set(out["lists"]["deny-countries"]) == {"@E:2", "IR", "KP", "UA-43", "UA-40", "UA-14", "UA-09"}
    document_references(out, {})  # every group it names is defined, every licensed model registered
    assert "SY" not in out["lists"]["deny-countries"]  # programme ended 1 Jul 2025; see the file's comment
    for list_name, entries in out["lists"].items():
        for key, stored in entries.items():
            assert stored["reason"] and stored["source"], f"{list_name}.{key} needs a reason and a source"
    assert out["models"]["gpt-mock"] == {
        "stage": "general",
        "timeline": [],
        "allowed_countries": None,
        "export_suspended": False,
    }
    assert out["models"]["vision-7"]["export_suspended"] is True
    assert [step["stage"] for step in out["models"]["frontier-x-preview"]["timeline"]] == ["general"]
    # Norway survives YAML 1.1, which would read a bare NO as false.
    assert len(out["models"]["frontier-x"]["allowed_countries"]) == 19
    assert "NO" in out["models"]["frontier-x"]["allowed_countries"]


def test_example_policy_decides_as_documented() -> None:
    out = validate_policy_document(load_example(), actor=ACTOR, now_iso=NOW_ISO, tiers=TIERS)
    snap = build_snapshot(
        version=1, generation="g", loaded_at=LOADED_AT, lists=out["lists"], models=out["models"], api_keys={}
    )
    tier_stages = {"public": frozenset({"general"}), "partner": frozenset({"partners", "general"})}
    rules = Rules(home_countries=frozenset({"US"}), unknown_model="deny", tier_stages=tier_stages)

    def code(country: str | None, model: str, **fields: Any) -> str:
        who = Caller(
            subject=fields.get("subject", "u1"),
            org=fields.get("org", "some-org"),
            org_name=None,
            tier=fields.get("tier", "public"),
            claimed_country=country,
            ip="192.0.2.1",
            ip_country=None,
        )
        return decide(snap, who, model, LOADED_AT, rules).code

    assert code("US", "gpt-mock") == ""
    assert code("UA-43", "gpt-mock") == "country_denied"
    assert code("IR", "gpt-mock") == "country_denied"
    assert code("NO", "frontier-x") == ""
    assert code("RU", "frontier-x") == "export_restricted"
    assert code("DE", "vision-7") == "export_suspended"
    assert code("US", "frontier-x-preview", tier="partner", org="example-partner-lab") == ""
    assert code("US", "frontier-x-preview", tier="partner") == "partner_required"
    assert code("US", "gpt-mock", subject="example-user-denied-0001") == "entity_denied"
    assert dict(snap.ip_ranges)["198.51.100.0/24"] == "UA-43"
