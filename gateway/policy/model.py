"""The policy's types: the immutable :class:`Snapshot` a decision reads, its parts, the
:class:`Caller` it decides for and the :class:`Decision` it returns.

Pure data: building these from stored bytes is :mod:`gateway.policy.wire`'s job, querying them
:mod:`gateway.policy.decide`'s.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from gateway.policy.names import LIST_NAMES, CredentialKind

_EMPTY: Mapping[str, Any] = MappingProxyType({})


# --------------------------------------------------------------------------- screening protocol


class ScreeningHitLike(Protocol):
    """A name-screening match: blocked at or above the block threshold, else in the review band."""

    @property
    def blocked(self) -> bool: ...

    @property
    def score(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


class ScreeningLike(Protocol):
    """Anything that screens an organisation name against the imported denied-parties list."""

    def match(self, name: str) -> ScreeningHitLike | None: ...


# --------------------------------------------------------------------------- snapshot types


class Entry(NamedTuple):
    """One entry of a live list; ``country`` is set for ip-ranges only.

    A named tuple rather than a frozen dataclass: a snapshot holds hundreds of
    thousands of them, and tuples are built several times faster and smaller.
    """

    key: str
    reason: str
    source: str
    added_by: str
    added_at: str
    expires_at: str | None = None
    expires_ts: float | None = None
    country: str | None = None
    # False for a shadow entry (``"enforce": false``): stored and versioned, decided alongside the
    # live policy, never enforced.
    enforce: bool = True

    def active(self, now: float) -> bool:
        """True until ``expires_at``; from that instant on the entry no longer applies."""
        expires = self.expires_ts
        return expires is None or now < expires


@dataclass(frozen=True, slots=True)
class Model:
    """A registry entry; ``timeline`` holds ``(at_ts, at_iso, stage)`` sorted by time."""

    name: str
    stage: str
    timeline: tuple[tuple[float, str, str], ...] = ()
    allowed_countries: frozenset[str] | None = None
    export_suspended: bool = False
    # The model as a shadow write would make it (decided alongside, never enforced); None: no shadow.
    shadow: Model | None = None

    def current_stage(self, now: float) -> str:
        """The stage of the last timeline entry whose ``at`` has passed, else ``stage``."""
        stage = self.stage
        for at_ts, _at_iso, next_stage in self.timeline:
            if at_ts > now:
                break
            stage = next_stage
        return stage


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An issued API key as stored: its hash and what it vouches for, never the key itself."""

    id: str
    key_hash: str
    subject: str
    org: str
    org_name: str | None
    country: str
    tier: str
    expires_at: str | None
    expires_ts: float | None
    created_at: str
    created_by: str

    def active(self, now: float) -> bool:
        expires = self.expires_ts
        return expires is None or now < expires


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request; ``code`` is "" when allowed."""

    allowed: bool
    status: int
    code: str
    message: str
    policy_version: int
    screening: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The shape ``POST /admin/v1/decide`` answers with."""
        return {
            "decision": "allow" if self.allowed else "block",
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "policy_version": self.policy_version,
            "screening": self.screening,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One immutable, confirmed version of the whole policy, queried by :func:`decide`.

    ``lists`` always holds all of :data:`LIST_NAMES`; ``api_keys`` is keyed by
    the key's hash; ``ip_ranges`` maps each ip-ranges CIDR that was active at
    ``loaded_at`` to its country code, until ``ip_ranges_expire_at`` (the first
    ``expires_at`` among them), when the watcher derives the map again.
    """

    version: int
    generation: str
    loaded_at: float
    lists: Mapping[str, Mapping[str, Entry]]
    models: Mapping[str, Model]
    api_keys: Mapping[str, ApiKey]
    screening: ScreeningLike | None = None
    ip_ranges: Mapping[str, str] = field(default_factory=dict)
    ip_ranges_expire_at: float = math.inf
    # The policy as it would be with every shadow entry and model shadow enforced, when the policy
    # holds any (None otherwise, so deciding alongside costs the hot path one attribute check).
    shadow: Snapshot | None = field(default=None, repr=False, compare=False)
    # The allowed decision for this version, built once so the allowed path
    # allocates nothing per request.
    allow: Decision = field(init=False, repr=False, compare=False)
    # Registered names in their folded spelling: a name the registry lacks but that folds to one
    # it has is another spelling of a controlled model, which a lenient upstream may serve.
    folded_models: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(name not in self.lists for name in LIST_NAMES):
            lists = {name: self.lists.get(name, _EMPTY) for name in LIST_NAMES}
            object.__setattr__(self, "lists", MappingProxyType(lists))
        message = f"Access is permitted under policy version {self.version}."
        object.__setattr__(self, "allow", Decision(True, 200, "", message, self.version))
        object.__setattr__(self, "folded_models", frozenset(fold_model_name(name) for name in self.models))


def fold_model_name(name: str) -> str:
    """``name`` as a lenient model server may read it: compatibility-normalised (NFKC), case-folded,
    without surrounding white space."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


# --------------------------------------------------------------------------- the decision's input

# The caller as the policy sees it: who (from the credential) and where from (claim and IP).
# identity.py builds one per request; decide() and the model list read it.


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
