"""What a write's operations make of a stored policy, without writing.

:func:`apply_ops` is the write path's effect on the policy's parts (lists, models, API keys,
screening entries) computed over the dicts a read returned (:meth:`PolicyStore.load_document`),
so an impact preview can decide callers under the policy as it would be. Pure: it reads no Redis
and changes nothing it is given (a part an operation touches is copied first).

It refuses what the write would refuse, with the same exceptions: a delete or a revocation of
something absent (:class:`NotFound`, when the operation requires it to exist) and a revoked API
key written back (:class:`KeyRevoked`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..policy.names import LIST_NAMES
from .keys import APIKEYS_KEY, APIKEYS_PART, MODELS_PART, PART_OF_KEY, REVOKED_KEY
from .ops import (
    HashDelete,
    HashReplace,
    HashSet,
    HashUpdate,
    KeyRevoke,
    KeyRevoked,
    NotFound,
    Op,
    OpsPlan,
    RevocationsMerge,
    ScreeningReplace,
)
from .policy_store import PolicyData

Part = dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class AppliedPolicy:
    """The stored policy's parts as they would be after a write.

    ``changed`` names the parts an operation touched (list names, ``models``, ``apikeys``, as
    :data:`~gateway.storage.keys.POLICY_PARTS`); the others are the very dicts that were read.
    ``screening`` holds the entries a screening import would store, None when it is unchanged.
    """

    version: int
    generation: str
    lists: dict[str, Part]
    models: Part
    api_keys: Part
    screening: Sequence[Mapping[str, Any]] | None
    changed: frozenset[str]


class _Parts:
    """The parts being changed: each copied once, on its first change."""

    def __init__(self, data: PolicyData) -> None:
        # What was read, per part; a part is replaced by its copy on its first change.
        self.original: dict[str, Part] = {
            **{name: data.lists.get(name, {}) for name in LIST_NAMES},
            MODELS_PART: data.models,
            APIKEYS_PART: data.api_keys,
        }
        self.read = dict(self.original)
        self.revoked = data.revoked
        self.changed: set[str] = set()
        self.screening: Sequence[Mapping[str, Any]] | None = None

    def part(self, key: str) -> tuple[str, Part] | None:
        """The part stored under ``key`` (copied for writing), None for the revocation records."""
        if key == REVOKED_KEY:
            return None  # a revocation record decides nothing; the key's removal does
        name = PART_OF_KEY.get(key)
        if name is None:
            raise ValueError(f"not a policy key: {key}")
        if name not in self.changed:
            self.read[name] = dict(self.read[name])
            self.changed.add(name)
        return name, self.read[name]


def plan_ops(ops: OpsPlan) -> Sequence[Op]:
    """A write's operations into a Redis that holds a policy (what a plan chooses for that case)."""
    return ops(True) if callable(ops) else ops


def parts_written(ops: Sequence[Op]) -> frozenset[str]:
    """The policy parts ``ops`` change (as :data:`~gateway.storage.keys.POLICY_PARTS` names them): the
    ones :func:`apply_ops` needs to have been read."""
    parts: set[str] = set()
    for op in ops:
        if isinstance(op, KeyRevoke | RevocationsMerge):
            parts.add(APIKEYS_PART)
        elif not isinstance(op, ScreeningReplace):
            part = PART_OF_KEY.get(op.key)
            if part is not None:
                parts.add(part)
            elif op.key == REVOKED_KEY:
                parts.add(APIKEYS_PART)  # the revocations are read with the keys
    return frozenset(parts)


def apply_ops(data: PolicyData, ops: OpsPlan) -> AppliedPolicy:
    """``ops`` (as a write gets them, read-modify-write ones included) applied to ``data``, which must
    hold at least the parts they change (:func:`parts_written`)."""
    plan = plan_ops(ops)
    parts = _Parts(data)
    for op in plan:
        _apply_one(parts, op, replaces_keys=any(isinstance(o, HashReplace) and o.key == APIKEYS_KEY for o in plan))
    _refuse_revoked(parts, plan)
    read = parts.read
    return AppliedPolicy(
        version=data.version,
        generation=data.generation,
        lists={name: read[name] for name in LIST_NAMES},
        models=read[MODELS_PART],
        api_keys=read[APIKEYS_PART],
        screening=parts.screening,
        changed=frozenset(parts.changed),
    )


def _apply_one(parts: _Parts, op: Op, *, replaces_keys: bool) -> None:
    if isinstance(op, ScreeningReplace):
        parts.screening = list(op.entries)
    elif isinstance(op, KeyRevoke):
        found = parts.part(APIKEYS_KEY)
        assert found is not None
        if found[1].pop(op.key_id, None) is None:
            raise NotFound(op.key_id)
    elif isinstance(op, RevocationsMerge):
        # A revocation an import carries removes that key, unless the import replaces the keys whole.
        for key_id in op.records:
            if key_id in parts.revoked or replaces_keys:
                continue
            found = parts.part(APIKEYS_KEY)
            assert found is not None
            found[1].pop(key_id, None)
    else:
        found = parts.part(op.key)
        if found is None:
            return
        name, part = found
        if isinstance(op, HashSet):
            part[op.field] = dict(op.value)
        elif isinstance(op, HashDelete):
            if part.pop(op.field, None) is None and op.must_exist:
                raise NotFound(op.field)
        elif isinstance(op, HashUpdate):
            # As in the write, the update gets the value stored before this write.
            stored = parts.original[name].get(op.field)
            part[op.field] = dict(op.update(None if stored is None else dict(stored)))
        else:
            part.clear()
            part.update({key: dict(value) for key, value in op.values.items()})


def _refuse_revoked(parts: _Parts, plan: Sequence[Op]) -> None:
    """A revoked key (by id or hash) written back is refused, as the write refuses it."""
    if not parts.revoked:
        return
    written: list[tuple[str, Mapping[str, Any]]] = []
    for op in plan:
        if isinstance(op, HashSet) and op.key == APIKEYS_KEY:
            written.append((op.field, op.value))
        elif isinstance(op, HashReplace) and op.key == APIKEYS_KEY:
            written += op.values.items()
    by_hash = {record.get("hash"): key_id for key_id, record in parts.revoked.items() if record.get("hash")}
    for key_id, value in written:
        if key_id in parts.revoked:
            raise KeyRevoked(key_id, parts.revoked[key_id])
        other = by_hash.get(value.get("hash"))
        if other is not None:
            raise KeyRevoked(other, parts.revoked[other])
