"""The model-list filter on its own: which entries stay, and which answers are no list at all."""

from __future__ import annotations

import orjson
import pytest

from gateway.model_list import filter_models, lists_models
from gateway.policy.decide import Rules, decide
from gateway.policy.model import Caller
from gateway.policy.wire import build_snapshot

NOW = 1_800_000_000.0
TIERS = {"public": frozenset({"general"}), "partner": frozenset({"partners", "general"})}
SNAP = build_snapshot(
    version=1,
    generation="g",
    loaded_at=NOW,
    lists={
        "deny-countries": {},
        "deny-entities": {},
        "ip-ranges": {},
        "partners": {"o": {"reason": "r", "source": "s", "added_by": "t", "added_at": "2026-01-01T00:00:00Z"}},
    },
    models={
        "open": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False},
        "us-only": {"stage": "general", "timeline": [], "allowed_countries": ["US"], "export_suspended": False},
        "lab": {"stage": "partners", "timeline": [], "allowed_countries": None, "export_suspended": False},
    },
    api_keys={},
)
LIST = orjson.dumps({"object": "list", "data": [{"id": m, "created": 1} for m in ("open", "us-only", "lab", "other")]})


def rules(unknown_model: str = "deny") -> Rules:
    return Rules(home_countries=frozenset({"US"}), unknown_model=unknown_model, tier_stages=TIERS)


def ids(body: bytes) -> list[str]:
    return [entry["id"] for entry in orjson.loads(body)["data"]]


@pytest.mark.parametrize(
    ("country", "tier", "unknown_model", "expected"),
    [
        ("CN", "public", "deny", ["open"]),
        ("US", "public", "deny", ["open", "us-only"]),
        ("US", "partner", "deny", ["open", "us-only", "lab"]),
        ("CN", "public", "allow", ["open", "other"]),  # models not in the registry follow unknown_model
    ],
)
def test_the_list_keeps_what_decide_allows(country: str, tier: str, unknown_model: str, expected: list[str]) -> None:
    caller = Caller(subject="s", org="o", org_name=None, tier=tier, claimed_country=country, ip="192.0.2.1")
    kept = filter_models(LIST, lambda name: decide(SNAP, caller, name, NOW, rules(unknown_model)).allowed)
    assert ids(kept) == expected
    assert orjson.loads(kept)["object"] == "list"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"data": {}}',
        b'{"object": "list"}',
        b'{"data": ["open"]}',
        b'{"data": [{"id": 7}]}',
        b'{"data": [{}]}',
    ],
)
def test_what_is_no_list_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        filter_models(body, lambda _name: True)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v1/models", True),
        ("HEAD", "/v1/models", True),
        ("POST", "/v1/models", False),
        ("GET", "/v1/models/open", False),
        ("GET", "/health", False),
    ],
)
def test_which_requests_are_list_requests(method: str, path: str, expected: bool) -> None:
    custom = Rules(
        home_countries=frozenset(),
        unknown_model="deny",
        tier_stages=TIERS,
        modelless_paths=frozenset({"/v1/models", "/health"}),
    )
    assert lists_models(method, path, custom) is expected
