"""Which strings are country or subdivision codes: ISO 3166-1 alpha-2 and ISO 3166-2, from pycountry.

The code sets are read once at import into frozensets, so checking a code is a
set lookup. Only operator input is validated here; the request path compares
codes the policy already holds.
"""

from __future__ import annotations

import pycountry

# Kosovo has no ISO 3166-1 code yet; "XK" is the user-assigned code that the
# European Commission, SWIFT and the GeoIP databases use for it, so callers and
# IP lookups can carry it.
USER_ASSIGNED_COUNTRIES: frozenset[str] = frozenset({"XK"})

COUNTRIES: frozenset[str] = frozenset(c.alpha_2 for c in pycountry.countries) | USER_ASSIGNED_COUNTRIES
SUBDIVISIONS: frozenset[str] = frozenset(s.code for s in pycountry.subdivisions)

# Long enough for any real code; bounds what an error message repeats back.
_ECHO_LIMIT = 40


def is_country(code: object) -> bool:
    """True for an upper-case ISO 3166-1 alpha-2 code (or XK)."""
    return isinstance(code, str) and code in COUNTRIES


def is_subdivision(code: object) -> bool:
    """True for an upper-case ISO 3166-2 subdivision code such as ``UA-43``."""
    return isinstance(code, str) and code in SUBDIVISIONS


def country_of(code: str) -> str:
    """The country part of a region code: ``UA-43`` -> ``UA``; a country code is returned as is."""
    head, _, _ = code.partition("-")
    return head


def validate_region(code: object) -> str:
    """Upper-case ``code`` and check it is a country or subdivision code; ValueError otherwise."""
    if not isinstance(code, str):
        raise ValueError(f"must be a string country code, got {type(code).__name__}")
    upper = code.upper()
    if upper in COUNTRIES or upper in SUBDIVISIONS:
        return upper
    shown = code if len(code) <= _ECHO_LIMIT else code[:_ECHO_LIMIT] + "..."
    raise ValueError(
        f"{shown!r} is not an ISO 3166-1 alpha-2 country code (e.g. 'US') "
        "or an ISO 3166-2 subdivision code (e.g. 'UA-43')"
    )


def validate_country(code: object) -> str:
    """Like :func:`validate_region`, but only a whole country (ISO 3166-1 alpha-2) is accepted."""
    region = validate_region(code)
    if region not in COUNTRIES:
        raise ValueError(f"{region!r} is a subdivision; a country code (ISO 3166-1 alpha-2) is needed here")
    return region
