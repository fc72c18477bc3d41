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
from contextlib import aclosing
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Generic, TypeVar

from redis.exceptions import NoScriptError

from .audit_entries import unpacked
from .keys import AUDIT_SHARDS_KEY, AUDIT_SHARDS_MAX, audit_counts_key, audit_key, audit_mark_key, audit_shard
from .scripts import Scripts

T = TypeVar("T")

# An entry's place in the merged order, ascending: its stream id negated (milliseconds, sequence:
# newest first), then its shard (of two entries with the same id in two shards, the lower shard's
# comes first). Unique across the shards.
EntryKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class ShardPage(Generic[T]):
    """One read of one shard, newest first: (entry id, value) pairs (several of one entry: its
    records), how many the read covered (an entry may yield no value), the id of the oldest entry
    read (None: none read), and whether the read reached the end of the range."""

    entries: list[tuple[bytes | str, T]]
    read: int
    last: bytes | str | None
    ended: bool = False


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
        if page.ended or page.read < count or page.last is None:
            self.done = True
        if page.last is not None:
            self.high = "(" + _text(page.last)
        self.buffered = [(entry_key(entry_id, self.shard), value) for entry_id, value in page.entries]


async def merged_newest(fetches: Sequence[Fetch[T]], *, page: int, limit: int) -> AsyncGenerator[list[T]]:
    """The shards' values (records) as one stream, newest first, in batches; ``limit`` in all.

    Each shard is read about ``page`` values at a time (all shards due a read at once). A batch holds
    what certainly comes before anything not yet read: every buffered value up to the newest of the
    shards' oldest buffered entries (a shard read to its end bounds nothing). The shard that set that
    bound is then empty and read next, so each batch empties at least one shard's page. The values of
    one entry share its place, and keep their order (the sort is stable).
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

    async def read_audit_records(self, high: str, low: str, *, limit: int, page: int) -> AsyncGenerator[list[bytes]]:
        """The records of all shards with stream ids from ``high`` ("+" or an id) down to ``low``
        ("-" or an id), newest first, as stored JSON, ``limit`` in all.

        Each read is one bounded call (``audit_window.lua``: whole entries, about ``page`` records,
        answered as the records alone) that resumes below the last entry read, so a long window never
        holds Redis, or this process, for long; records appended meanwhile are not included. A page
        may pass ``page`` by the rest of its last batch entry. With one shard the pages are the reads
        themselves; with several, each read also carries the entries' ids, by which the shards are
        merged (the records of one entry stay together, newest first).
        """
        keys = await self.audit_keys()
        if len(keys) == 1:
            async with aclosing(self._shard_pages(keys[0], high, low, limit=limit, page=page)) as pages:
                async for records in pages:
                    yield records
            return

        def fetch(key: str) -> Fetch[bytes]:
            async def read(top: str, count: int) -> ShardPage[bytes]:
                read, last, ended, *flat = await self._window_read(key, high if top == "+" else top, low, count, True)
                entries = [
                    (entry_id, record)
                    for entry_id, size, payload in zip(flat[::3], flat[1::3], flat[2::3], strict=True)
                    for record in reversed(unpacked(int(size), payload))
                ]
                return ShardPage(entries, int(read), last or None, ended=bool(ended))

            return read

        async with aclosing(merged_newest([fetch(key) for key in keys], page=page, limit=limit)) as batches:
            async for batch in batches:
                if batch:
                    yield batch

    async def _shard_pages(
        self, key: str, high: str, low: str, *, limit: int, page: int
    ) -> AsyncGenerator[list[bytes]]:
        """One shard's records, page by page, as the reads return them."""
        left = limit
        while left > 0:
            count = min(page, left)
            _read, last, ended, *flat = await self._window_read(key, high, low, count, False)
            records = [
                record
                for size, payload in zip(flat[::2], flat[1::2], strict=True)
                for record in reversed(unpacked(int(size), payload))
            ][:left]
            if records:
                yield records
            left -= len(records)
            if ended or not last:
                return
            high = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    async def _window_read(self, key: str, high: str, low: str, count: int, with_ids: bool) -> Any:
        source, sha = self._script("audit_window")
        args = (high, low, count, "1" if with_ids else "")
        try:
            return await self._bounded("audit", self.client.evalsha(sha, 1, key, *args), self.load_timeout_s)
        except NoScriptError:
            await self._load_script(source)
            return await self._bounded("audit", self.client.evalsha(sha, 1, key, *args), self.load_timeout_s)

    async def audit_length(self) -> int:
        """Records in all the audit shards: each shard's counts (``audit_trim.lua``) and any entries
        appended beyond them, or its entries where it has none (a stream only older gateways appended
        to holds one record per entry)."""
        keys = await self.audit_keys()

        async def held(shard: int) -> int:
            key = audit_key(shard)
            counts = self.client.hmget(audit_counts_key(shard), ["appended", "trimmed", "entries"])
            appended, trimmed, entries = await self._bounded("audit", counts, self.policy_timeout_s)
            length = int(await self._bounded("audit", self.client.xlen(key), self.policy_timeout_s))
            if appended is None or length == 0:
                return length
            # Entries beyond those counted: an older gateway's single records, one each.
            foreign = max(length - int(entries), 0) if entries is not None else 0
            return max(int(appended) - int(trimmed or 0) + foreign, length)

        return sum(await asyncio.gather(*(held(shard) for shard in range(len(keys)))))

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
