"""Snapshots built from stored data: lazily parsed deny lists behave as parsed ones, and fail closed."""

from __future__ import annotations

import orjson

from gateway.policy.decide import Rules, decide
from gateway.policy.model import Caller
from gateway.policy.wire import build_snapshot
from gateway.settings import parse_settings

RULES = Rules.from_settings(parse_settings({"upstream": {"url": "http://up"}}, environ={}))
MODELS = {"m": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}}


def entry(**extra: object) -> bytes:
    return orjson.dumps(
        {"reason": "r", "source": "s", "added_by": "a", "added_at": "2026-01-01T00:00:00Z", "expires_at": None, **extra}
    )


def snapshot(deny_entities: dict[str, bytes], deny_countries: dict[str, bytes] | None = None):  # type: ignore[no-untyped-def]
    return build_snapshot(
        version=3,
        generation="g",
        loaded_at=0.0,
        models=MODELS,
        api_keys={},
        lists={"deny-entities": deny_entities, "deny-countries": deny_countries or {}, "partners": {}, "ip-ranges": {}},
    )


def caller(subject: str, country: str = "US") -> Caller:
    return Caller(subject=subject, org="org", org_name=None, tier="public", claimed_country=country, ip="10.0.0.1")


def test_raw_deny_entries_apply_like_parsed_ones() -> None:
    snap = snapshot({"mallory": entry(), "later": entry(expires_at="2030-01-01T00:00:00Z")}, {"IR": entry()})
    assert decide(snap, caller("mallory"), "m", 1.0e9, RULES).code == "entity_denied"
    assert decide(snap, caller("alice"), "m", 1.0e9, RULES).allowed
    assert decide(snap, caller("alice", "IR"), "m", 1.0e9, RULES).code == "country_denied"
    # An entry stops applying at its expires_at, parsed lazily or not.
    assert decide(snap, caller("later"), "m", 1.0e9, RULES).code == "entity_denied"
    assert decide(snap, caller("later"), "m", 1.95e9, RULES).allowed
    deny = snap.lists["deny-entities"]
    assert len(deny) == 2 and set(deny) == {"mallory", "later"} and "mallory" in deny
    assert deny["later"].expires_at == "2030-01-01T00:00:00Z"


def test_an_unreadable_stored_deny_entry_still_denies() -> None:
    snap = snapshot({"broken": b"{not json", "odd": b"[1, 2]", "bad-time": entry(expires_at="soon")})
    for subject in ("broken", "odd", "bad-time"):
        decision = decide(snap, caller(subject), "m", 1.0e9, RULES)
        assert decision.code == "entity_denied", subject


def test_deny_lists_keep_the_stored_byte_keys_and_still_match_text() -> None:
    # The store hands deny lists over as Redis returned them (bytes keys); decisions look up text.
    snap = snapshot({b"mallory": entry(), "Ωmega Trading".encode(): entry()}, {b"IR": entry()})
    assert decide(snap, caller("mallory"), "m", 1.0e9, RULES).code == "entity_denied"
    assert decide(snap, caller("Ωmega Trading"), "m", 1.0e9, RULES).code == "entity_denied"
    assert decide(snap, caller("alice", "IR"), "m", 1.0e9, RULES).code == "country_denied"
    assert decide(snap, caller("alice"), "m", 1.0e9, RULES).allowed
    deny = snap.lists["deny-entities"]
    assert set(deny) == {"mallory", "Ωmega Trading"} and "Ωmega Trading" in deny and b"mallory" not in deny
    assert deny.get("nobody") is None and deny["mallory"].reason == "r"
