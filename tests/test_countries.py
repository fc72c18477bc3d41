"""Country and subdivision codes: what counts as one, and how operator input is normalised."""

from __future__ import annotations

import pytest

from gateway.countries import (
    COUNTRIES,
    SUBDIVISIONS,
    country_of,
    is_country,
    is_subdivision,
    validate_country,
    validate_region,
)


@pytest.mark.parametrize("code", ["US", "GB", "UA", "KP", "TW", "XK", "NO"])
def test_is_country_accepts_alpha_2_and_kosovo(code: str) -> None:
    assert is_country(code)


@pytest.mark.parametrize("code", ["us", "USA", "UK", "ZZ", "EU", "UA-43", "", " US", None, 840])
def test_is_country_rejects_other_strings_and_types(code: object) -> None:
    assert not is_country(code)


@pytest.mark.parametrize("code", ["UA-43", "UA-40", "UA-14", "UA-09", "US-CA", "GB-ENG", "FR-75C"])
def test_is_subdivision_accepts_iso_3166_2(code: str) -> None:
    assert is_subdivision(code)


@pytest.mark.parametrize("code", ["UA", "UA-99", "ua-43", "UA43", "XX-01", None])
def test_is_subdivision_rejects_countries_and_unknown_codes(code: object) -> None:
    assert not is_subdivision(code)


def test_code_sets_are_frozen_and_complete() -> None:
    assert isinstance(COUNTRIES, frozenset) and isinstance(SUBDIVISIONS, frozenset)
    assert len(COUNTRIES) >= 250  # 249 ISO 3166-1 entries plus XK
    assert "XK" in COUNTRIES
    assert not COUNTRIES & SUBDIVISIONS


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("us", "US"), ("Ua-43", "UA-43"), ("UA-43", "UA-43"), ("xk", "XK"), ("gb-eng", "GB-ENG")],
)
def test_validate_region_upper_cases(raw: str, normalised: str) -> None:
    assert validate_region(raw) == normalised


@pytest.mark.parametrize("raw", ["ZZ", "UK", "USA", "UA-99", "", " US", "U S"])
def test_validate_region_names_the_bad_code(raw: str) -> None:
    with pytest.raises(ValueError, match="is not an ISO 3166-1 alpha-2") as info:
        validate_region(raw)
    assert repr(raw) in str(info.value)


@pytest.mark.parametrize("raw", [None, 1, ["US"], False])
def test_validate_region_rejects_non_strings(raw: object) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        validate_region(raw)


def test_validate_region_bounds_what_it_echoes() -> None:
    with pytest.raises(ValueError) as info:
        validate_region("A" * 10_000)
    assert len(str(info.value)) < 300


def test_validate_country_refuses_subdivisions() -> None:
    assert validate_country("de") == "DE"
    with pytest.raises(ValueError, match="subdivision"):
        validate_country("UA-43")


@pytest.mark.parametrize(("code", "country"), [("UA-43", "UA"), ("GB-ENG", "GB"), ("US", "US")])
def test_country_of(code: str, country: str) -> None:
    assert country_of(code) == country
