"""The audit stream's shards: how many there are to read, and reading them as one stream.

Each gateway process appends to one shard (``audit.shards``; the hash of its producer id picks
which, :func:`~gateway.storage.keys.audit_shard`), so on Redis Cluster the audit work spreads
over the primaries instead of landing on the one holding ``gw:audit``. Every reader reads all the
shards and merges them newest first by stream id, as if they were one stream.

How many shards there are to read: this process's ``audit.shards``, or more when a gateway ever
appended with more (``gw:audit-shards``, the set of counts above 1 that gateways appended with).
Lowering ``audit.shards`` thus leaves the higher shards read and archived, never hidden.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Generic, TypeVar

from .keys import AUDIT_SHARDS_KEY, AUDIT_SHARDS_MAX, audit_key, audit_mark_key, audit_shard
from .scripts import Scripts

T = TypeVar("T")

# An entry's place in the merged order, ascending: its stream id negated (milliseconds, sequence:
# newest first), then its shard (of two entries with the same id in two shards, the lower shard's
# comes first). Unique across the shards.
EntryKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class ShardPage(Generic[T]):
    """One read of one shard, newest first: (entry id, value) pairs, how many entries the read
    covered (an entry may yield no value), and the id of the oldest one (None: none read)."""

    entries: list[tuple[bytes | str, T]]
    read: int
    last: bytes | str | None


# Reads up to ``count`` entries of one shard at or below ``high`` ("+", or "(<id>" to resume below
# an id already read), newest first.
Fetch = Callable[[str, int], Awaitable[ShardPage[T]]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_key(entry_id: bytes | str, shard: int) -> EntryKey:
    ms, _, seq = _text(entry_id).partition("-")
    return -int(ms), -int(seq or 0), shard


@dataclass(slots=True)
class _Cursor(Generic[T]):
    shard: int
    fetch: Fetch[T]
    high: str = "+"
    buffered: list[tuple[EntryKey, T]] = field(default_factory=list)  # in merged order (newest first)
    done: bool = False

    async def refill(self, count: int) -> None:
        page = await self.fetch(self.high, count)
        if page.read < count or page.last is None:
            self.done = True
        if page.last is not None:
            self.high = "(" + _text(page.last)
        self.buffered = [(entry_key(entry_id, self.shard), value) for entry_id, value in page.entries]


async def merged_newest(fetches: Sequence[Fetch[T]], *, page: int, limit: int) -> AsyncGenerator[list[T]]:
    """The shards' entries as one stream, newest first, in batches; ``limit`` entries in all.

    Each shard is read ``page`` entries at a time (all shards due a read at once). A batch holds what
    certainly comes before anything not yet read: every buffered entry up to the newest of the
    shards' oldest buffered entries (a shard read to its end bounds nothing). The shard that set that
    bound is then empty and read next, so each batch empties at least one shard's page.
    """
    cursors = [_Cursor(shard, fetch) for shard, fetch in enumerate(fetches)]
    left = limit
    while left > 0:
        count = min(page, left)
        hungry = [c for c in cursors if not c.done and not c.buffered]
        if hungry:
            await asyncio.gather(*(c.refill(count) for c in hungry))
        live = [c for c in cursors if c.buffered]
        if not live:
            return
        open_ends = [c.buffered[-1][0] for c in live if not c.done]
        bound = min(open_ends) if open_ends else None
        ready: list[tuple[EntryKey, T]] = []
        for cursor in live:
            buffered = cursor.buffered
            cut = len(buffered) if bound is None else bisect_right(buffered, bound, key=itemgetter(0))
            ready.extend(buffered[:cut])
            cursor.buffered = buffered[cut:]
        # Each shard's part is already in order: a merge of sorted runs.
        ready.sort(key=itemgetter(0))
        batch = [value for _key, value in ready[:left]]
        left -= len(batch)
        yield batch


class AuditShards(Scripts):
    """How many audit shards this store appends with and reads; the part every audit reader shares."""

    # ``audit.shards`` of the gateway this store serves; Store.from_url sets it.
    audit_shards: int = 1
    # The largest shard count this store has entered in ``gw:audit-shards`` (once per process).
    _audit_registered: int = 1

    async def audit_shard_count(self) -> int:
        """The shards to read: ``audit.shards``, or the most any gateway appended with."""
        members = await self._bounded("audit", self.client.smembers(AUDIT_SHARDS_KEY), self.policy_timeout_s)
        counts = [int(m) for m in members or () if _text(m).isdigit()]
        return min(max([self.audit_shards, *counts]), AUDIT_SHARDS_MAX)

    async def audit_keys(self) -> list[str]:
        """Every audit shard's stream key, shard 0 (``gw:audit``) first."""
        return [audit_key(shard) for shard in range(await self.audit_shard_count())]

    async def _register_audit_shards(self, shard: int, timeout_s: float) -> None:
        """Before the first append past shard 0: enter the shard count (``audit.shards``, at least
        ``shard`` + 1) in ``gw:audit-shards``, once per process, so every reader reads that far."""
        count = max(self.audit_shards, shard + 1)
        if count > self._audit_registered:
            await self._bounded("audit", self.client.sadd(AUDIT_SHARDS_KEY, count), timeout_s)
            self._audit_registered = count

    async def audit_length(self) -> int:
        """Entries in all the audit shards."""
        keys = await self.audit_keys()
        lengths = await asyncio.gather(
            *(self._bounded("audit", self.client.xlen(key), self.policy_timeout_s) for key in keys)
        )
        return sum(int(length) for length in lengths)

    async def audit_shard_of(self, producer: str, shards: int) -> int:
        """The shard a producer's records go to: the one holding its mark, else the one its hash
        picks among ``shards``.

        The mark decides for a spool replayed after ``audit.shards`` changed: what its stopped
        producer appended before must stay where its mark can skip it. (Two marks: the highest.)
        """
        marked = max(shards, await self.audit_shard_count())
        if marked > 1:
            keys = [audit_mark_key(shard, producer) for shard in range(marked)]
            # The marks live in their shards' slots: on a Cluster one read per node, not one MGET.
            read: Any = self.client.mget_nonatomic(keys) if self.is_cluster else self.client.mget(keys)
            marks = [int(value or 0) for value in await self._bounded("audit", read, self.policy_timeout_s)]
            if max(marks):
                return marks.index(max(marks))
        return audit_shard(producer, shards)
