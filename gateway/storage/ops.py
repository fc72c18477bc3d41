"""Policy write operations, the change record, and the refusals a write can end in."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..policy.effect import Effect
from .keys import APIKEYS_KEY, MODELS_KEY, list_key


class PolicyMissing(Exception):
    """A single-entry write into a Redis that holds no policy (contract: 409 policy_missing)."""


class NotFound(Exception):
    """A delete (or a patch) of something that is not there."""


class PolicyIncomplete(Exception):
    """A restore into a Redis with no policy that leaves parts out (contract: 409 policy_incomplete).

    ``missing`` names them as a policy document does: ``lists.partners``, ``api_keys``, ``screening``.
    """

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(", ".join(missing))
        self.missing = tuple(missing)


class KeyRevoked(Exception):
    """A write that would make a revoked API key (its id or its hash) active again (409 key_revoked)."""

    def __init__(self, key_id: str, revoked: Mapping[str, Any]) -> None:
        super().__init__(key_id)
        self.key_id = key_id
        self.revoked = dict(revoked)


# --- write operations -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HashSet:
    key: str
    field: str
    value: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class HashDelete:
    key: str
    field: str
    must_exist: bool = True


@dataclass(frozen=True, slots=True)
class HashReplace:
    key: str
    values: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class ScreeningReplace:
    entries: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class HashUpdate:
    """Read-modify-write of one field, inside the write's WATCH (a merge patch).

    ``update`` gets the stored value (None when absent) and returns the value to store; it may
    raise (:class:`NotFound`, a validation error) and then nothing changes. The write retries on a
    concurrent change, so ``update`` always sees the value it replaces: no update is lost.
    """

    key: str
    field: str
    update: Callable[[dict[str, Any] | None], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class KeyRevoke:
    """Delete an API key and keep its revocation (id, hash, who, when), so it can never return."""

    key_id: str
    revoked_by: str
    revoked_at: str


@dataclass(frozen=True, slots=True)
class RevocationsMerge:
    """Revocation records carried by an import: added to those kept, never removing any."""

    records: Mapping[str, Mapping[str, Any]]


Op = HashSet | HashDelete | HashReplace | ScreeningReplace | HashUpdate | KeyRevoke | RevocationsMerge
# What a write's operations become once the read-modify-write ones are resolved inside the transaction.
PlainOp = HashSet | HashDelete | HashReplace | ScreeningReplace
# A write's operations, or a function that chooses them inside the transaction from whether Redis
# holds a policy (True) or is empty (False); it may raise to refuse the write.
OpsPlan = Sequence[Op] | Callable[[bool], Sequence[Op]]


@dataclass(slots=True)
class Change:
    """One change-history record."""

    actor: str
    time: str
    target: str
    before: Any = None
    after: Any = None
    version: int = 0
    # "loosen" or "tighten" (gateway.policy.effect); None only for a record built outside a write.
    effect: Effect | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def policy_ops(document: Mapping[str, Any]) -> list[Op]:
    """Write operations that replace each section (and each list) present in a validated document."""
    ops: list[Op] = []
    for name, entries in (document.get("lists") or {}).items():
        ops.append(HashReplace(list_key(name), entries))
    if "models" in document:
        ops.append(HashReplace(MODELS_KEY, document["models"] or {}))
    if "api_keys" in document:
        ops.append(HashReplace(APIKEYS_KEY, document["api_keys"] or {}))
    if "screening" in document:
        ops.append(ScreeningReplace((document["screening"] or {}).get("entries", [])))
    if document.get("revoked_api_keys"):
        ops.append(RevocationsMerge(document["revoked_api_keys"]))
    return ops
