"""The audit stream: idempotent appends of audit records, and the operator's reads of it.

Appends are idempotent per (producer, sequence), see gateway/lua/audit.lua: a batch
whose reply was lost, or a spool replayed twice, lands once. One high-water mark per
producer (gateway process) instead of one key per record keeps Redis memory flat.
A script call's records go as the few stream entries they fill (up to 256 records each, packed
here, gateway/storage/audit_entries.py), so Redis runs a few commands per call, not one per record;
the shard is capped by records, not entries (gateway/lua/audit_trim.lua).
A producer appends to one shard (gateway/storage/audit_shards.py); reads merge them all.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from .audit_entries import pack_entries, trim_slack
from .audit_shards import AuditShards
from .keys import ARCHIVE_GROUP, AUDIT_MARK_TTL_S, audit_counts_key, audit_key, audit_mark_key, audit_shard

# Records per read of an audit window. One read of 2,000 records holds Redis (and this process's
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
        """As :meth:`append_audit`; returns (records appended, records trimmed).

        ``archive``: the archiver's consumer group decides what may go; only acknowledged
        (archived) entries are trimmed, whatever ``maxlen`` says. Otherwise every trimmed record
        went unread. ``shard``: the shard to append to (default: the one the producer's id picks
        among ``audit.shards``; a replayed spool's may differ, see :meth:`audit_shard_of`).
        """
        if not records:
            return 0, 0
        if shard is None:
            shard = audit_shard(producer, self.audit_shards)
        await self._register_audit_shards(shard, timeout_s or self.load_timeout_s)
        source, sha = self._script("audit")
        keys = (audit_key(shard), audit_mark_key(shard, producer), audit_counts_key(shard))
        args: list[Any] = [maxlen, AUDIT_MARK_TTL_S, producer, ARCHIVE_GROUP if archive else "", trim_slack(maxlen)]
        for first, count, payload in pack_entries(records):
            args += (first, count, payload)

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
        records: list[dict[str, Any]] = []
        async for batch in self.read_audit_records("+", "-", limit=limit, page=limit):
            records.extend(orjson.loads(record) for record in batch)
        return records

    async def read_audit_window(
        self, since_ms: int, *, limit: int, page: int = AUDIT_PAGE
    ) -> AsyncGenerator[list[bytes]]:
        """The records appended since ``since_ms`` (epoch milliseconds, by the stream ids' time),
        newest first over all shards, as stored JSON, in pages of about ``page`` records, ``limit`` in
        all (see :meth:`read_audit_records`)."""
        async for records in self.read_audit_records("+", f"{max(since_ms, 0)}-0", limit=limit, page=page):
            yield records
