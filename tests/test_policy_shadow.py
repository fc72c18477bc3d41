"""Shadow entries (``"enforce": false``) and model shadows: validation, the writes an operator makes, and
the enforced and shadow snapshots, whole and incremental (docs/contract.md §12, "Shadow entries")."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.policy.decide import Rules, decide
from gateway.policy.model import Caller, Snapshot
from gateway.policy.validate import (
    PolicyValidationError,
    model_warnings,
    model_write,
    validate_entry,
    validate_list,
    validate_model,
    validate_policy_document,
)
from gateway.policy.wire import LazyEntries, build_snapshot, policy_document
from gateway.settings import parse_settings

RULES = Rules.from_settings(parse_settings({"upstream": {"url": "http://up"}}, environ={}))
NOW = 1.9e9
ACTOR, NOW_ISO = "ops", "2026-01-01T00:00:00Z"
LIVE = {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}


def stored_entry(**extra: Any) -> dict[str, Any]:
    return {"reason": "r", "source": "s", "added_by": "a", "added_at": NOW_ISO, "expires_at": None, **extra}


def raw(**extra: Any) -> bytes:
    """An entry as Redis returns it (the store writes it with orjson)."""
    return orjson.dumps(stored_entry(**extra))


def caller(subject: str = "alice", country: str = "US", org: str = "org", tier: str = "public") -> Caller:
    return Caller(subject=subject, org=org, org_name=None, tier=tier, claimed_country=country, ip="10.0.0.1")


def build(
    lists: dict[str, dict[str, Any]] | None = None,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    reuse: Snapshot | None = None,
    deltas: dict[str, dict[Any, Any]] | None = None,
    unchanged: tuple[str, ...] = (),
    version: int = 1,
) -> Snapshot:
    return build_snapshot(
        version=version,
        generation="g",
        loaded_at=0.0,
        lists=lists or {},
        models={"m": LIVE} if models is None else models,
        api_keys={},
        reuse=reuse,
        unchanged=unchanged,
        deltas=deltas,
    )


def code(snapshot: Snapshot | None, who: Caller, model: str = "m") -> str:
    assert snapshot is not None
    return decide(snapshot, who, model, NOW, RULES).code


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("list_name", ["deny-countries", "deny-entities", "partners", "ip-ranges"])
def test_an_entry_may_be_a_shadow_and_only_false_is_stored(list_name: str) -> None:
    key = {"deny-countries": "IR", "ip-ranges": "203.0.113.0/24"}.get(list_name, "acme")
    body: dict[str, Any] = {"reason": "trial"} | ({"country": "IR"} if list_name == "ip-ranges" else {})
    shadow = validate_entry(list_name, key, body | {"enforce": False}, actor=ACTOR, now_iso=NOW_ISO)
    assert shadow["enforce"] is False
    live = validate_entry(list_name, key, body | {"enforce": True}, actor=ACTOR, now_iso=NOW_ISO)
    assert "enforce" not in live and live == validate_entry(list_name, key, body, actor=ACTOR, now_iso=NOW_ISO)


@pytest.mark.parametrize("value", ["false", 0, None, [], "no"])
def test_enforce_must_be_a_boolean_and_the_error_names_it(value: Any) -> None:
    with pytest.raises(PolicyValidationError) as caught:
        validate_entry("deny-countries", "IR", {"reason": "r", "enforce": value}, actor=ACTOR, now_iso=NOW_ISO)
    assert caught.value.field == "enforce"
    with pytest.raises(PolicyValidationError) as caught:
        validate_list("partners", {"acme": {"reason": "r", "enforce": value}}, actor=ACTOR, now_iso=NOW_ISO)
    assert caught.value.field == "entries.acme.enforce"
    with pytest.raises(PolicyValidationError) as caught:
        model_write("m", LIVE, {"stage": "general", "enforce": value}, patch=False)
    assert caught.value.field == "enforce"


def test_a_policy_document_carries_shadow_entries_and_model_shadows() -> None:
    doc = {
        "lists": {"deny-countries": {"IR": {"reason": "trial", "enforce": False}}},
        "models": {"m": LIVE | {"shadow": LIVE | {"export_suspended": True}}},
    }
    out = validate_policy_document(doc, actor=ACTOR, now_iso=NOW_ISO, tiers=("public",))
    assert out["lists"]["deny-countries"]["IR"]["enforce"] is False
    assert out["models"]["m"]["shadow"]["export_suspended"] is True
    with pytest.raises(PolicyValidationError) as caught:
        validate_policy_document(
            {"models": {"m": LIVE | {"shadow": {"stage": "nope"}}}}, actor=ACTOR, now_iso=NOW_ISO, tiers=("public",)
        )
    assert caught.value.field == "models.m.shadow.stage"
    with pytest.raises(PolicyValidationError) as caught:  # a shadow has no shadow of its own
        validate_model("m", LIVE | {"shadow": LIVE | {"shadow": LIVE}}, stored=True)
    assert caught.value.field == "shadow.shadow"
    with pytest.raises(PolicyValidationError) as caught:  # an operator's body sets a shadow through enforce
        validate_model("m", LIVE | {"shadow": LIVE})
    assert caught.value.field == "shadow"


# --------------------------------------------------------------------------- model writes

SUSPENDED = LIVE | {"export_suspended": True}


@pytest.mark.parametrize(
    ("case", "stored", "body", "patch", "expected"),
    [
        ("PUT shadow", LIVE, {"stage": "general", "export_suspended": True, "enforce": False}, False,
         LIVE | {"shadow": SUSPENDED}),
        ("PATCH shadow from live", LIVE, {"export_suspended": True, "enforce": False}, True,
         LIVE | {"shadow": SUSPENDED}),
        ("PATCH shadow merges into shadow", LIVE | {"shadow": SUSPENDED},
         {"allowed_countries": ["us"], "enforce": False}, True,
         LIVE | {"shadow": SUSPENDED | {"allowed_countries": ["US"]}}),
        ("PATCH enforce true promotes", LIVE | {"shadow": SUSPENDED}, {"enforce": True}, True, SUSPENDED),
        ("PATCH enforce true promotes with fields merged", LIVE | {"shadow": SUSPENDED},
         {"enforce": True, "stage": "partners"}, True, SUSPENDED | {"stage": "partners"}),
        ("PATCH enforce true without a shadow is a plain patch", LIVE, {"enforce": True, "stage": "internal"}, True,
         LIVE | {"stage": "internal"}),
        ("PATCH without enforce changes live, keeps shadow", LIVE | {"shadow": SUSPENDED}, {"stage": "partners"}, True,
         LIVE | {"stage": "partners", "shadow": SUSPENDED}),
        ("PATCH shadow null discards it", LIVE | {"shadow": SUSPENDED}, {"shadow": None}, True, LIVE),
        ("PUT replaces and drops the shadow", LIVE | {"shadow": SUSPENDED}, {"stage": "internal"}, False,
         LIVE | {"stage": "internal"}),
    ],
)  # fmt: skip
def test_model_writes(case: str, stored: Any, body: Any, patch: bool, expected: Any) -> None:
    assert model_write("m", stored, body, patch=patch) == expected, case


def test_a_shadow_write_keeps_the_live_model_and_a_new_model_cannot_be_shadow_only() -> None:
    written = model_write("m", SUSPENDED, {"export_suspended": False, "enforce": False}, patch=True)
    assert {k: v for k, v in written.items() if k != "shadow"} == SUSPENDED
    with pytest.raises(PolicyValidationError) as caught:
        model_write("new", None, {"stage": "general", "enforce": False}, patch=False)
    assert caught.value.field == "enforce" and "not in the registry" in caught.value.message
    for body in ({"shadow": LIVE}, {"shadow": None, "enforce": True}):
        with pytest.raises(PolicyValidationError) as caught:
            model_write("m", LIVE, body, patch=True)
        assert caught.value.field == "shadow"


def test_an_empty_shadow_country_set_is_warned_about() -> None:
    warnings = model_warnings("m", LIVE | {"shadow": LIVE | {"allowed_countries": []}})
    assert len(warnings) == 1 and "m (shadow)" in warnings[0]


# --------------------------------------------------------------------------- snapshots


def test_no_shadow_in_the_policy_means_no_shadow_snapshot() -> None:
    assert build({"deny-countries": {"IR": raw()}}).shadow is None


@pytest.mark.parametrize("list_name", ["deny-countries", "deny-entities"])
def test_a_shadow_deny_entry_blocks_only_in_the_shadow_snapshot(list_name: str) -> None:
    key, who = ("IR", caller(country="IR")) if list_name == "deny-countries" else ("mallory", caller("mallory"))
    code_denied = "country_denied" if list_name == "deny-countries" else "entity_denied"
    snap = build({list_name: {key: raw(enforce=False), "KP" if key == "IR" else "eve": raw()}})
    assert key not in snap.lists[list_name] and len(snap.lists[list_name]) == 1
    assert list(snap.lists[list_name]) == ["KP" if key == "IR" else "eve"]
    assert snap.lists[list_name].get(key) is None
    with pytest.raises(KeyError):
        snap.lists[list_name][key]
    assert code(snap, who) == ""
    assert snap.shadow is not None and key in snap.shadow.lists[list_name]
    assert code(snap.shadow, who) == code_denied
    assert snap.shadow.shadow is None
    # The enforced list's other entries still deny.
    other = caller(country="KP") if key == "IR" else caller("eve")
    assert code(snap, other) == code(snap.shadow, other) == code_denied


def test_shadow_partners_and_ip_ranges_apply_only_in_the_shadow_snapshot() -> None:
    lists = {
        "partners": {"acme": stored_entry(enforce=False)},
        "ip-ranges": {"203.0.113.0/24": stored_entry(country="IR", enforce=False)},
        "deny-countries": {"IR": raw()},
    }
    snap = build(lists, {"m": LIVE | {"stage": "partners"}})
    assert "acme" not in snap.lists["partners"] and snap.ip_ranges == {}
    assert snap.shadow is not None and snap.shadow.ip_ranges == {"203.0.113.0/24": "IR"}
    assert code(snap, caller(org="acme", tier="partner")) == "partner_required"
    assert code(snap.shadow, caller(org="acme", tier="partner")) == ""


def test_a_model_shadow_applies_only_in_the_shadow_snapshot() -> None:
    snap = build(models={"m": LIVE | {"shadow": SUSPENDED}, "other": LIVE})
    assert snap.models["m"].export_suspended is False and snap.models["m"].shadow is not None
    assert code(snap, caller(country="FR")) == ""
    assert snap.shadow is not None and snap.shadow.models["m"].export_suspended is True
    assert code(snap.shadow, caller(country="FR")) == "export_suspended"
    assert snap.shadow.models["other"] is snap.models["other"]
    assert policy_document(snap)["models"]["m"]["shadow"]["export_suspended"] is True


def test_the_policy_document_holds_shadow_entries_as_stored() -> None:
    snap = build({"deny-countries": {"IR": raw(enforce=False)}, "partners": {"acme": stored_entry(enforce=False)}})
    document = policy_document(snap)
    assert document["lists"]["deny-countries"]["IR"]["enforce"] is False
    assert document["lists"]["partners"]["acme"]["enforce"] is False


# Incremental reloads: a delta that adds, promotes, demotes or removes a shadow entry gives the right
# live AND shadow views, and equals the snapshot built whole from the same stored policy.

STEPS: list[tuple[str, str, str, Any]] = [
    # (case, list, key, stored value after the step: bytes for the lazy lists, None deleted)
    ("shadow deny added", "deny-countries", "IR", raw(enforce=False)),
    ("shadow deny promoted", "deny-countries", "IR", raw()),
    ("live deny made shadow", "deny-countries", "IR", raw(enforce=False)),
    ("shadow deny deleted", "deny-countries", "IR", None),
    ("shadow entity added", "deny-entities", "mallory", raw(enforce=False)),
    ("shadow partner added", "partners", "acme", stored_entry(enforce=False)),
    ("shadow partner promoted", "partners", "acme", stored_entry()),
    ("shadow ip-range added", "ip-ranges", "203.0.113.0/24", stored_entry(country="IR", enforce=False)),
    ("shadow ip-range promoted", "ip-ranges", "203.0.113.0/24", stored_entry(country="IR")),
    ("shadow entity deleted", "deny-entities", "mallory", None),
]


def views(snapshot: Snapshot) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """(enforced list keys, shadow-view list keys, shadow ip-ranges) of a snapshot."""
    whole = snapshot.shadow or snapshot
    return (
        {name: sorted(entries) for name, entries in snapshot.lists.items()},
        {name: sorted(entries) for name, entries in whole.lists.items()},
        dict(whole.ip_ranges),
    )


def test_entry_by_entry_deltas_keep_both_views_as_a_whole_build_would() -> None:
    stored: dict[str, dict[Any, Any]] = {
        "deny-countries": {b"KP": raw()},
        "deny-entities": {b"eve": raw()},
        "partners": {},
        "ip-ranges": {},
    }
    snap = build(stored)
    for version, (case, name, key, value) in enumerate(STEPS, start=2):
        raw_key: Any = key.encode() if name in ("deny-countries", "deny-entities") else key
        if value is None:
            stored[name].pop(raw_key, None)
        else:
            stored[name][raw_key] = value
        others = (*(n for n in stored if n != name), "models", "apikeys")
        snap = build(reuse=snap, deltas={name: {raw_key: value}}, unchanged=others, version=version)
        whole = build({n: dict(v) for n, v in stored.items()}, version=version)
        assert views(snap) == views(whole), case
        assert policy_document(snap) == policy_document(whole), case
        assert (snap.shadow is None) == (whole.shadow is None), case
    # After the last step no shadow is left: no shadow snapshot either.
    assert snap.shadow is None


def test_a_promoted_deny_entry_blocks_in_the_rebuilt_snapshot() -> None:
    snap = build({"deny-countries": {b"IR": raw(enforce=False)}})
    assert code(snap, caller(country="IR")) == ""
    promoted = build(reuse=snap, deltas={"deny-countries": {b"IR": raw()}}, version=2)
    assert code(promoted, caller(country="IR")) == "country_denied"
    assert promoted.shadow is None
    assert code(snap, caller(country="IR")) == ""  # the previous snapshot is left as it was


def test_unchanged_parts_keep_their_views_and_the_shadow_is_rebuilt_from_them() -> None:
    snap = build({"deny-countries": {b"IR": raw(enforce=False)}}, {"m": LIVE | {"shadow": SUSPENDED}})
    again = build(
        reuse=snap, unchanged=("deny-countries", "deny-entities", "partners", "ip-ranges", "models", "apikeys")
    )
    assert again.lists["deny-countries"] is snap.lists["deny-countries"]
    assert again.shadow is not None and snap.shadow is not None
    assert again.shadow.lists["deny-countries"] is snap.shadow.lists["deny-countries"]
    assert code(again, caller(country="IR")) == "" and code(again.shadow, caller(country="IR")) == "country_denied"
    assert code(again.shadow, caller(country="FR")) == "export_suspended"


def test_a_lazy_lists_get_answers_as_membership_and_lookup_do() -> None:
    """``get`` answers in one step what ``key in entries`` and ``entries[key]`` answer, for both views,
    keys stored as bytes or text, entries parsed already or not."""
    for stored in ({b"a": raw(), b"b": raw(enforce=False)}, {"a": raw(), "b": raw(enforce=False)}):
        for first in ("get", "index"):
            full = LazyEntries("deny-entities", stored)
            views = (full, full.enforced())
            for view in views:
                for key in ("a", "b", "c", "\udcff"):
                    if first == "index" and key in view:
                        view[key]  # parsed before get
                    expected = view[key] if key in view else None
                    assert view.get(key) is expected, (stored, first, view is full, key)
                    assert view.get(key, "absent") == (expected if key in view else "absent")
                assert view.get(b"a") is None  # type: ignore[arg-type]
            assert views[1].get("b") is None and views[0].get("b") is not None


def test_the_lazy_views_share_parsed_entries() -> None:
    full = LazyEntries("deny-entities", {b"a": raw(), b"b": raw(enforce=False)})
    enforced = full.enforced()
    assert full.shadow_count == 1 and len(full) == 2 and len(enforced) == 1
    assert enforced["a"] is full["a"]
    assert "b" in full and "b" not in enforced and full["b"].enforce is False
    assert LazyEntries("deny-entities", {b"a": raw()}).enforced().shadow_count == 0
