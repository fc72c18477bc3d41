"""Policy write operations (and their JSON form), the change record, a write prepared but not applied,
and the refusals a write or a change request's approval can end in."""

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


class ApprovalRequired(Exception):
    """A write whose effect needs a second admin's approval: nothing was applied; ``prepared`` is the
    write resolved to plain operations, to be held as a change request."""

    def __init__(self, prepared: PreparedWrite) -> None:
        super().__init__(prepared.effect)
        self.prepared = prepared


class ChangeRequestMissing(Exception):
    """No change request with this id (404)."""


class ApprovalSelf(Exception):
    """The proposer of a change request tried to approve it (403 approval_self)."""


class ChangeClosed(Exception):
    """A change request that is no longer pending (409 change_closed); ``status`` says what it is."""

    def __init__(self, request_id: str, status: str) -> None:
        super().__init__(f"{request_id}: {status}")
        self.request_id = request_id
        self.status = status


class ChangeExpired(Exception):
    """A pending change request past its ``expires_at`` (409 change_expired)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"{request_id}: expired")
        self.request_id = request_id


class ChangeConflict(Exception):
    """What a change request changes was changed since it was proposed (409 change_conflict)."""

    def __init__(self, request_id: str, changed: Sequence[str]) -> None:
        super().__init__(", ".join(changed))
        self.request_id = request_id
        self.changed = tuple(changed)


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


@dataclass(frozen=True, slots=True)
class PreparedWrite:
    """A write resolved inside a transaction's WATCH and judged, but not applied.

    ``before``/``after`` are the change record's values (bounded summaries of whole lists);
    ``guard`` holds, per touched value, a digest of what Redis held (None: absent), so applying it
    later can tell whether anything it touches has changed since. ``version``/``generation``: the
    policy it was prepared on (None: Redis held none).
    """

    ops: tuple[PlainOp, ...]
    before: Any
    after: Any
    effect: Effect
    version: int | None
    generation: str | None
    guard: Mapping[str, str | None]
    import_whole: bool = False


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


def op_to_json(op: PlainOp) -> dict[str, Any]:
    """A plain operation as JSON, for a change request to apply later exactly as proposed."""
    if isinstance(op, HashSet):
        return {"op": "hset", "key": op.key, "field": op.field, "value": op.value}
    if isinstance(op, HashDelete):
        return {"op": "hdel", "key": op.key, "field": op.field, "must_exist": op.must_exist}
    if isinstance(op, HashReplace):
        return {"op": "hreplace", "key": op.key, "values": op.values}
    return {"op": "screening", "entries": list(op.entries)}


def op_from_json(data: Mapping[str, Any]) -> PlainOp:
    """The inverse of :func:`op_to_json`; a ValueError for anything it did not write."""
    kind = data.get("op")
    if kind == "hset":
        return HashSet(str(data["key"]), str(data["field"]), dict(data["value"]))
    if kind == "hdel":
        return HashDelete(str(data["key"]), str(data["field"]), bool(data.get("must_exist", True)))
    if kind == "hreplace":
        return HashReplace(str(data["key"]), {str(k): dict(v) for k, v in dict(data["values"]).items()})
    if kind == "screening":
        return ScreeningReplace([dict(entry) for entry in data["entries"]])
    raise ValueError(f"not a stored write operation: {kind!r}")


def request_status(record: Mapping[str, Any], now: float) -> str:
    """A stored change request's status as of ``now``: a pending one past ``expires_at`` is "expired"."""
    status = str(record.get("status", "pending"))
    if status == "pending" and float(record.get("expires_at_s", 0)) <= now:
        return "expired"
    return status
