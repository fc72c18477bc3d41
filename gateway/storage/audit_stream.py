"""The audit stream: idempotent appends of audit records, and the operator's reads of it.

Appends are idempotent per (producer, sequence), see gateway/lua/audit.lua: a batch
whose reply was lost, or a spool replayed twice, lands once. One high-water mark per
producer (gateway process) instead of one key per record keeps Redis memory flat.
A producer appends to one shard (gateway/storage/audit_shards.py); reads merge them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from .audit_shards import AuditShards, Fetch, ShardPage, merged_newest
from .keys import ARCHIVE_GROUP, AUDIT_MARK_TTL_S, audit_key, audit_mark_key, audit_shard

# Records per read of an audit window. One XREVRANGE of 2,000 records holds Redis (and this process's
# loop, reading the reply) for a few milliseconds; one of 10,000 held it for 25 ms or more, during which
# no rate-limit call is answered. The whole window takes as long either way.
AUDIT_PAGE = 2_000


class AuditStream(AuditShards):
    """Appends to and reads of the audit shards; the append runs ``audit.lua`` over redis-py with its own deadline."""

    async def append_audit(
        self,
        producer: str,
        records: Sequence[tuple[int, bytes]],
        *,
        maxlen: int,
        timeout_s: float | None = None,
        archive: bool = False,
        shard: int | None = None,
    ) -> int:
        """Append ``(sequence, record JSON)`` pairs in ascending order; returns how many were new."""
        added, _trimmed = await self.append_audit_counted(
            producer, records, maxlen=maxlen, timeout_s=timeout_s, archive=archive, shard=shard
        )
        return added

    async def append_audit_counted(
        self,
        producer: str,
        records: Sequence[tuple[int, bytes]],
        *,
        maxlen: int,
        timeout_s: float | None = None,
        archive: bool = False,
        shard: int | None = None,
    ) -> tuple[int, int]:
        """As :meth:`append_audit`; returns (records appended, entries trimmed).

        ``archive``: the archiver's consumer group decides what may go; only acknowledged
        (archived) entries are trimmed, whatever ``maxlen`` says. Otherwise every trimmed entry
        went unread. ``shard``: the shard to append to (default: the one the producer's id picks
        among ``audit.shards``; a replayed spool's may differ, see :meth:`audit_shard_of`).
        """
        if not records:
            return 0, 0
        if shard is None:
            shard = audit_shard(producer, self.audit_shards)
        await self._register_audit_shards(shard, timeout_s or self.load_timeout_s)
        source, sha = self._script("audit")
        keys = (audit_key(shard), audit_mark_key(shard, producer))
        args: list[Any] = [maxlen, AUDIT_MARK_TTL_S, producer, ARCHIVE_GROUP if archive else ""]
        for seq, record in records:
            args += (seq, record)

        async def run() -> Any:
            try:
                return await self.client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._load_script(source)
                return await self.client.evalsha(sha, len(keys), *keys, *args)

        added, trimmed = await self._bounded("audit", run(), timeout_s or self.load_timeout_s)
        return int(added), int(trimmed)

    async def read_audit(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records of all shards, newest first."""
        keys = await self.audit_keys()

        def fetch(key: str) -> Fetch[bytes]:
            async def read(high: str, count: int) -> ShardPage[bytes]:
                # Off the hot path (an operator's read): the longer deadline, as for policy reads.
                call = self.client.xrevrange(key, max=high, count=count)
                raw = await self._bounded("audit", call, self.load_timeout_s)
                entries = [(entry_id, fields[b"r"]) for entry_id, fields in raw]
                return ShardPage(entries, len(raw), raw[-1][0] if raw else None)

            return read

        records: list[dict[str, Any]] = []
        async for batch in merged_newest([fetch(key) for key in keys], page=limit, limit=limit):
            records.extend(orjson.loads(record) for record in batch)
        return records

    async def read_audit_window(
        self, since_ms: int, *, limit: int, page: int = AUDIT_PAGE
    ) -> AsyncIterator[list[bytes]]:
        """The records appended since ``since_ms`` (epoch milliseconds, by the stream ids' time),
        newest first over all shards, as stored JSON, in pages of at most ``page``, ``limit`` entries
        in all.

        Each read is one bounded call (``audit_window.lua``: XREVRANGE answered as the records alone)
        that resumes below the last id read, so a long window never holds Redis, or this process, for
        long; records appended meanwhile are not included. With one shard the pages are the reads
        themselves; with several, each read also carries the ids, by which the shards are merged.
        """
        keys = await self.audit_keys()
        low = f"{max(since_ms, 0)}-0"
        if len(keys) == 1:
            async for records in self._window_pages(keys[0], low, limit=limit, page=page):
                yield records
            return

        def fetch(key: str) -> Fetch[bytes]:
            async def read(high: str, count: int) -> ShardPage[bytes]:
                read, last, *flat = await self._window_read(key, high, low, count, with_ids=True)
                entries = list(zip(flat[::2], flat[1::2], strict=True))
                return ShardPage(entries, int(read), last or None)

            return read

        async for batch in merged_newest([fetch(key) for key in keys], page=page, limit=limit):
            if batch:
                yield batch

    async def _window_pages(self, key: str, low: str, *, limit: int, page: int) -> AsyncIterator[list[bytes]]:
        """One shard's window, page by page, as the reads return it."""
        high, left = "+", limit
        while left > 0:
            count = min(page, left)
            read, last, *records = await self._window_read(key, high, low, count, with_ids=False)
            if records:
                yield records
            if int(read) < count:
                return
            left -= int(read)
            high = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    async def _window_read(self, key: str, high: str, low: str, count: int, *, with_ids: bool) -> Any:
        source, sha = self._script("audit_window")
        args = (high, low, count, "1" if with_ids else "")
        try:
            return await self._bounded("audit", self.client.evalsha(sha, 1, key, *args), self.load_timeout_s)
        except NoScriptError:
            await self._load_script(source)
            return await self._bounded("audit", self.client.evalsha(sha, 1, key, *args), self.load_timeout_s)
