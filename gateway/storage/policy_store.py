"""Policy reads (whole or incremental, by part revisions and entry records), transactional writes,
the change history, and the pub/sub announcement of each new version."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import RedisError, WatchError

from ..policy.effect import classify_change
from ..policy.names import LATER_LISTS, LAZY_LISTS, LIST_NAMES
from .clients import RedisAccess, StoreUnavailable
from .keys import (
    APIKEYS_KEY,
    APIKEYS_PART,
    CHANGE_OPS_KEY,
    CHANGE_REQUESTS_KEY,
    CHANGE_RETIRE_KEY,
    CHANGES_KEY,
    CHANGES_MAXLEN,
    CHANNEL,
    DELTA_AT,
    GENERATION_KEY,
    MODELS_KEY,
    MODELS_PART,
    PART_KEYS,
    PART_OF_KEY,
    POLICY_PARTS,
    PREFIX,
    REVOKED_KEY,
    REVS_AT,
    REVS_KEY,
    SCREENING_HITS_KEY,
    SCREENING_KEY,
    SCREENING_REV_KEY,
    TOUCHED_CAP,
    VERSION_KEY,
    WRITE_MARK_PREFIX,
    WRITE_MARK_TTL_S,
    floor_field,
    list_key,
    touched_key,
)
from .ops import (
    ApprovalRequired,
    ApprovalSelf,
    Change,
    ChangeClosed,
    ChangeConflict,
    ChangeExpired,
    ChangeRequestMissing,
    HashDelete,
    HashReplace,
    HashSet,
    HashUpdate,
    KeyRevoke,
    KeyRevoked,
    NotFound,
    Op,
    OpsPlan,
    PlainOp,
    PolicyIncomplete,
    PolicyMissing,
    PreparedWrite,
    RevocationsMerge,
    ScreeningReplace,
    op_from_json,
    request_status,
)

# The logger name the store logged under before the split, so log lines read as before.
log = logging.getLogger("gateway.store")

MAX_INCREMENTAL_TRIES = 3


@dataclass(frozen=True, slots=True)
class PolicyData:
    """The raw policy as read in one transaction, not yet validated types: JSON-decoded dicts, except
    the deny lists (``LAZY_LISTS``), which stay as Redis returned them (bytes key -> JSON bytes)."""

    version: int
    generation: str
    lists: dict[str, dict[str, dict[str, Any]]]
    models: dict[str, dict[str, Any]]
    api_keys: dict[str, dict[str, Any]]
    screening_rev: int
    # Part -> version of its last change (empty when the stored revisions cannot be trusted).
    revs: dict[str, int] = field(default_factory=dict)
    # Parts not read because they are unchanged since the revisions the caller already held;
    # their entries here are empty and the caller keeps its own.
    unchanged: frozenset[str] = frozenset()
    # Lists read entry by entry: entry key -> its stored value now, None when deleted (decoded like
    # ``lists``: raw bytes for ``LAZY_LISTS``). Their ``lists`` entries are empty; the caller applies
    # these to its own copy.
    deltas: dict[str, dict[Any, Any]] = field(default_factory=dict)
    # Revoked API keys (key id -> hash, revoked_at, revoked_by); read by the admin export only.
    revoked: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KnownRevisions:
    """What a reader already holds: the generation and part revisions of its last load."""

    generation: str
    revs: dict[str, int]


def _decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, dict[str, Any]]:
    if not raw:
        return {}
    # One orjson call over all values, not one per value: a list can hold 100,000 entries.
    values = orjson.loads(b"[" + b",".join(raw.values()) + b"]")
    return dict(zip((k.decode() for k in raw), values, strict=True))


def _summary(values: Mapping[str, Any], limit: int = 200) -> Any:
    """Whole-list values in a change record, bounded: beyond ``limit`` keys only the keys count."""
    if len(values) <= limit:
        return dict(values)
    return {"count": len(values), "keys_sample": sorted(values)[:limit]}


def _digest(raw: bytes | None) -> str | None:
    return None if raw is None else hashlib.sha256(raw).hexdigest()


def _framed(key: bytes, value: bytes) -> bytes:
    """One hash field and value, length-framed so no two different hashes digest alike."""
    return len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value


@dataclass(slots=True)
class _Proposed:
    """A write as an admin asked for it: applied now unless its effect is in ``hold_for``."""

    ops: OpsPlan
    target: str
    import_whole: bool
    hold_for: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Approving:
    """The approval of a stored change request, checked and closed inside the write's transaction."""

    request_id: str
    approver: str
    now: float
    record: dict[str, Any] = field(default_factory=dict)
    closed: dict[str, Any] | None = None

    async def load(self, pipe: Any) -> _Proposed:
        """The request's stored operations, once it is found pending, unexpired and not the approver's own."""
        raw = await pipe.hget(CHANGE_REQUESTS_KEY, self.request_id)
        if raw is None:
            raise ChangeRequestMissing(self.request_id)
        record = orjson.loads(raw)
        status = request_status(record, self.now)
        if status == "expired":
            raise ChangeExpired(self.request_id)
        if status != "pending":
            raise ChangeClosed(self.request_id, status)
        if record.get("proposed_by") == self.approver:
            raise ApprovalSelf(self.request_id)
        raw_ops = await pipe.hget(CHANGE_OPS_KEY, self.request_id)
        if raw_ops is None:  # removed by hand: nothing can be applied as proposed
            raise ChangeConflict(self.request_id, ["its stored operations are gone"])
        self.record = record
        ops = [op_from_json(item) for item in orjson.loads(raw_ops)]
        return _Proposed(ops, target=str(record["target"]), import_whole=bool(record.get("import_whole")))

    def check(self, prepared: PreparedWrite) -> None:
        """ChangeConflict unless every touched value, and the policy generation, are as proposed on."""
        stored: dict[str, Any] = self.record.get("guard") or {}
        changed = [
            name for name in sorted(set(stored) | set(prepared.guard)) if stored.get(name) != prepared.guard.get(name)
        ]
        if self.record.get("generation") != prepared.generation:
            changed.insert(0, "the policy generation (a restore)")
        if changed:
            raise ChangeConflict(self.request_id, changed)

    def change_extra(self) -> dict[str, Any]:
        return {
            "change_request": self.request_id,
            "proposed_by": self.record.get("proposed_by"),
            "approved_by": self.approver,
        }

    def queue_close(self, pipe: Any, *, version: int, now_iso: str) -> None:
        closed = {
            **self.record,
            "status": "applied",
            "approved_by": self.approver,
            "closed_at": now_iso,
            "version": version,
        }
        pipe.hset(CHANGE_REQUESTS_KEY, self.request_id, orjson.dumps(closed))
        pipe.zadd(CHANGE_RETIRE_KEY, {self.request_id: self.now})
        self.closed = closed


_Source = _Proposed | _Approving


class PolicyStore(RedisAccess):
    """The policy's reads, writes and announcements."""

    # --- policy reads ---------------------------------------------------------------------

    async def read_version(self) -> tuple[int | None, str | None]:
        """(version, generation); version None means Redis holds no policy."""
        version, generation = await self._bounded(
            "poll", self.client.mget([VERSION_KEY, GENERATION_KEY]), self.policy_timeout_s
        )
        if version is None:
            return None, None
        return int(version), (generation or b"").decode()

    async def load_policy(self, known: KnownRevisions | None = None) -> PolicyData | None:
        """The policy as of one version, read in MULTI transactions.

        Without ``known``, every part. With it, only what changed since (plus one read of the
        heads, the revisions and the lists' change records): a part whose revision moved is read
        whole, or, for a list whose change records cover the span, only its changed entries, so a
        one-entry change to a 100,000-entry deny list reads one entry. Every part and entry read,
        and the revisions and records that vouch for what was not read, come from the same
        transaction, so the result is one version.
        """
        full: set[str] = set() if known is not None else set(POLICY_PARTS)
        fields: dict[str, set[bytes]] = {}
        # The lists' change records after the version the reader holds.
        held = known.revs.get(REVS_AT) if known is not None else None
        recorded = LIST_NAMES if held is not None else ()
        for attempt in range(MAX_INCREMENTAL_TRIES + 1):
            parts = [part for part in POLICY_PARTS if part in full]
            entries = {name: sorted(keys) for name, keys in fields.items() if name not in full}

            async def load(parts: list[str] = parts, entries: dict[str, list[bytes]] = entries) -> list[Any]:
                pipe = self.client.pipeline(transaction=True)
                _queue_heads(pipe)
                pipe.hgetall(REVS_KEY)
                for name in recorded:
                    pipe.zrangebyscore(touched_key(name), f"({held}", "+inf")
                for part in parts:
                    pipe.hgetall(PART_KEYS[part])
                for name, keys in entries.items():
                    pipe.hmget(list_key(name), keys)
                return list(await pipe.execute())

            version, generation, screening_rev, raw_revs, *rest = await self._bounded(
                "load", load(), self.load_timeout_s
            )
            if version is None:
                return None
            touched = dict(zip(recorded, rest[: len(recorded)], strict=True))
            hashes = rest[len(recorded) : len(recorded) + len(parts)]
            values = rest[len(recorded) + len(parts) :]
            version_n, generation_s = int(version), (generation or b"").decode()
            revs = _revisions(raw_revs, version_n)
            need_full, need_fields = _read_plan(known, generation_s, version_n, revs, touched)
            if need_full <= full and all(
                name in full or keys <= fields.get(name, set()) for name, keys in need_fields.items()
            ):
                break
            if attempt < MAX_INCREMENTAL_TRIES - 1:
                full |= need_full
                for name, keys in need_fields.items():
                    fields[name] = fields.get(name, set()) | keys
            else:
                full = set(POLICY_PARTS)
        raw = dict(zip(parts, hashes, strict=True))
        # Deny lists stay as Redis returned them (bytes keys, JSON values): the snapshot decodes and
        # parses an entry when a decision first consults it.
        lists: dict[str, Any] = {
            name: (raw[name] if name in LAZY_LISTS else _decode_hash(raw[name])) for name in LIST_NAMES if name in raw
        }
        deltas = {
            name: _decode_entries(name, keys, found)
            for (name, keys), found in zip(entries.items(), values, strict=True)
            if name in need_fields
        }
        read = frozenset(parts) | frozenset(deltas)
        return PolicyData(
            version=version_n,
            generation=generation_s,
            lists=lists,
            models=_decode_hash(raw.get(MODELS_PART, {})),
            api_keys=_decode_hash(raw.get(APIKEYS_PART, {})),
            screening_rev=int(screening_rev or 0),
            revs=revs,
            unchanged=frozenset(POLICY_PARTS) - read,
            deltas=deltas,
        )

    async def load_screening(self) -> list[dict[str, Any]]:
        raw = await self._bounded("load", self.client.get(SCREENING_KEY), self.load_timeout_s)
        return list(orjson.loads(raw)) if raw else []

    # --- policy writes --------------------------------------------------------------------

    async def write(
        self,
        ops: OpsPlan,
        *,
        actor: str,
        now_iso: str,
        target: str,
        import_whole: bool = False,
        unknown_model: str = "deny",
        hold_for: Collection[str] = (),
    ) -> tuple[int, Change]:
        """Apply ``ops`` and bump the version in one transaction; publish the new version.

        Without ``import_whole`` a Redis with no policy refuses the write (PolicyMissing); with it,
        the write into such a Redis is a restore and must replace every part (PolicyIncomplete
        names what it leaves out), so a half-restored policy never serves. A write that would put
        a revoked API key back is refused (KeyRevoked). ``HashUpdate`` and ``KeyRevoke`` read what
        they change under the same WATCH as the version, so they act on the value they replace.
        The change record says whether the write loosens or tightens, judged on the values it
        replaced; ``unknown_model`` (the config's ``policy.unknown_model``) decides that for a model
        entering or leaving the registry, and an import (``import_whole``) always loosens. A write
        whose effect is in ``hold_for`` applies nothing and raises :class:`ApprovalRequired` with
        the write as prepared (the two-person rule).
        Concurrent writers retry on WATCH conflicts, so none is lost. A write counts only
        once it is read back from the primary (the transaction leaves a marker key): a
        reply lost with its connection, or a write lost in a Sentinel or Cluster failover
        between EXEC and the read-back, is found out and applied again, never guessed.
        """
        source = _Proposed(ops, target=target, import_whole=import_whole, hold_for=frozenset(hold_for))
        return await self._write_loop(source, actor=actor, now_iso=now_iso, unknown_model=unknown_model)

    async def apply_change_request(
        self, request_id: str, *, approver: str, now_iso: str, now: float, unknown_model: str = "deny"
    ) -> tuple[int, Change, dict[str, Any]]:
        """Approve a pending change request: apply exactly its stored operations, bump the version,
        record the change (naming proposer and approver) and close the request, in one transaction.

        Refused, with nothing changed: an unknown id (ChangeRequestMissing), the proposer approving
        (ApprovalSelf), a request not pending (ChangeClosed) or past ``expires_at`` (ChangeExpired),
        and a request whose touched values, or the policy generation, differ from those it was
        proposed on (ChangeConflict). Same retries and read-back as :meth:`write`.
        """
        source = _Approving(request_id, approver=approver, now=now)
        version, change = await self._write_loop(source, actor=approver, now_iso=now_iso, unknown_model=unknown_model)
        assert source.closed is not None  # set by the attempt that was applied
        return version, change, source.closed

    async def prepare(self, ops: OpsPlan, *, import_whole: bool = False, unknown_model: str = "deny") -> PreparedWrite:
        """A dry run of :meth:`write`: resolve ``ops`` to plain operations and judge them against the
        policy as stored now, refusing as the write would; applies nothing."""

        async def run() -> PreparedWrite:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(VERSION_KEY)
                current = await pipe.get(VERSION_KEY)
                return await self._prepare(pipe, ops, current, import_whole=import_whole, unknown_model=unknown_model)

        return await self._bounded("prepare", run(), self.load_timeout_s)  # type: ignore[no-any-return]

    async def _write_loop(self, source: _Source, *, actor: str, now_iso: str, unknown_model: str) -> tuple[int, Change]:
        write_id = uuid.uuid4().hex
        changes: list[Change] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.write_retry_s
        pending, conflicts, delay = False, 0, 0.05
        while True:
            try:
                if pending:
                    version = await self._written_version(write_id)
                    if version is not None:
                        break
                    pending = False  # it did not land (or was lost): apply it again
                await self._bounded(
                    "write",
                    self._write_once(
                        source,
                        actor=actor,
                        now_iso=now_iso,
                        unknown_model=unknown_model,
                        write_id=write_id,
                        changes=changes,
                    ),
                    self.load_timeout_s,
                )
                pending = True  # acknowledged; confirmed by the read-back at the top of the loop
            except WatchError:
                conflicts += 1
                if conflicts >= 200:
                    raise StoreUnavailable("redis write: too many concurrent conflicting writes") from None
                await asyncio.sleep(0.001)
            except StoreUnavailable:
                # The connection failed somewhere between WATCH and the read-back: whether
                # EXEC ran is unknown until the marker is read from a (possibly new) primary.
                if loop.time() + delay > deadline:
                    raise
                pending = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        await self._publish(version)
        return version, changes[-1]

    async def _written_version(self, write_id: str) -> int | None:
        raw = await self._bounded("write", self.client.get(WRITE_MARK_PREFIX + write_id), self.load_timeout_s)
        return None if raw is None else int(raw)

    async def _write_once(
        self,
        source: _Source,
        *,
        actor: str,
        now_iso: str,
        unknown_model: str,
        write_id: str,
        changes: list[Change],
    ) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            approving = source if isinstance(source, _Approving) else None
            await pipe.watch(VERSION_KEY, *((CHANGE_REQUESTS_KEY,) if approving is not None else ()))
            current = await pipe.get(VERSION_KEY)
            if approving is not None:
                proposed = await approving.load(pipe)
            else:
                assert isinstance(source, _Proposed)
                proposed = source
            try:
                prepared = await self._prepare(
                    pipe, proposed.ops, current, import_whole=proposed.import_whole, unknown_model=unknown_model
                )
            except NotFound:
                if approving is None:
                    raise
                raise ChangeConflict(approving.request_id, ["an entry it deletes is gone"]) from None
            if approving is not None:
                approving.check(prepared)
            elif prepared.effect in proposed.hold_for:
                raise ApprovalRequired(prepared)
            new_version = int(current or 0) + 1
            change = Change(
                actor=actor,
                time=now_iso,
                target=proposed.target,
                before=prepared.before,
                after=prepared.after,
                version=new_version,
                effect=prepared.effect,
                extra=approving.change_extra() if approving is not None else {},
            )
            await self._queue_apply(pipe, prepared.ops, current, new_version)
            pipe.xadd(CHANGES_KEY, {"c": orjson.dumps(_change_dict(change))}, maxlen=CHANGES_MAXLEN, approximate=True)
            if approving is not None:
                approving.queue_close(pipe, version=new_version, now_iso=now_iso)
            pipe.set(WRITE_MARK_PREFIX + write_id, new_version, ex=WRITE_MARK_TTL_S)
            changes.append(change)
            await pipe.execute()

    async def _prepare(
        self, pipe: Any, plan: OpsPlan, current: bytes | None, *, import_whole: bool, unknown_model: str
    ) -> PreparedWrite:
        """Resolve ``plan`` under the pipe's WATCH and judge it; queues nothing."""
        if current is None and not import_whole:
            raise PolicyMissing()
        chosen = plan(current is not None) if callable(plan) else plan
        if current is None:
            missing = _missing_parts(chosen)
            if missing:
                raise PolicyIncomplete(missing)
        ops = await _resolve(pipe, chosen)
        before, after, guard = await self._read_before(pipe, ops)
        generation = await pipe.get(GENERATION_KEY)
        effect = classify_change(before, after, unknown_model=unknown_model, policy_import=import_whole)
        return PreparedWrite(
            ops=tuple(ops),
            before=before,
            after=after,
            effect=effect,
            version=None if current is None else int(current),
            generation=None if generation is None else generation.decode(),
            guard=guard,
            import_whole=import_whole,
        )

    async def _queue_apply(self, pipe: Any, ops: Sequence[PlainOp], current: bytes | None, new_version: int) -> None:
        """Read what the revisions and entry records need (still under WATCH), then start MULTI and queue
        the operations, the version bump and the revisions; the caller queues the rest and executes."""
        stored_revs = {key.decode(): int(value) for key, value in (await pipe.hgetall(REVS_KEY)).items()}
        # Revisions vouch for unchanged parts only while every write since kept them: a new policy,
        # or a version they do not describe (a writer that did not keep them), marks every part.
        held = None if current is None else int(current)
        trusted = held is not None and stored_revs.get(REVS_AT) == held
        records_kept = trusted and stored_revs.get(DELTA_AT) == held
        trims = await _touched_trims(pipe, ops, stored_revs, new_version) if records_kept else {}
        pipe.multi()
        if current is None:
            pipe.set(GENERATION_KEY, uuid.uuid4().hex)
            # A restore may leave a later list out: whatever a lost policy left there goes.
            replaced = {op.key for op in ops if isinstance(op, HashReplace)}
            for name in sorted(LATER_LISTS):
                if list_key(name) not in replaced:
                    pipe.delete(list_key(name))
        pipe.incr(VERSION_KEY)
        screening_changed = False
        floors: dict[str, int] = {}
        if not records_kept:  # nothing vouches for the lists' change records: start them afresh
            floors = dict.fromkeys(LIST_NAMES, new_version)
            pipe.delete(*(touched_key(name) for name in LIST_NAMES))
        for name, (rank, floor) in trims.items():
            if rank >= 0:
                pipe.zremrangebyrank(touched_key(name), 0, rank)
            floors[name] = floor
        for op in ops:
            part = _part_of(op)
            if isinstance(op, HashSet):
                pipe.hset(op.key, op.field, orjson.dumps(op.value))
            elif isinstance(op, HashDelete):
                pipe.hdel(op.key, op.field)
            elif isinstance(op, HashReplace):
                pipe.delete(op.key)
                if op.values:
                    pipe.hset(op.key, mapping={k: orjson.dumps(v) for k, v in op.values.items()})
            else:
                pipe.set(SCREENING_KEY, orjson.dumps(list(op.entries)))
                screening_changed = True
            if part in LIST_NAMES:
                if isinstance(op, HashReplace):  # readers of an older copy read the list whole
                    floors[part] = new_version
                    pipe.delete(touched_key(part))
                else:
                    assert not isinstance(op, ScreeningReplace)  # it has no key, so no list part
                    pipe.zadd(touched_key(part), {op.field: new_version})
        if screening_changed:
            pipe.set(SCREENING_REV_KEY, new_version)
        touched = {part for part in map(_part_of, ops) if part is not None}
        pipe.hset(
            REVS_KEY,
            mapping={part: new_version for part in (touched if trusted else POLICY_PARTS)}
            | {floor_field(name): floor for name, floor in floors.items()}
            | {REVS_AT: new_version, DELTA_AT: new_version},
        )

    async def _read_before(self, pipe: Any, ops: Sequence[PlainOp]) -> tuple[Any, Any, dict[str, str | None]]:
        """The change record's before and after, and a digest of each touched value as stored."""
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        guard: dict[str, str | None] = {}
        for op in ops:
            if isinstance(op, HashSet | HashDelete):
                name = f"{op.key}#{op.field}"
                raw = await pipe.hget(op.key, op.field)
                if raw is None and isinstance(op, HashDelete) and op.must_exist:
                    await pipe.unwatch()
                    raise NotFound(op.field)
                before[name] = orjson.loads(raw) if raw else None
                after[name] = op.value if isinstance(op, HashSet) else None
                guard[name] = _digest(raw)
            elif isinstance(op, HashReplace):
                raw_hash = await pipe.hgetall(op.key)
                before[op.key] = _summary(_decode_hash(raw_hash))
                after[op.key] = _summary(op.values)
                guard[op.key] = _digest(b"".join(_framed(k, raw_hash[k]) for k in sorted(raw_hash)))
            else:
                count = await pipe.strlen(SCREENING_KEY)
                before[SCREENING_KEY] = {"bytes": count}
                after[SCREENING_KEY] = {"count": len(op.entries)}
                # The screening list can be large: the version that last changed it stands for it.
                rev = await pipe.get(SCREENING_REV_KEY)
                guard[SCREENING_KEY] = None if rev is None and count == 0 else f"rev:{(rev or b'').decode()}:{count}"
        return _strip_prefix(before), _strip_prefix(after), _strip_prefix(guard)

    async def _publish(self, version: int) -> None:
        try:
            await self._bounded("publish", self.client.publish(CHANNEL, str(version)))
        except StoreUnavailable:
            # The poll still converges; a lost announcement only costs one poll interval.
            log.warning("policy version %s written but not announced", version)

    async def read_changes(self, limit: int) -> list[dict[str, Any]]:
        raw = await self._bounded("changes", self.client.xrevrange(CHANGES_KEY, count=limit), self.load_timeout_s)
        return [orjson.loads(fields[b"c"]) for _id, fields in raw]

    async def read_screening_hits(self) -> dict[str, Any] | None:
        """The hits the last screening import found among API keys and partners, or None before any."""
        raw = await self._bounded("admin", self.client.get(SCREENING_HITS_KEY), self.load_timeout_s)
        return dict(orjson.loads(raw)) if raw else None

    async def write_screening_hits(self, document: dict[str, Any]) -> None:
        """Replace the stored hits (derived from the policy, so written outside its versioned writes)."""
        await self._bounded("admin", self.client.set(SCREENING_HITS_KEY, orjson.dumps(document)), self.load_timeout_s)

    async def policy_exists(self) -> bool:
        version, _ = await self.read_version()
        return version is not None

    # --- admin reads ----------------------------------------------------------------------

    async def load_document(self) -> tuple[PolicyData, list[dict[str, Any]]] | None:
        """The whole policy and the screening entries in one MULTI, for ``GET /admin/v1/policy``.

        None when Redis holds no policy. Unlike :meth:`load_policy` (the watcher's
        read, which leaves the large screening list to its own revision check) the
        screening entries belong to the same transaction, so an export is one version.
        """

        async def load() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            _queue_policy_reads(pipe)
            pipe.hgetall(REVOKED_KEY)
            pipe.get(SCREENING_KEY)
            return list(await pipe.execute())

        version, generation, screening_rev, *hashes, revoked, screening = await self._bounded(
            "admin", load(), self.load_timeout_s
        )
        if version is None:
            return None
        count = len(LIST_NAMES)
        lists = {name: _decode_hash(raw) for name, raw in zip(LIST_NAMES, hashes[:count], strict=True)}
        data = PolicyData(
            version=int(version),
            generation=(generation or b"").decode(),
            lists=lists,
            models=_decode_hash(hashes[count]),
            api_keys=_decode_hash(hashes[count + 1]),
            screening_rev=int(screening_rev or 0),
            revoked=_decode_hash(revoked),
        )
        return data, list(orjson.loads(screening)) if screening else []

    async def load_parts(self, parts: Collection[str]) -> PolicyData | None:
        """Only the named parts (list names, ``models``, ``apikeys``; the revocations with ``apikeys``)
        and the heads, in one MULTI, decoded; the other parts are left empty. None when Redis holds no
        policy. For a reader that holds the rest of this version already (an impact preview holds the
        enforced snapshot) and needs only what a write would change.
        """
        named = [part for part in POLICY_PARTS if part in parts]
        with_revoked = APIKEYS_PART in named

        async def load() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            _queue_heads(pipe)
            for part in named:
                pipe.hgetall(PART_KEYS[part])
            if with_revoked:
                pipe.hgetall(REVOKED_KEY)
            return list(await pipe.execute())

        version, generation, screening_rev, *hashes = await self._bounded("admin", load(), self.load_timeout_s)
        if version is None:
            return None
        decoded = {part: _decode_hash(raw) for part, raw in zip(named, hashes, strict=False)}
        return PolicyData(
            version=int(version),
            generation=(generation or b"").decode(),
            lists={name: decoded[name] for name in LIST_NAMES if name in decoded},
            models=decoded.get(MODELS_PART, {}),
            api_keys=decoded.get(APIKEYS_PART, {}),
            screening_rev=int(screening_rev or 0),
            revoked=_decode_hash(hashes[-1]) if with_revoked else {},
        )

    async def read_hash(self, key: str) -> tuple[int, dict[str, dict[str, Any]]] | None:
        """(version, decoded hash) read together, so a whole-list replace is seen whole or not at all.

        None when Redis holds no policy.
        """

        async def load() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(VERSION_KEY)
            pipe.hgetall(key)
            return list(await pipe.execute())

        version, raw = await self._bounded("admin", load(), self.load_timeout_s)
        if version is None:
            return None
        return int(version), _decode_hash(raw)

    # --- pub/sub --------------------------------------------------------------------------

    async def listen(self, on_message: Callable[[], None]) -> None:
        """Call ``on_message`` for each version announcement; returns when the connection drops."""
        if self.is_cluster:
            # The Cluster pub/sub picks its node from the slot map, which a client that has
            # sent no command yet has not read.
            await self.client.initialize()
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            async for message in pubsub.listen():
                # The subscription's confirmation counts too: an announcement made while
                # unsubscribed (a failover, a restart) was lost, so look once on every
                # (re)subscribe instead of waiting for the next poll.
                if message.get("type") in ("message", "subscribe"):
                    on_message()
        finally:
            try:
                await pubsub.aclose()
            except (RedisError, OSError, RuntimeError):  # the connection is gone either way
                pass


def _part_of(op: Op) -> str | None:
    """The policy part a write operation changes (None: the screening list)."""
    return PART_OF_KEY.get(getattr(op, "key", ""))


async def _touched_trims(
    pipe: Any, ops: Sequence[Op], revs: Mapping[str, int], new_version: int
) -> dict[str, tuple[int, int]]:
    """Lists whose change records need a new floor, with the last rank to trim (oldest first; -1:
    none) and that floor: records that would pass ``TOUCHED_CAP`` are trimmed to the highest
    version trimmed; records that are gone though the list changed since its floor (deleted by
    hand, evicted) start again at this write. ``revs``: the stored revisions."""
    adding: dict[str, int] = {}
    for op in ops:
        part = _part_of(op)
        if part in LIST_NAMES and isinstance(op, HashSet | HashDelete):
            adding[part] = adding.get(part, 0) + 1
    trims: dict[str, tuple[int, int]] = {}
    for name, count in adding.items():
        held = await pipe.zcard(touched_key(name))
        changed, floor = revs.get(name), revs.get(floor_field(name))
        if held == 0 and changed is not None and (floor is None or changed > floor):
            trims[name] = (-1, new_version)
            continue
        excess = held + count - TOUCHED_CAP
        if excess > 0:
            last = await pipe.zrange(touched_key(name), excess - 1, excess - 1, withscores=True)
            trims[name] = (excess - 1, int(last[0][1]) if last else 0)
    return trims


def _revisions(raw: Mapping[bytes, bytes], version: int) -> dict[str, int]:
    """The stored part revisions, or {} unless they describe ``version`` and name every part."""
    revs = {key.decode(): int(value) for key, value in raw.items()}
    if revs.get(REVS_AT) != version or any(part not in revs for part in POLICY_PARTS):
        return {}
    return revs


def _read_plan(
    known: KnownRevisions | None,
    generation: str,
    version: int,
    revs: Mapping[str, int],
    touched: Mapping[str, list[bytes]],
) -> tuple[set[str], dict[str, set[bytes]]]:
    """What a reader holding ``known`` must read to be at ``version``: parts to read whole, and for
    lists whose change records (``touched``: entry keys scored above the reader's revision) cover
    the span, the entry keys to read."""
    if known is None or not revs or not known.revs or known.generation != generation:
        return set(POLICY_PARTS), {}
    held_version = known.revs.get(REVS_AT)
    # Entry by entry only forwards, from a copy no older than a list's floor, with records kept by
    # every write since (a writer that keeps none leaves ``delta_at`` behind).
    records_usable = revs.get(DELTA_AT) == version and held_version is not None and held_version < version
    full: set[str] = set()
    entries: dict[str, set[bytes]] = {}
    for part in POLICY_PARTS:
        held, now = known.revs.get(part), revs[part]
        if held == now:
            continue
        floor = revs.get(floor_field(part))
        records = touched.get(part, [])
        # A list that changed has records (the writes keep them); none means they were lost.
        if (
            records_usable
            and records
            and held is not None
            and held < now
            and floor is not None
            and held_version is not None  # implied by records_usable; said again for the type checker
            and floor <= held_version
        ):
            entries[part] = set(records)
        else:
            full.add(part)
    return full, entries


def _decode_entries(name: str, keys: Sequence[bytes], values: Sequence[bytes | None]) -> dict[Any, Any]:
    """HMGET results as a list's entries (None: deleted), decoded as :meth:`Store.load_policy` decodes lists."""
    if name in LAZY_LISTS:
        return dict(zip(keys, values, strict=True))
    return {
        key.decode(): (orjson.loads(value) if value is not None else None)
        for key, value in zip(keys, values, strict=True)
    }


def _queue_policy_reads(pipe: Any) -> None:
    """Queue the reads of a whole policy: heads, the four lists, models, API keys (in that order)."""
    _queue_heads(pipe)
    for key in PART_KEYS.values():  # POLICY_PARTS order
        pipe.hgetall(key)


def _queue_heads(pipe: Any) -> None:
    """Queue reads of version, generation and screening revision on a MULTI pipeline.

    Three GETs rather than one MGET: redis-py's Cluster pipeline refuses MGET, and
    inside MULTI on the ``{gw}`` slot the three are just as atomic.
    """
    pipe.get(VERSION_KEY)
    pipe.get(GENERATION_KEY)
    pipe.get(SCREENING_REV_KEY)


def _strip_prefix(values: dict[str, Any]) -> dict[str, Any]:
    return {key.removeprefix(PREFIX): value for key, value in values.items()}


def _change_dict(change: Change) -> dict[str, Any]:
    return {
        "actor": change.actor,
        "time": change.time,
        "target": change.target,
        "before": change.before,
        "after": change.after,
        "version": change.version,
        "effect": change.effect,
        **change.extra,
    }


def _missing_parts(ops: Sequence[Op]) -> list[str]:
    """The parts a restore leaves out, named as in a policy document (``lists.partners``, ``screening``)."""
    replaced = {op.key for op in ops if isinstance(op, HashReplace)}
    # A later list left out is written empty by the restore (it holds nothing in an empty Redis).
    missing = [f"lists.{name}" for name in LIST_NAMES if list_key(name) not in replaced and name not in LATER_LISTS]
    missing += [name for name, key in (("models", MODELS_KEY), ("api_keys", APIKEYS_KEY)) if key not in replaced]
    if not any(isinstance(op, ScreeningReplace) for op in ops):
        missing.append("screening")
    return missing


async def _resolve(pipe: Any, ops: Sequence[Op]) -> list[PlainOp]:
    """Turn read-modify-write operations into plain ones, reading under the caller's WATCH, and refuse a
    write that would make a revoked key active again. Runs before MULTI; raising leaves Redis as it was."""
    out: list[PlainOp] = []
    revoked: dict[str, dict[str, Any]] | None = None

    async def held_revocations() -> dict[str, dict[str, Any]]:
        nonlocal revoked
        if revoked is None:
            revoked = _decode_hash(await pipe.hgetall(REVOKED_KEY))
        return revoked

    for op in ops:
        if isinstance(op, HashUpdate):
            raw = await pipe.hget(op.key, op.field)
            out.append(HashSet(op.key, op.field, op.update(orjson.loads(raw) if raw else None)))
        elif isinstance(op, KeyRevoke):
            raw = await pipe.hget(APIKEYS_KEY, op.key_id)
            if raw is None:
                raise NotFound(op.key_id)
            record = orjson.loads(raw)
            revocation = {
                "hash": record.get("hash"),
                "subject": record.get("subject"),
                "org": record.get("org"),
                "revoked_at": op.revoked_at,
                "revoked_by": op.revoked_by,
            }
            out += [HashDelete(APIKEYS_KEY, op.key_id), HashSet(REVOKED_KEY, op.key_id, revocation)]
        elif isinstance(op, RevocationsMerge):
            held = await held_revocations()
            replaces_keys = any(isinstance(o, HashReplace) and o.key == APIKEYS_KEY for o in ops)
            for key_id, record in op.records.items():
                if key_id in held:
                    continue  # the record kept first stays: who revoked it and when
                out.append(HashSet(REVOKED_KEY, key_id, record))
                held[key_id] = dict(record)
                if not replaces_keys and await pipe.hexists(APIKEYS_KEY, key_id):
                    out.append(HashDelete(APIKEYS_KEY, key_id))
        else:
            out.append(op)
    writes = [(op.field, op.value) for op in out if isinstance(op, HashSet) and op.key == APIKEYS_KEY]
    writes += [
        item for op in out if isinstance(op, HashReplace) and op.key == APIKEYS_KEY for item in op.values.items()
    ]
    if writes:
        held = await held_revocations()
        by_hash = {record.get("hash"): key_id for key_id, record in held.items() if record.get("hash")}
        for key_id, value in writes:
            if key_id in held:
                raise KeyRevoked(key_id, held[key_id])
            other = by_hash.get(value.get("hash"))
            if other is not None:
                raise KeyRevoked(other, held[other])
    return out
