"""gateway.policy.effect: every write type, both directions, timelines included (docs/contract.md §7)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy import effect
from gateway.policy.effect import classify_change
from gateway.policy.names import LIST_NAMES
from gateway.storage import keys

LATER = "2027-06-30T00:00:00Z"
SOONER = "2027-01-01T00:00:00Z"
T1, T2 = "2027-01-04T00:00:00Z", "2027-03-01T00:00:00Z"


def entry(expires_at: str | None = None, **extra: Any) -> dict[str, Any]:
    return (
        {"reason": "r", "source": "s", "added_by": "admin", "added_at": "2026-01-01T00:00:00Z"}
        | ({"expires_at": expires_at} if expires_at else {})
        | extra
    )


def model(
    stage: str = "partners",
    timeline: list[dict[str, Any]] | None = None,
    allowed: list[str] | None = None,
    suspended: bool = False,
) -> dict[str, Any]:
    return {"stage": stage, "timeline": timeline or [], "allowed_countries": allowed, "export_suspended": suspended}


def shadowed(live: dict[str, Any], shadow: dict[str, Any]) -> dict[str, Any]:
    """A stored model with a shadow: the live fields, and the model as the shadow write makes it."""
    return live | {"shadow": shadow}


def one(record: str, before: Any, after: Any, unknown_model: str = "deny") -> str:
    return classify_change({record: before}, {record: after}, unknown_model=unknown_model)


DENY = ["list:deny-countries#RU", "list:deny-entities#acme"]
PARTNER = "list:partners#acme"
IP = "list:ip-ranges#203.0.113.0/24"
MODEL = "models#frontier-x"
GROUP = "list:country-groups#A:1"
LICENCE = "list:licences#L-1"


US, USGB = ["US"], ["US", "GB"]


def step(**fields: Any) -> list[dict[str, Any]]:
    return [{"at": T1, **fields}]


def licence(expires_at: str = LATER, **extra: Any) -> dict[str, Any]:
    fields = {"org": "lab", "models": ["m1"], "countries": ["FR"]} | extra
    return entry(expires_at, **fields)


CASES: list[tuple[str, str, Any, Any, str]] = [
    # (case, record, before, after, effect)
    *[(f"{r} add", r, None, entry(), "tighten") for r in DENY],
    *[(f"{r} delete", r, entry(), None, "loosen") for r in DENY],
    *[(f"{r} expiry set", r, entry(), entry(LATER), "loosen") for r in DENY],
    *[(f"{r} expiry shortened", r, entry(LATER), entry(SOONER), "loosen") for r in DENY],
    *[(f"{r} expiry extended", r, entry(SOONER), entry(LATER), "tighten") for r in DENY],
    *[(f"{r} expiry removed", r, entry(SOONER), entry(), "tighten") for r in DENY],
    *[(f"{r} reason only", r, entry(LATER), entry(LATER, reason="new"), "tighten") for r in DENY],
    ("partner add", PARTNER, None, entry(), "loosen"),
    ("partner delete", PARTNER, entry(), None, "tighten"),
    ("partner expiry extended", PARTNER, entry(SOONER), entry(LATER), "loosen"),
    ("partner expiry removed", PARTNER, entry(SOONER), entry(), "loosen"),
    ("partner expiry shortened", PARTNER, entry(LATER), entry(SOONER), "tighten"),
    ("partner expiry set", PARTNER, entry(), entry(LATER), "tighten"),
    ("partner reason only", PARTNER, entry(), entry(reason="new"), "tighten"),
    ("ip-range add", IP, None, entry(country="IR"), "loosen"),
    ("ip-range delete", IP, entry(country="IR"), None, "loosen"),
    ("ip-range country changed", IP, entry(country="IR"), entry(country="KP"), "loosen"),
    ("suspend", MODEL, model(), model(suspended=True), "tighten"),
    ("lift", MODEL, model(suspended=True), model(), "loosen"),
    ("countries narrowed", MODEL, model(allowed=["GB", "US"]), model(allowed=["US"]), "tighten"),
    ("countries widened", MODEL, model(allowed=["US"]), model(allowed=["GB", "US"]), "loosen"),
    ("countries swapped", MODEL, model(allowed=["US"]), model(allowed=["GB"]), "loosen"),
    ("countries nulled", MODEL, model(allowed=["US"]), model(allowed=None), "loosen"),
    ("countries set from null", MODEL, model(allowed=None), model(allowed=["US"]), "tighten"),
    ("countries emptied", MODEL, model(allowed=["US"]), model(allowed=[]), "tighten"),
    ("stage internal -> partners", MODEL, model("internal"), model("partners"), "loosen"),
    ("stage partners -> general", MODEL, model("partners"), model("general"), "loosen"),
    ("stage general -> internal", MODEL, model("general"), model("internal"), "tighten"),
    ("stage partners -> internal", MODEL, model("partners"), model("internal"), "tighten"),
    ("timeline step to general added", MODEL, model(), model(timeline=[{"at": T1, "stage": "general"}]), "loosen"),
    ("timeline step to general removed", MODEL, model(timeline=[{"at": T1, "stage": "general"}]), model(), "tighten"),
    (
        "timeline step to general brought forward",
        MODEL,
        model(timeline=[{"at": T2, "stage": "general"}]),
        model(timeline=[{"at": T1, "stage": "general"}]),
        "loosen",
    ),
    (
        "timeline step to general put back",
        MODEL,
        model(timeline=[{"at": T1, "stage": "general"}]),
        model(timeline=[{"at": T2, "stage": "general"}]),
        "tighten",
    ),
    (
        "timeline step to internal added",
        MODEL,
        model("general"),
        model("general", timeline=[{"at": T1, "stage": "internal"}]),
        "tighten",
    ),
    (
        "timeline step to internal removed",
        MODEL,
        model("general", timeline=[{"at": T1, "stage": "internal"}]),
        model("general"),
        "loosen",
    ),
    (
        "stage narrowed now but released later by timeline",
        MODEL,
        model("partners"),
        model("internal", timeline=[{"at": T1, "stage": "general"}]),
        "loosen",
    ),
    (
        "timeline lifting a suspension",
        MODEL,
        model(suspended=True),
        model(suspended=True, timeline=[{"at": T1, "export_suspended": False}]),
        "loosen",
    ),
    (
        "timeline widening countries",
        MODEL,
        model(allowed=["US"]),
        model(allowed=["US"], timeline=[{"at": T1, "allowed_countries": ["GB", "US"]}]),
        "loosen",
    ),
    ("several changes, one loosening", MODEL, model(allowed=["US"]), model("internal", allowed=None), "loosen"),
    ("several changes, all tightening", MODEL, model("general"), model("internal", suspended=True), "tighten"),
    ("key issued", "apikeys#key_1", None, {"hash": "h", "tier": "public"}, "loosen"),
    ("key revoked", "apikeys#key_1", {"hash": "h", "tier": "public"}, None, "tighten"),
    ("revocation kept", "revoked#key_1", None, {"hash": "h"}, "tighten"),
    *[(f"{name} replaced whole", f"list:{name}", {"a": entry()}, {"a": entry()}, "loosen") for name in LIST_NAMES],
    ("models replaced whole", "models", {}, {}, "loosen"),
    ("api keys replaced whole", "apikeys", {}, {}, "loosen"),
    ("screening replaced", "screening", {"bytes": 10}, {"count": 1}, "loosen"),
    ("something unknown", "future#x", None, {}, "loosen"),
    # Shadow entries ("enforce": false) and a model's shadow count as absent: only what is enforced counts.
    *[(f"{r} shadow added", r, None, entry(enforce=False), "tighten") for r in DENY],
    *[(f"{r} shadow written over a live entry", r, entry(), entry(enforce=False), "loosen") for r in DENY],
    *[(f"{r} shadow promoted", r, entry(enforce=False), entry(), "tighten") for r in DENY],
    *[(f"{r} shadow deleted", r, entry(enforce=False), None, "tighten") for r in DENY],
    ("partner shadow added", PARTNER, None, entry(enforce=False), "tighten"),
    ("partner shadow promoted", PARTNER, entry(enforce=False), entry(), "loosen"),
    ("partner made shadow", PARTNER, entry(), entry(enforce=False), "tighten"),
    ("ip-range shadow added", IP, None, entry(country="IR", enforce=False), "tighten"),
    ("ip-range shadow promoted", IP, entry(country="IR", enforce=False), entry(country="IR"), "loosen"),
    (
        "model shadow lifting a suspension",
        MODEL,
        model(suspended=True),
        shadowed(model(suspended=True), model()),
        "tighten",
    ),
    (
        "model shadow widening countries",
        MODEL,
        model(allowed=["US"]),
        shadowed(model(allowed=["US"]), model()),
        "tighten",
    ),
    ("model shadow suspending", MODEL, model(), shadowed(model(), model(suspended=True)), "tighten"),
    ("model shadow discarded", MODEL, shadowed(model(), model("general")), model(), "tighten"),
    ("model shadow lift promoted", MODEL, shadowed(model(suspended=True), model()), model(), "loosen"),
    (
        "model shadow suspension promoted",
        MODEL,
        shadowed(model(), model(suspended=True)),
        model(suspended=True),
        "tighten",
    ),
    ("model shadow release promoted", MODEL, shadowed(model("internal"), model("general")), model("general"), "loosen"),
    ("live change beside a shadow", MODEL, shadowed(model(), model()), shadowed(model("general"), model()), "loosen"),
    # Country groups: any change to a group's members can widen an allowed set or shrink a deny entry.
    ("group add", GROUP, None, entry(countries=["GB"]), "loosen"),
    ("group member added", GROUP, entry(countries=["GB"]), entry(countries=["GB", "FR"]), "loosen"),
    ("group member removed", GROUP, entry(countries=["GB", "FR"]), entry(countries=["GB"]), "loosen"),
    ("group delete", GROUP, entry(countries=["GB"]), None, "loosen"),
    # Licences: granting or extending loosens; revoking or shortening tightens.
    ("licence grant", LICENCE, None, licence(), "loosen"),
    ("licence revoke", LICENCE, licence(), None, "tighten"),
    ("licence extended", LICENCE, licence(SOONER), licence(LATER), "loosen"),
    ("licence shortened", LICENCE, licence(LATER), licence(SOONER), "tighten"),
    ("licence reason only", LICENCE, licence(), licence(reason="new"), "tighten"),
    ("licence country added", LICENCE, licence(), licence(countries=["FR", "DE"]), "loosen"),
    ("licence country removed", LICENCE, licence(countries=["FR", "DE"]), licence(), "tighten"),
    ("licence model added", LICENCE, licence(), licence(models=["m1", "m2"]), "loosen"),
    ("licence model removed", LICENCE, licence(models=["m1", "m2"]), licence(), "tighten"),
    ("licence moved to another org", LICENCE, licence(), licence(org="other"), "loosen"),
    ("licence shadow grant", LICENCE, None, licence(enforce=False), "tighten"),
    ("licence shadow promoted", LICENCE, licence(enforce=False), licence(), "loosen"),
    # Timeline entries setting each field.
    (
        "timeline lift",
        MODEL,
        model(suspended=True),
        model(suspended=True, timeline=step(export_suspended=False)),
        "loosen",
    ),
    ("timeline suspend", MODEL, model(), model(timeline=step(export_suspended=True)), "tighten"),
    (
        "timeline widen",
        MODEL,
        model(allowed=US),
        model(allowed=US, timeline=step(allowed_countries=["US", "GB"])),
        "loosen",
    ),
    (
        "timeline narrow",
        MODEL,
        model(allowed=USGB),
        model(allowed=USGB, timeline=step(allowed_countries=US)),
        "tighten",
    ),
    (
        "timeline any country",
        MODEL,
        model(allowed=US),
        model(allowed=US, timeline=step(allowed_countries=None)),
        "loosen",
    ),
]


@pytest.mark.parametrize(("record", "before", "after", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_effect_of_one_write(record: str, before: Any, after: Any, expected: str) -> None:
    assert one(record, before, after) == expected


@pytest.mark.parametrize(
    ("unknown_model", "before", "after", "expected"),
    [
        # Deleting a registered model makes it unknown: open under "allow", closed under "deny".
        ("allow", model("internal"), None, "loosen"),
        ("deny", model("general"), None, "tighten"),
        # Registering one: under "deny" it becomes usable at all; under "allow" it gains rules.
        ("deny", None, model("internal"), "loosen"),
        ("allow", None, model("general"), "tighten"),
    ],
)
def test_model_entering_or_leaving_the_registry_follows_unknown_model(
    unknown_model: str, before: Any, after: Any, expected: str
) -> None:
    assert one(MODEL, before, after, unknown_model) == expected


def test_a_write_loosens_if_any_part_does() -> None:
    # A key revocation is two records (the key goes, its revocation stays): both tighten.
    before = {"apikeys#k": {"hash": "h"}, "revoked#k": None}
    after = {"apikeys#k": None, "revoked#k": {"hash": "h"}}
    assert classify_change(before, after, unknown_model="deny") == "tighten"
    before |= {PARTNER: None}
    after |= {PARTNER: entry()}
    assert classify_change(before, after, unknown_model="deny") == "loosen"


def test_a_policy_import_always_loosens() -> None:
    assert classify_change({}, {}, unknown_model="deny", policy_import=True) == "loosen"
    assert classify_change({DENY[0]: None}, {DENY[0]: entry()}, unknown_model="deny", policy_import=True) == "loosen"


def test_record_names_are_the_store_keys_without_prefix() -> None:
    # The change history names what it touched by the Redis key less its prefix; effect.py spells
    # those names itself (the policy package does not import storage), so they are checked here.
    strip = keys.PREFIX
    assert keys.list_key("partners").removeprefix(strip) == effect.LIST_RECORD_PREFIX + "partners"
    assert keys.MODELS_KEY.removeprefix(strip) == effect.MODELS_RECORD
    assert keys.APIKEYS_KEY.removeprefix(strip) == effect.APIKEYS_RECORD
    assert keys.REVOKED_KEY.removeprefix(strip) == effect.REVOKED_RECORD
    assert keys.SCREENING_KEY.removeprefix(strip) == effect.SCREENING_RECORD
