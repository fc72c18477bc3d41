"""The caller as the policy sees it: who (from the credential) and where from (claim and IP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CredentialKind = Literal["jwt", "api_key", "none"]


@dataclass(slots=True)
class Caller:
    """An authenticated caller. Country codes are upper case ISO 3166-1 alpha-2 or 3166-2.

    Treated as immutable (the decision never changes it); not frozen only because a frozen
    dataclass costs several times as much to build, and one is built for every request.
    """

    subject: str
    org: str | None
    org_name: str | None
    tier: str
    claimed_country: str | None
    ip: str
    ip_country: str | None = None
    ip_subdivision: str | None = None
    credential: CredentialKind = "jwt"
    countries: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        # Every code that describes where the caller is: a subdivision claim
        # ("UA-43") also makes the caller's country ("UA") theirs.
        codes: set[str] = set()
        for code in (self.claimed_country, self.ip_country, self.ip_subdivision):
            if code:
                codes.add(code)
                if "-" in code:
                    codes.add(code.split("-", 1)[0])
        self.countries = frozenset(codes)
