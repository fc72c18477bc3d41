"""The policy's types: the immutable :class:`Snapshot` a decision reads, its parts, the
:class:`Caller` it decides for and the :class:`Decision` it returns.

Pure data: building these from stored bytes is :mod:`gateway.policy.wire`'s job, querying them
:mod:`gateway.policy.decide`'s.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from gateway.policy.names import GROUP_PREFIX, LIST_NAMES, CredentialKind

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
    # country-groups: the member codes; licences: the countries (codes and @GROUP references) as written.
    countries: tuple[str, ...] | None = None
    # licences only: the organisation it is granted to and the models it covers.
    org: str | None = None
    models: tuple[str, ...] | None = None

    def active(self, now: float) -> bool:
        """True until ``expires_at``; from that instant on the entry no longer applies."""
        expires = self.expires_ts
        return expires is None or now < expires


class Step(NamedTuple):
    """One timeline entry: from ``at`` on, the fields it names replace the model's own.

    ``allowed_countries`` is as written (codes and ``@GROUP`` references); ``names_allowed`` says
    whether the entry names it at all (a named null lifts the country restriction).
    """

    at_ts: float
    at_iso: str
    stage: str | None = None
    export_suspended: bool | None = None
    allowed_countries: tuple[str, ...] | None = None
    names_allowed: bool = False


@dataclass(frozen=True, slots=True)
class ModelState:
    """What a model is at one instant: its stage, suspension and allowed countries (groups resolved)."""

    stage: str
    export_suspended: bool
    allowed_countries: frozenset[str] | None


def resolve_codes(written: Iterable[str], groups: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """Codes and ``@GROUP`` references -> codes. A group the policy lacks adds none: a set of allowed
    countries only shrinks by it (fail closed)."""
    out: set[str] = set()
    for code in written:
        if code[:1] == GROUP_PREFIX:
            out |= groups.get(code[1:], frozenset())
        else:
            out.add(code)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Model:
    """A registry entry as written (``allowed_countries`` may name ``@GROUP``s), ``timeline`` sorted by
    time, and ``states``: (from when, :class:`ModelState`) with country groups resolved, first from -inf.
    """

    name: str
    stage: str
    timeline: tuple[Step, ...] = ()
    allowed_countries: frozenset[str] | None = None
    export_suspended: bool = False
    # The model as a shadow write would make it (decided alongside, never enforced); None: no shadow.
    shadow: Model | None = None
    states: tuple[tuple[float, ModelState], ...] = field(init=False, repr=False, compare=False)
    # Whether any of its country sets names a group (so a group change resolves it again).
    uses_groups: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        written = [self.allowed_countries or ()] + [step.allowed_countries or () for step in self.timeline]
        object.__setattr__(self, "uses_groups", any(code[:1] == GROUP_PREFIX for codes in written for code in codes))
        object.__setattr__(self, "states", self._states({}))

    def _states(self, groups: Mapping[str, frozenset[str]]) -> tuple[tuple[float, ModelState], ...]:
        allowed = self.allowed_countries
        stage, suspended = self.stage, self.export_suspended
        resolved = None if allowed is None else resolve_codes(allowed, groups)
        states = [(-math.inf, ModelState(stage, suspended, resolved))]
        for step in self.timeline:
            if step.stage is not None:
                stage = step.stage
            if step.export_suspended is not None:
                suspended = step.export_suspended
            if step.names_allowed:
                written = step.allowed_countries
                resolved = None if written is None else resolve_codes(written, groups)
            states.append((step.at_ts, ModelState(stage, suspended, resolved)))
        return tuple(states)

    def resolved(self, groups: Mapping[str, frozenset[str]]) -> Model:
        """This model with its country groups resolved against ``groups`` (itself when it names none)."""
        shadow = self.shadow
        if not self.uses_groups and (shadow is None or not shadow.uses_groups):
            return self
        model = self
        if shadow is not None and shadow.uses_groups:
            model = dataclasses.replace(self, shadow=shadow.resolved(groups))
        elif model is self:
            model = dataclasses.replace(self)
        object.__setattr__(model, "states", model._states(groups))
        return model

    def state(self, now: float) -> ModelState:
        """The model at ``now``: the last timeline entry whose ``at`` has passed, over the fields it
        names, else the model's own fields."""
        states = self.states
        current = states[0][1]
        for at_ts, state in states[1:]:
            if at_ts > now:
                break
            current = state
        return current

    def current_stage(self, now: float) -> str:
        return self.state(now).stage

    def next_change(self, now: float) -> Step | None:
        """The first timeline entry after ``now``, or None."""
        for step in self.timeline:
            if step.at_ts > now:
                return step
        return None


class Licence(NamedTuple):
    """A licence as a decision reads it: who, which models, from which countries (groups resolved)."""

    id: str
    models: frozenset[str]
    countries: frozenset[str]
    entry: Entry

    def covers(self, model: str, now: float) -> bool:
        return model in self.models and self.entry.active(now)


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
    # The licence that let the caller past row 6 (docs/contract.md §14), when one did.
    licence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The shape ``POST /admin/v1/decide`` answers with."""
        answer = {
            "decision": "allow" if self.allowed else "block",
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "policy_version": self.policy_version,
            "screening": self.screening,
        }
        if self.licence is not None:
            answer["licence"] = self.licence
        return answer


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
    # country-groups resolved: group name -> member codes.
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # deny-countries entries keyed by a group (``@E:1``), by member code: a code -> those entries. A
    # reference to a group the policy lacks is under ``"*"`` and denies every caller (fail closed).
    group_denied: Mapping[str, tuple[Entry, ...]] = field(default_factory=dict)
    # licences by org, countries resolved.
    licences: Mapping[str, tuple[Licence, ...]] = field(default_factory=dict)
    # The first instant after ``loaded_at`` at which a model's timeline changes its state; the watcher
    # builds the snapshot again then, so requests in flight are decided again when it happens.
    next_change_at: float = math.inf
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
