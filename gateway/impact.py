"""Impact preview: the callers of the last hours decided again under the policy as a write would make it.

:class:`ImpactPreview` reads the stored policy and applies a write's operations to it without writing
(:func:`gateway.storage.apply.apply_ops`), reads the audit trail of a window of hours in bounded pages,
groups its records into distinct callers (what a decision reads: subject, organisation, tier, claimed
country, client address, model, API key), and decides each of them under the policy before and after,
with the public path's own admission steps. The answer lists the callers the write would block and
those it would let through.

The CPU work (parsing records, building snapshots, deciding) runs in a worker thread so the event loop
keeps serving; it checks a deadline as it goes and answers what it has with ``"complete": false`` when
time, records or callers run out. Nothing in Redis changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from .admission import Admission
from .errors import invalid
from .identity import Identity
from .policy.decide import Rules
from .policy.model import ApiKey, Caller, ScreeningHitLike, ScreeningLike, Snapshot
from .policy.wire import build_snapshot
from .screening import ScreeningIndex
from .settings import ScreeningSettings
from .storage.apply import AppliedPolicy, apply_ops, parts_written, plan_ops
from .storage.keys import POLICY_PARTS
from .storage.ops import Op, OpsPlan, PolicyMissing
from .storage.policy_store import PolicyData
from .storage.store import Store

UNAUTHENTICATED = "unauthenticated"
# How many callers are decided between two looks at the deadline.
DEADLINE_EVERY = 256


@dataclass(frozen=True)
class ImpactLimits:
    """Bounds of one preview: the longest window, records read, callers decided, time, callers listed."""

    hours: float = 24
    max_records: int = 1_000_000
    max_callers: int = 100_000
    timeout_s: float = 10
    listed: int = 1000


class CallerKey(NamedTuple):
    """One distinct caller: what the decision reads of an audit record (``ip_country`` is derived
    again from ``client_ip`` under each policy, so an ``ip-ranges`` change moves it)."""

    subject: str
    org: str | None
    org_name: str | None
    tier: str
    claimed_country: str | None
    client_ip: str
    model: str
    key_id: str | None


def caller_key(record: Mapping[str, Any]) -> CallerKey | None:
    """The caller an audit record describes; None for a record no decision can be made again for
    (no subject: refused before a credential was verified; no model: a model-less request)."""
    subject, model, tier = record.get("subject"), record.get("model"), record.get("tier")
    if not isinstance(subject, str) or not subject or not isinstance(model, str) or not model:
        return None
    return CallerKey(
        subject,
        _text(record.get("org")),
        _text(record.get("org_name")),
        tier if isinstance(tier, str) else "",
        _text(record.get("claimed_country")),
        _text(record.get("client_ip")) or "",
        model,
        _text(record.get("key_id")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class CallerCounts:
    """Requests per distinct caller over audit records, at most ``max_callers`` callers: once that many
    are held, records of others are left out (``whole`` turns False) and those held keep counting."""

    __slots__ = ("_counts", "max_callers", "whole")

    def __init__(self, max_callers: int) -> None:
        self.max_callers = max_callers
        self.whole = True
        # Keyed by the raw field values, checked once per caller rather than once per record.
        self._counts: dict[tuple[Any, ...], int] = {}

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        counts = self._counts
        for record in records:
            get = record.get
            subject, model = get("subject"), get("model")
            if not subject or not model:
                continue
            raw = (
                subject,
                get("org"),
                get("org_name"),
                get("tier"),
                get("claimed_country"),
                get("client_ip"),
                model,
                get("key_id"),
            )
            try:
                held = counts.get(raw)
            except TypeError:  # a value no record the gateway writes holds (a list, an object)
                continue
            if held is not None:
                counts[raw] = held + 1
            elif len(counts) < self.max_callers:
                counts[raw] = 1
            else:
                self.whole = False

    def callers(self) -> dict[CallerKey, int]:
        found: dict[CallerKey, int] = {}
        fields = ("subject", "org", "org_name", "tier", "claimed_country", "client_ip", "model", "key_id")
        for raw, requests in self._counts.items():
            key = caller_key(dict(zip(fields, raw, strict=True)))
            if key is not None:
                found[key] = found.get(key, 0) + requests
        return found


class _Screener:
    """A screening index as a preview's thread uses it: the index's uncached lookup (its own cache
    belongs to the event loop's thread), remembered per name for this preview only."""

    __slots__ = ("_index", "_seen")

    def __init__(self, index: ScreeningIndex) -> None:
        self._index = index
        self._seen: dict[str, ScreeningHitLike | None] = {}

    def match(self, name: str) -> ScreeningHitLike | None:
        if name in self._seen:
            return self._seen[name]
        hit = self._seen[name] = self._index.lookup(name)
        return hit


class _Side:
    """One policy (before or after) and its API keys by id."""

    __slots__ = ("keys", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.keys: dict[str, ApiKey] = {key.id: key for key in snapshot.api_keys.values()}


@dataclass
class _Work:
    """What the worker thread found; read back on the loop."""

    records: int = 0
    decided: int = 0
    limited_by: list[str] = dataclasses.field(default_factory=list)
    would_block: dict[tuple[str, str | None, str, str, str], int] = dataclasses.field(default_factory=dict)
    would_allow: dict[tuple[str, str | None, str, str, str], int] = dataclasses.field(default_factory=dict)
    callers: int = 0


class ImpactPreview:
    """Previews a write's effect on the callers of the last hours; one per process, shared by requests."""

    def __init__(
        self,
        *,
        store: Store,
        admission: Admission,
        rules: Rules,
        screening: ScreeningSettings,
        limits: ImpactLimits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.admission = admission
        self.rules = rules
        self.screening = screening
        self.limits = limits or ImpactLimits()
        self.clock = clock
        self.monotonic = monotonic
        # One preview's CPU work at a time: each more would take another share of the interpreter from
        # the event loop. A preview waiting here spends its own time limit.
        self._working = asyncio.Semaphore(1)

    async def preview(self, ops: OpsPlan, hours: float) -> dict[str, Any]:
        """Decide again every caller of the last ``hours`` (at most ``limits.hours``) under the stored
        policy and under it with ``ops`` applied; the answer is the contract's impact object.

        A ``hours`` that is not a positive number is a 400 (:class:`~gateway.errors.GatewayError`).
        Raises what the write would raise for ``ops`` (:class:`~gateway.storage.ops.NotFound`,
        :class:`~gateway.storage.ops.KeyRevoked`, a validation error of a merge patch),
        :class:`~gateway.storage.ops.PolicyMissing` when Redis holds no policy, and
        :class:`~gateway.storage.clients.StoreUnavailable` when Redis cannot be read.
        """
        if not (isinstance(hours, int | float) and math.isfinite(hours) and hours > 0):
            raise invalid("hours", "must be a positive number of hours")
        hours = min(float(hours), self.limits.hours)
        started = self.monotonic()
        deadline = started + self.limits.timeout_s
        plan = plan_ops(ops)
        data, screening_entries, base = await self._read_policy(plan)
        applied = apply_ops(data, plan)  # before the records: a write it would refuse is refused at once
        now = self.clock()
        pages: list[list[bytes]] = []
        limited: list[str] = []
        read = 0
        async for page in self.store.read_audit_window(int((now - hours * 3600) * 1000), limit=self.limits.max_records):
            pages.append(page)
            read += len(page)
            if self.monotonic() >= deadline:
                limited.append("timeout")
                break
        else:
            if read >= self.limits.max_records:
                limited.append("max_records")
        async with self._working:
            work = await asyncio.to_thread(self._evaluate, data, screening_entries, base, applied, pages, now, deadline)
        limits_hit = limited + [reason for reason in work.limited_by if reason not in limited]
        listed = self.limits.listed
        block = _rows(work.would_block)
        allow = _rows(work.would_allow)
        return {
            "hours": hours,
            "records": work.records,
            "callers": work.callers,
            "decided": work.decided,
            "complete": not limits_hit,
            "limited_by": limits_hit,
            "would_block": block[:listed],
            "would_allow": allow[:listed],
            "would_block_count": len(block),
            "would_allow_count": len(allow),
            "would_block_requests": sum(work.would_block.values()),
            "would_allow_requests": sum(work.would_allow.values()),
            "policy_version": data.version,
            "elapsed_ms": round((self.monotonic() - started) * 1000, 1),
        }

    async def _read_policy(self, plan: Sequence[Op]) -> tuple[PolicyData, list[dict[str, Any]], Snapshot | None]:
        """The stored policy: only the parts ``plan`` changes when the enforced snapshot is the stored
        version (it is then the policy before, already built); else all of it and the screening entries."""
        enforced = self.admission.policy.snapshot
        if enforced is not None:
            data = await self.store.load_parts(parts_written(plan))
            if data is None:
                raise PolicyMissing()
            if (data.version, data.generation) == (enforced.version, enforced.generation):
                return data, [], enforced
        loaded = await self.store.load_document()
        if loaded is None:
            raise PolicyMissing()
        return loaded[0], loaded[1], None

    # --- the worker thread ----------------------------------------------------------------

    def _evaluate(
        self,
        data: PolicyData,
        screening_entries: list[dict[str, Any]],
        base: Snapshot | None,
        applied: AppliedPolicy,
        pages: Sequence[list[bytes]],
        now: float,
        deadline: float,
    ) -> _Work:
        work = _Work()
        before = _Side(self._before(data, screening_entries, base, now))
        after = _Side(self._after(before.snapshot, applied))
        counts = CallerCounts(self.limits.max_callers)
        for page in pages:
            records = orjson.loads(b"[" + b",".join(page) + b"]")
            work.records += len(records)
            counts.add(records)
            if self.monotonic() >= deadline:
                work.limited_by.append("timeout")
                break
        if not counts.whole:
            work.limited_by.append("max_callers")
        callers = counts.callers()
        work.callers = len(callers)
        # The busiest callers first, so a preview cut short by its deadline has decided those.
        ordered = sorted(callers.items(), key=lambda item: -item[1])
        for position, (key, requests) in enumerate(ordered):
            if position % DEADLINE_EVERY == 0 and position and self.monotonic() >= deadline:
                if "timeout" not in work.limited_by:
                    work.limited_by.append("timeout")
                break
            was, will = self._codes(before, after, key, now)
            work.decided += 1
            if was == will or (was is not None and will is not None):
                continue
            row = (key.subject, key.org, key.tier, key.model, will or was or "")
            target = work.would_block if will is not None else work.would_allow
            target[row] = target.get(row, 0) + requests
        return work

    def _codes(self, before: _Side, after: _Side, key: CallerKey, now: float) -> tuple[str | None, str | None]:
        """The codes that block ``key`` before and after (None: allowed)."""
        admission = self.admission
        was_identity = self._identity(before, key, now)
        same_keys = after.snapshot.api_keys is before.snapshot.api_keys
        will_identity = was_identity if key.key_id is None or same_keys else self._identity(after, key, now)
        was_caller = will_caller = None
        if was_identity is not None:
            was_caller = admission.caller(was_identity, key.client_ip, before.snapshot)
        if will_identity is not None:
            if will_identity is was_identity and after.snapshot.ip_ranges is before.snapshot.ip_ranges:
                will_caller = was_caller  # the same caller at the same address, placed by the same ranges
            else:
                will_caller = admission.caller(will_identity, key.client_ip, after.snapshot)
        return self._code(before, was_caller, key, now), self._code(after, will_caller, key, now)

    def _code(self, side: _Side, caller: Caller | None, key: CallerKey, now: float) -> str | None:
        """The code that blocks ``caller`` under ``side``'s policy (no caller: row 1), None when allowed."""
        if caller is None:
            return UNAUTHENTICATED
        decision = self.admission.decide(side.snapshot, caller, key.model, now=now)
        return None if decision.allowed else decision.code

    @staticmethod
    def _identity(side: _Side, key: CallerKey, now: float) -> Identity | None:
        """The caller's identity under ``side``: a token's claims as recorded; an API key's attributes
        as that policy holds them, None when it holds no such key (or it has expired): row 1 refuses."""
        if key.key_id is None:
            return Identity(
                subject=key.subject,
                org=key.org,
                org_name=key.org_name,
                tier=key.tier,
                country=key.claimed_country,
                credential="jwt",
                expires_at=None,
            )
        api_key = side.keys.get(key.key_id)
        if api_key is None or not api_key.active(now):
            return None
        return Identity(
            subject=api_key.subject,
            org=api_key.org,
            org_name=api_key.org_name,
            tier=api_key.tier,
            country=api_key.country,
            credential="api_key",
            expires_at=api_key.expires_ts,
            key_id=api_key.id,
        )

    def _before(
        self, data: PolicyData, screening_entries: list[dict[str, Any]], base: Snapshot | None, now: float
    ) -> Snapshot:
        """The stored policy as a snapshot: ``base`` (the enforced one, of that version) when given, with
        its screening index behind a face this thread may use; else built from what was read."""
        if base is not None:
            screening = base.screening
            return dataclasses.replace(base, screening=_screener(screening) if screening is not None else None)
        return build_snapshot(
            version=data.version,
            generation=data.generation,
            loaded_at=now,
            lists=data.lists,
            models=data.models,
            api_keys=data.api_keys,
            screening=self._index(screening_entries),
        )

    def _after(self, before: Snapshot, applied: AppliedPolicy) -> Snapshot:
        """``before`` with the parts the write changes built again; the rest shared with it."""
        screening = before.screening if applied.screening is None else self._index(applied.screening)
        after = build_snapshot(
            version=applied.version,
            generation=applied.generation,
            # The instant ``before`` placed its ip-ranges at: a range that expired since is no change.
            loaded_at=before.loaded_at,
            lists={name: entries for name, entries in applied.lists.items() if name in applied.changed},
            models=applied.models,
            api_keys=applied.api_keys,
            screening=screening,
            reuse=before,
            unchanged=frozenset(POLICY_PARTS) - applied.changed,
        )
        if after.ip_ranges == before.ip_ranges:
            # The same mapping object: the address index built for it (keyed by identity) serves both.
            after = dataclasses.replace(after, ip_ranges=before.ip_ranges)
        return after

    def _index(self, entries: Sequence[Mapping[str, Any]]) -> ScreeningLike | None:
        if not entries:
            return None
        cfg = self.screening
        return _Screener(
            ScreeningIndex(
                entries,
                block_threshold=cfg.block_threshold,
                review_threshold=cfg.review_threshold,
                cache_size=0,
            )
        )


def _screener(screening: ScreeningLike) -> ScreeningLike:
    """The enforced index behind a thread-safe face (other implementations are used as they are)."""
    return _Screener(screening) if isinstance(screening, ScreeningIndex) else screening


def _rows(found: Mapping[tuple[str, str | None, str, str, str], int]) -> list[dict[str, Any]]:
    """Callers as the answer lists them, aggregated over their addresses: most requests first."""
    ordered = sorted(found.items(), key=lambda item: (-item[1], item[0][0], item[0][3]))
    return [
        {"subject": subject, "org": org, "tier": tier, "model": model, "code": code, "requests": requests}
        for (subject, org, tier, model, code), requests in ordered
    ]
