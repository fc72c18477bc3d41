"""decide(): docs/contract.md §4 rows 2-8, 3a and 10, their order, and time moving under a fixed snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.policy.decide import Rules, clip, decide, path_model
from gateway.policy.model import Caller, Decision, Model, Snapshot
from gateway.policy.validate import format_instant
from gateway.policy.wire import build_snapshot
from gateway.settings import Settings

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
VERSION = 42

STATUS = {
    "": 200,
    "entity_denied": 451,
    "country_denied": 451,
    "model_unknown": 403,
    "export_suspended": 451,
    "export_restricted": 451,
    "not_released": 403,
    "partner_required": 403,
    "policy_stale": 503,
    "model_required": 400,
    "ambiguous_request": 400,
}

TIERS = {
    "public": frozenset({"general"}),
    "partner": frozenset({"partners", "general"}),
    "internal": frozenset({"internal", "partners", "general"}),
}


def rules(*, unknown_model: str = "deny", require_ip_country: bool = False) -> Rules:
    return Rules(
        home_countries=frozenset({"US"}),
        unknown_model=unknown_model,
        tier_stages=TIERS,
        require_ip_country=require_ip_country,
    )


def entry(reason: str = "test entry", *, expires_at: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "reason": reason,
        "source": "test",
        "added_by": "tester",
        "added_at": "2026-01-01T00:00:00Z",
        "expires_at": expires_at,
        **extra,
    }


def model(
    stage: str = "general",
    *,
    timeline: list[dict[str, str]] | None = None,
    allowed: list[str] | None = None,
    suspended: bool = False,
) -> dict[str, Any]:
    return {"stage": stage, "timeline": timeline or [], "allowed_countries": allowed, "export_suspended": suspended}


BASE_LISTS: dict[str, dict[str, dict[str, Any]]] = {
    "deny-countries": {"KP": entry("embargo"), "CU": entry("embargo"), "UA-43": entry("Crimea")},
    "deny-entities": {"bad-user": entry("denied person"), "bad-org": entry("entity list")},
    "partners": {"acme": entry("early access")},
    "ip-ranges": {},
}

BASE_MODELS: dict[str, dict[str, Any]] = {
    "open": model(),
    "controlled": model(allowed=["US", "GB", "UA"]),
    "suspended": model(suspended=True),
    "suspended-controlled": model(allowed=["US", "GB"], suspended=True),
    "preview": model("partners", allowed=["US", "GB"]),
    "lab": model("internal"),
}


@dataclass(frozen=True)
class Hit:
    blocked: bool
    score: float
    name: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score, "blocked": self.blocked}


@dataclass
class ExactScreening:
    """A screening index that matches whole names exactly: enough to drive row 2."""

    hits: dict[str, Hit] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def match(self, name: str) -> Hit | None:
        self.asked.append(name)
        return self.hits.get(name)


def snapshot(
    *,
    lists: dict[str, dict[str, dict[str, Any]]] | None = None,
    models: dict[str, dict[str, Any]] | None = None,
    screening: ExactScreening | None = None,
) -> Snapshot:
    return build_snapshot(
        version=VERSION,
        generation="g1",
        loaded_at=NOW,
        lists=BASE_LISTS if lists is None else lists,
        models=BASE_MODELS if models is None else models,
        api_keys={},
        screening=screening,
    )


def caller(**overrides: Any) -> Caller:
    fields: dict[str, Any] = {
        "subject": "alice",
        "org": "acme",
        "org_name": None,
        "tier": "public",
        "claimed_country": "US",
        "ip": "192.0.2.10",
        "ip_country": "US",
    }
    fields.update(overrides)
    return Caller(**fields)


SNAP = snapshot()


def assert_decision(decision: Decision, code: str) -> None:
    assert decision.code == code, decision.message
    assert decision.allowed is (code == "")
    assert decision.status == STATUS[code]
    assert decision.policy_version == VERSION


# --------------------------------------------------------------------------- the table

TABLE: list[tuple[str, dict[str, Any], str | None, str]] = [
    # (case, caller fields, model, expected code)
    ("plain allowed", {}, "open", ""),
    ("row 2: denied subject", {"subject": "bad-user"}, "open", "entity_denied"),
    ("row 2: denied org", {"org": "bad-org"}, "open", "entity_denied"),
    ("row 2: org id is not matched as a subject", {"subject": "acme", "org": None}, "open", ""),
    ("row 3: claim in denied country", {"claimed_country": "KP", "ip_country": None}, "open", "country_denied"),
    ("row 3: IP in denied country", {"ip_country": "CU"}, "open", "country_denied"),
    ("row 3: claim is a denied subdivision", {"claimed_country": "UA-43"}, "open", "country_denied"),
    ("row 3: IP subdivision denied", {"ip_country": "UA", "ip_subdivision": "UA-43"}, "open", "country_denied"),
    ("row 3: other subdivision of UA passes", {"claimed_country": "UA-14", "ip_country": None}, "open", ""),
    ("row 4: unknown model", {}, "no-such-model", "model_unknown"),
    ("row 5: suspended, foreign claim", {"claimed_country": "GB"}, "suspended", "export_suspended"),
    ("row 5: suspended, home claim and IP", {}, "suspended", ""),
    ("row 5: suspended, home subdivision", {"claimed_country": "US-CA", "ip_country": None}, "suspended", ""),
    ("row 5: suspended, no claim", {"claimed_country": None}, "suspended", "export_suspended"),
    ("row 5: suspended, home claim but foreign IP", {"ip_country": "GB"}, "suspended", "export_suspended"),
    ("row 5: suspended, IP unknown, not required", {"ip_country": None}, "suspended", ""),
    ("row 6: claim outside allowed", {"claimed_country": "FR", "ip_country": None}, "controlled", "export_restricted"),
    ("row 6: claim inside allowed", {"claimed_country": "GB", "ip_country": "GB"}, "controlled", ""),
    ("row 6: subdivision inside via its country", {"claimed_country": "UA-14", "ip_country": "UA"}, "controlled", ""),
    ("row 6: no claim", {"claimed_country": None}, "controlled", "export_restricted"),
    ("row 6: claim US, IP RU: stricter wins", {"ip_country": "RU"}, "controlled", "export_restricted"),
    ("row 6: claim RU, IP US: stricter wins", {"claimed_country": "RU"}, "controlled", "export_restricted"),
    ("row 7: partners stage, public tier", {}, "preview", "not_released"),
    ("row 7: internal stage, partner tier", {"tier": "partner"}, "lab", "not_released"),
    ("row 7: tier the config does not know", {"tier": "gold"}, "open", "not_released"),
    ("row 7: internal stage, internal tier", {"tier": "internal"}, "lab", ""),
    ("row 8: partner tier, partner org", {"tier": "partner"}, "preview", ""),
    ("row 8: partner tier, other org", {"tier": "partner", "org": "globex"}, "preview", "partner_required"),
    ("row 8: partner tier, no org", {"tier": "partner", "org": None}, "preview", "partner_required"),
    ("row 8: internal tier is exempt", {"tier": "internal", "org": "globex"}, "preview", ""),
    ("no model: allowed without a claim", {"claimed_country": None, "ip_country": None}, None, ""),
    ("no model: allowed from anywhere not denied", {"claimed_country": "FR", "ip_country": "RU"}, None, ""),
    ("no model: row 2 applies", {"subject": "bad-user"}, None, "entity_denied"),
    ("no model: row 3 applies", {"ip_country": "KP"}, None, "country_denied"),
    ("no model: unknown tier is fine", {"tier": "gold"}, None, ""),
]


@pytest.mark.parametrize(("fields", "model_name", "code"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_decision_table(fields: dict[str, Any], model_name: str | None, code: str) -> None:
    assert_decision(decide(SNAP, caller(**fields), model_name, NOW, rules()), code)


# --------------------------------------------------------------------------- order: first row wins

ORDER: list[tuple[str, dict[str, Any], str | None, str]] = [
    ("entity beats country", {"subject": "bad-user", "claimed_country": "KP"}, "open", "entity_denied"),
    ("entity (org) beats country", {"org": "bad-org", "ip_country": "CU"}, "open", "entity_denied"),
    ("country beats unknown model", {"claimed_country": "KP"}, "no-such-model", "country_denied"),
    ("suspended beats restricted", {"claimed_country": "FR"}, "suspended-controlled", "export_suspended"),
    ("restricted beats not released", {"claimed_country": "FR"}, "preview", "export_restricted"),
    ("not released beats partner required", {"org": "globex"}, "preview", "not_released"),
]


@pytest.mark.parametrize(("fields", "model_name", "code"), [row[1:] for row in ORDER], ids=[row[0] for row in ORDER])
def test_first_matching_row_wins(fields: dict[str, Any], model_name: str | None, code: str) -> None:
    assert_decision(decide(SNAP, caller(**fields), model_name, NOW, rules()), code)


@pytest.mark.parametrize("fields", [{}, {"subject": "bad-user"}, {"claimed_country": "KP"}])
def test_stale_policy_beats_everything(fields: dict[str, Any]) -> None:
    decision = decide(SNAP, caller(**fields), "open", NOW, rules(), stale=True)
    assert (decision.allowed, decision.status, decision.code) == (False, 503, "policy_stale")
    assert decision.policy_version == VERSION
    assert f"version {VERSION}" in decision.message


def test_no_snapshot_is_stale_with_version_zero() -> None:
    decision = decide(None, caller(), "open", NOW, rules())
    assert (decision.allowed, decision.status, decision.code, decision.policy_version) == (
        False,
        503,
        "policy_stale",
        0,
    )
    assert "(policy_stale)" in decision.message


# --------------------------------------------------------------------------- row 3a: a model is required

ROW_3A: list[tuple[str, dict[str, Any], str, str, str | None, str]] = [
    # (case, caller fields, method, path, model, expected code)
    ("POST without a model", {}, "POST", "/v1/chat/completions", None, "model_required"),
    ("GET without a model", {}, "GET", "/v1/chat/completions", None, "model_required"),
    ("PUT to the list path", {}, "PUT", "/v1/models", None, "model_required"),
    ("DELETE a model by path", {}, "DELETE", "/v1/models/open", None, "model_required"),
    ("GET the list", {}, "GET", "/v1/models", None, ""),
    ("HEAD the list", {}, "HEAD", "/v1/models", None, ""),
    ("GET the list, no country claim", {"claimed_country": None, "ip_country": None}, "GET", "/v1/models", None, ""),
    ("trailing slash is not the list", {}, "GET", "/v1/models/", None, "model_required"),
    ("letter case is not the list", {}, "GET", "/V1/models", None, "model_required"),
    ("encoded list path is not the list", {}, "GET", "/v1/%6Dodels", None, "model_required"),
    ("row 1-3 first: denied subject", {"subject": "bad-user"}, "POST", "/v1/chat/completions", None, "entity_denied"),
    (
        "row 1-3 first: denied country",
        {"claimed_country": "KP"},
        "POST",
        "/v1/chat/completions",
        None,
        "country_denied",
    ),
    ("denied country on the list path", {"ip_country": "CU"}, "GET", "/v1/models", None, "country_denied"),
    (
        "body model: rows 4-8 as before",
        {"claimed_country": "FR"},
        "POST",
        "/v1/chat/completions",
        "controlled",
        "export_restricted",
    ),
    (
        "GET one model: decided as that model",
        {"claimed_country": "FR"},
        "GET",
        "/v1/models/controlled",
        None,
        "export_restricted",
    ),
    ("GET one model: allowed one", {}, "GET", "/v1/models/open", None, ""),
    ("GET one model: staged one", {}, "GET", "/v1/models/preview", None, "not_released"),
    ("GET one model: unknown one", {}, "GET", "/v1/models/no-such-model", None, "model_unknown"),
    ("GET one model: deeper paths name none", {}, "GET", "/v1/models/open/infer", None, "model_required"),
    ("GET one model: same body model", {}, "GET", "/v1/models/open", "open", ""),
    ("GET one model: another body model", {}, "GET", "/v1/models/controlled", "open", "ambiguous_request"),
    ("GET one model: encoded name", {}, "GET", "/v1/models/contr%6Flled", None, "ambiguous_request"),
    ("GET one model: dot segment", {}, "GET", "/v1/models/..", None, "ambiguous_request"),
    ("GET one model: dot segments deeper", {}, "GET", "/v1/models/open/../controlled", None, "model_required"),
    ("GET one model: backslash", {}, "GET", "/v1/models/open\\..\\controlled", None, "ambiguous_request"),
    ("GET one model: parameter", {}, "GET", "/v1/models/open;x=1", None, "ambiguous_request"),
]


@pytest.mark.parametrize(
    ("fields", "method", "path", "model_name", "code"), [row[1:] for row in ROW_3A], ids=[row[0] for row in ROW_3A]
)
def test_row_3a(fields: dict[str, Any], method: str, path: str, model_name: str | None, code: str) -> None:
    decision = decide(SNAP, caller(**fields), model_name, NOW, rules(), method=method, path=path)
    assert_decision(decision, code)


def test_model_required_message_says_what_to_send() -> None:
    decision = decide(SNAP, caller(), None, NOW, rules(), method="POST", path="/v1/chat/completions")
    assert decision.message.endswith("(model_required).") and "'model'" in decision.message
    assert "/v1/models" in decision.message


def test_modelless_paths_come_from_the_rules() -> None:
    custom = Rules(
        home_countries=frozenset({"US"}),
        unknown_model="deny",
        tier_stages=TIERS,
        modelless_paths=frozenset({"/health", "/v1/models"}),
    )
    assert decide(SNAP, caller(), None, NOW, custom, method="GET", path="/health").allowed
    assert decide(SNAP, caller(), None, NOW, rules(), method="GET", path="/health").code == "model_required"
    assert decide(SNAP, caller(), None, NOW, custom, method="POST", path="/health").code == "model_required"
    assert path_model("GET", "/v1/models/open", custom) == "open"
    assert path_model("POST", "/v1/models/open", custom) is None
    assert path_model("GET", "/v1/models", custom) is None


def test_stale_beats_row_3a() -> None:
    decision = decide(SNAP, caller(), None, NOW, rules(), stale=True, method="POST", path="/v1/x")
    assert decision.code == "policy_stale"


def test_modelless_allowed_path_is_the_prebuilt_decision() -> None:
    assert decide(SNAP, caller(), None, NOW, rules(), method="GET", path="/v1/models") is SNAP.allow


# --------------------------------------------------------------------------- echoed caller input is bounded

LONG = "m" * 300 + "é" * 200  # 700 UTF-8 bytes


@pytest.mark.parametrize(
    ("fields", "model_name", "path"),
    [
        ({}, LONG, None),  # model_unknown
        ({"claimed_country": "FR"}, "controlled", None),  # a short name passes whole
        ({"subject": "bad-user"}, LONG, None),
        ({"tier": "partner", "org": "o" * 400}, "preview", None),
        ({"tier": "t" * 400}, "open", None),
        ({}, LONG, "/v1/models/" + "x" * 300),
    ],
)
def test_messages_echo_at_most_256_bytes_of_any_caller_value(
    fields: dict[str, Any], model_name: str, path: str | None
) -> None:
    method = "GET" if path else "POST"
    decision = decide(SNAP, caller(**fields), model_name, NOW, rules(), method=method, path=path)
    assert not decision.allowed
    message = decision.message.encode()
    for value in (model_name, *(v for v in fields.values() if isinstance(v, str)), (path or "")[11:]):
        if len(value.encode()) > 256:
            assert value.encode()[:257] not in message
            assert value.encode()[:200] in message or value[:60].encode() in message
    assert len(message) < 1024


def test_clip_cuts_whole_characters_to_a_byte_limit() -> None:
    assert clip("short") == "short"
    assert clip("a" * 300) == "a" * 256
    cut = clip("é" * 200)
    assert cut == "é" * 128 and len(cut.encode()) == 256
    assert len(clip("a" + "€" * 100).encode()) <= 256


# --------------------------------------------------------------------------- the allowed path


def test_allowed_decision_is_the_snapshots_prebuilt_one() -> None:
    # The per-request allowed path allocates no Decision of its own.
    first = decide(SNAP, caller(), "open", NOW, rules())
    second = decide(SNAP, caller(subject="bob"), None, NOW + 5, rules())
    assert first is SNAP.allow and second is SNAP.allow
    assert first == Decision(True, 200, "", first.message, VERSION, None)


def test_decision_to_dict_is_the_admin_decide_shape() -> None:
    blocked = decide(SNAP, caller(claimed_country="KP"), "open", NOW, rules()).to_dict()
    assert blocked == {
        "decision": "block",
        "status": 451,
        "code": "country_denied",
        "message": blocked["message"],
        "policy_version": VERSION,
        "screening": None,
    }
    assert decide(SNAP, caller(), "open", NOW, rules()).to_dict()["decision"] == "allow"


# --------------------------------------------------------------------------- messages


def test_restricted_message_names_model_country_and_rule() -> None:
    decision = decide(SNAP, caller(claimed_country="RU", ip_country=None), "controlled", NOW, rules())
    assert decision.message == (
        "Access to model 'controlled' from country RU is not permitted: "
        "RU is outside the model's allowed countries (export_restricted)."
    )


def test_disagreeing_signals_name_the_failing_one() -> None:
    decision = decide(SNAP, caller(claimed_country="US", ip_country="RU"), "controlled", NOW, rules())
    assert "from country RU" in decision.message


def test_country_denied_message_prefers_the_subdivision() -> None:
    decision = decide(SNAP, caller(claimed_country="UA-43", ip_country=None), "open", NOW, rules())
    assert "from region UA-43" in decision.message and "(country_denied)" in decision.message


@pytest.mark.parametrize(
    ("fields", "model_name", "fragments"),
    [
        ({"subject": "bad-user"}, "open", ["'open'", "'bad-user'", "(entity_denied)"]),
        ({"org": "bad-org"}, None, ["organisation 'bad-org'", "(entity_denied)"]),
        ({"claimed_country": "GB"}, "suspended", ["'suspended'", "country GB", "US", "(export_suspended)"]),
        ({"claimed_country": None}, "suspended", ["unknown (no country claim)", "(export_suspended)"]),
        ({}, "no-such-model", ["'no-such-model'", "(model_unknown)"]),
        ({}, "preview", ["'preview'", "'public' tier", "'partners'", "(not_released)"]),
        ({"tier": "partner", "org": "globex"}, "preview", ["'preview'", "'globex'", "(partner_required)"]),
    ],
)
def test_messages_are_sentences_naming_what_applied(
    fields: dict[str, Any], model_name: str | None, fragments: list[str]
) -> None:
    message = decide(SNAP, caller(**fields), model_name, NOW, rules()).message
    assert message.endswith(".")
    for fragment in fragments:
        assert fragment in message


# --------------------------------------------------------------------------- timelines

T1 = NOW + 100  # internal -> partners
T2 = NOW + 200  # partners -> general
STAGED = snapshot(
    models={
        "staged": model(
            "internal",
            timeline=[
                {"at": format_instant(T2), "stage": "general"},  # out of order on purpose: stored sorted
                {"at": format_instant(T1), "stage": "partners"},
            ],
        )
    }
)


@pytest.mark.parametrize(
    ("now", "stage"),
    [
        (NOW, "internal"),
        (T1 - 0.001, "internal"),
        (T1, "partners"),
        (T2 - 0.001, "partners"),
        (T2, "general"),
        (T2 + 86_400 * 365, "general"),
    ],
)
def test_current_stage_follows_the_timeline(now: float, stage: str) -> None:
    assert STAGED.models["staged"].current_stage(now) == stage


@pytest.mark.parametrize(
    ("now", "tier", "org", "code"),
    [
        (NOW, "public", "acme", "not_released"),
        (NOW, "partner", "acme", "not_released"),
        (NOW, "internal", "acme", ""),
        (T1, "public", "acme", "not_released"),
        (T1, "partner", "acme", ""),
        (T1, "partner", "globex", "partner_required"),
        (T2 - 0.001, "public", "acme", "not_released"),
        (T2, "public", "acme", ""),
        (T2, "partner", "globex", ""),
    ],
)
def test_decisions_move_with_the_timeline(now: float, tier: str, org: str, code: str) -> None:
    decision = decide(STAGED, caller(tier=tier, org=org), "staged", now, rules())
    assert decision.code == code, decision.message


def test_model_without_timeline_keeps_its_stage() -> None:
    assert Model(name="m", stage="partners").current_stage(NOW) == "partners"


# --------------------------------------------------------------------------- expiry

EXPIRES = NOW + 60


def expiring_snapshot() -> Snapshot:
    lists = {
        "deny-entities": {"temp-user": entry(expires_at=format_instant(EXPIRES))},
        "deny-countries": {"RU": entry(expires_at=format_instant(EXPIRES))},
        "partners": {"acme": entry(expires_at=format_instant(EXPIRES))},
    }
    return snapshot(lists=lists)


@pytest.mark.parametrize(
    ("fields", "model_name", "code"),
    [
        ({"subject": "temp-user"}, "open", "entity_denied"),
        ({"claimed_country": "RU"}, "open", "country_denied"),
        ({"tier": "partner"}, "preview", ""),
    ],
)
def test_entries_apply_until_expires_at_and_not_from_it(fields: dict[str, Any], model_name: str, code: str) -> None:
    snap = expiring_snapshot()
    assert decide(snap, caller(**fields), model_name, NOW, rules()).code == code
    assert decide(snap, caller(**fields), model_name, EXPIRES - 0.001, rules()).code == code
    after = decide(snap, caller(**fields), model_name, EXPIRES, rules()).code
    # A deny entry stops blocking; a partner entry stops admitting.
    assert after == ("partner_required" if code == "" else "")


# --------------------------------------------------------------------------- subdivisions


def test_claim_in_subdivision_is_denied_by_its_country() -> None:
    snap = snapshot(lists={"deny-countries": {"UA": entry()}})
    decision = decide(snap, caller(claimed_country="UA-43", ip_country=None), "open", NOW, rules())
    assert decision.code == "country_denied"
    assert "from country UA" in decision.message


def test_subdivision_entry_does_not_deny_the_whole_country() -> None:
    decision = decide(SNAP, caller(claimed_country="UA", ip_country="UA"), "open", NOW, rules())
    assert decision.allowed


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"claimed_country": "UA-43", "ip_country": None}, ""),
        ({"claimed_country": "UA-43", "ip_country": "UA", "ip_subdivision": "UA-43"}, ""),
        ({"claimed_country": "UA", "ip_country": None}, "export_restricted"),
        ({"claimed_country": "UA-43", "ip_country": "UA"}, "export_restricted"),
        ({"claimed_country": "UA-14", "ip_country": None}, "export_restricted"),
    ],
)
def test_allowed_subdivision_admits_only_that_region(fields: dict[str, Any], code: str) -> None:
    snap = snapshot(lists={}, models={"regional": model(allowed=["UA-43"])})
    assert decide(snap, caller(**fields), "regional", NOW, rules()).code == code


# --------------------------------------------------------------------------- unknown countries


@pytest.mark.parametrize("model_name", ["controlled", "suspended"])
def test_require_ip_country_makes_an_unplaced_ip_fail_country_rules(model_name: str) -> None:
    who = caller(claimed_country="US", ip_country=None)
    assert decide(SNAP, who, model_name, NOW, rules()).allowed
    strict = decide(SNAP, who, model_name, NOW, rules(require_ip_country=True))
    assert strict.code in ("export_restricted", "export_suspended")
    assert "no country known for the client IP" in strict.message


def test_require_ip_country_leaves_unrestricted_models_alone() -> None:
    who = caller(claimed_country="US", ip_country=None)
    assert decide(SNAP, who, "open", NOW, rules(require_ip_country=True)).allowed
    assert decide(SNAP, who, None, NOW, rules(require_ip_country=True)).allowed


def test_missing_claim_fails_restricted_even_with_a_good_ip() -> None:
    decision = decide(SNAP, caller(claimed_country=None, ip_country="US"), "controlled", NOW, rules())
    assert decision.code == "export_restricted"
    assert "no country claim" in decision.message


def test_missing_claim_is_fine_for_unrestricted_models() -> None:
    assert decide(SNAP, caller(claimed_country=None, ip_country=None), "open", NOW, rules()).allowed


def test_empty_allowed_countries_admits_nobody() -> None:
    snap = snapshot(models={"nowhere": model(allowed=[])})
    assert decide(snap, caller(), "nowhere", NOW, rules()).code == "export_restricted"


# --------------------------------------------------------------------------- unknown_model


def test_unknown_model_allowed_when_configured() -> None:
    allow_unknown = rules(unknown_model="allow")
    assert decide(SNAP, caller(), "no-such-model", NOW, allow_unknown) is SNAP.allow
    # Rows 2 and 3 still apply to an unregistered model.
    from_kp = decide(SNAP, caller(claimed_country="KP"), "no-such-model", NOW, allow_unknown)
    assert from_kp.code == "country_denied"
    assert decide(SNAP, caller(org="bad-org"), "no-such-model", NOW, allow_unknown).code == "entity_denied"


@pytest.mark.parametrize("unknown", ["allow", "deny"])
@pytest.mark.parametrize("spelling", ["CONTROLLED", "Controlled", " controlled", "controlled\u3000", "\uff43ontrolled"])
def test_another_spelling_of_a_registered_model_is_ambiguous_not_unknown(unknown: str, spelling: str) -> None:
    # A lenient model server may serve "controlled" for any of these; with unknown_model: allow they
    # would otherwise pass as unregistered models, past the country set.
    decision = decide(SNAP, caller(claimed_country="CN"), spelling, NOW, rules(unknown_model=unknown))
    assert (decision.status, decision.code) == (400, "ambiguous_request")
    assert "registered name exactly" in decision.message
    # The registered spelling itself is decided by its own rows.
    assert decide(SNAP, caller(claimed_country="CN"), "controlled", NOW, rules()).code == "export_restricted"


# --------------------------------------------------------------------------- screening


def screened(*hits: Hit) -> Snapshot:
    return snapshot(screening=ExactScreening({hit.name: hit for hit in hits}))


def test_org_name_screened_as_blocked_is_entity_denied() -> None:
    hit = Hit(blocked=True, score=0.97, name="Rosoboronexport")
    decision = decide(screened(hit), caller(org_name="Rosoboronexport"), "open", NOW, rules())
    assert_decision(decision, "entity_denied")
    assert decision.screening == {**hit.to_dict(), "screened": "org_name"}
    # The message names the rule only: neither the listed name nor the score, which would let a denied
    # party tune its name until it scores below the threshold. The audit record keeps both (screening).
    assert decision.message == (
        "Access to model 'open' is not permitted: the caller's organisation matches "
        "the denied-party screening list (entity_denied)."
    )
    assert "Rosoboronexport" not in decision.message and "0.97" not in decision.message


def test_org_is_screened_when_there_is_no_org_name() -> None:
    # A token whose org claim is the organisation's name, with no org_name: screened all the same.
    hit = Hit(blocked=True, score=1.0, name="Quillfeather Trading LLC")
    decision = decide(screened(hit), caller(org="Quillfeather Trading LLC", org_name=None), "open", NOW, rules())
    assert_decision(decision, "entity_denied")
    assert decision.screening == {**hit.to_dict(), "screened": "org"}
    assert "Quillfeather" not in decision.message


def test_org_block_wins_over_an_org_name_review_hit() -> None:
    review = Hit(blocked=False, score=0.86, name="Acme Trading")
    block = Hit(blocked=True, score=0.95, name="qf-llc")
    decision = decide(screened(review, block), caller(org="qf-llc", org_name="Acme Trading"), "open", NOW, rules())
    assert decision.code == "entity_denied"
    assert decision.screening == {**block.to_dict(), "screened": "org"}


def test_same_org_and_org_name_is_screened_once() -> None:
    index = ExactScreening()
    snap = snapshot(screening=index)
    assert decide(snap, caller(org="Acme Corp", org_name="Acme Corp"), "open", NOW, rules()) is snap.allow
    assert index.asked == ["Acme Corp"]


def test_review_band_hit_is_allowed_and_carried() -> None:
    hit = Hit(blocked=False, score=0.86, name="Acme Trading")
    decision = decide(screened(hit), caller(org_name="Acme Trading"), "open", NOW, rules())
    assert decision.allowed and decision.status == 200
    assert decision.screening == {**hit.to_dict(), "screened": "org_name"}


def test_review_band_hit_is_carried_into_a_later_block() -> None:
    hit = Hit(blocked=False, score=0.86, name="Acme Trading")
    who = caller(org_name="Acme Trading", claimed_country="KP")
    decision = decide(screened(hit), who, "open", NOW, rules())
    assert decision.code == "country_denied"
    assert decision.screening == {**hit.to_dict(), "screened": "org_name"}


def test_deny_entities_is_checked_before_screening() -> None:
    index = ExactScreening({"Bad Org Ltd": Hit(blocked=True, score=1.0, name="Bad Org Ltd")})
    decision = decide(snapshot(screening=index), caller(org="bad-org", org_name="Bad Org Ltd"), "open", NOW, rules())
    assert decision.code == "entity_denied" and decision.screening is None
    assert index.asked == []


def test_no_org_means_no_screening_and_no_hit() -> None:
    index = ExactScreening({"Acme": Hit(blocked=True, score=1.0, name="Acme")})
    snap = snapshot(screening=index)
    assert decide(snap, caller(org=None, org_name=None), "open", NOW, rules()) is snap.allow
    assert decide(snap, caller(org_name="Other Co"), "open", NOW, rules()) is snap.allow
    assert index.asked == ["Other Co", "acme"]


# --------------------------------------------------------------------------- rules from settings


def test_rules_from_settings() -> None:
    settings = Settings.model_validate(
        {
            "upstream": {"url": "http://127.0.0.1:8000"},
            "network": {"home_countries": ["US", "CA"], "require_ip_country": True},
            "policy": {"unknown_model": "allow"},
        }
    )
    built = Rules.from_settings(settings)
    assert built.home_countries == frozenset({"US", "CA"})
    assert built.unknown_model == "allow"
    assert built.require_ip_country is True
    assert dict(built.tier_stages) == TIERS
