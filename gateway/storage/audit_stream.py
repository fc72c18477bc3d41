"""The audit stream: idempotent appends of audit records, and the operator's reads of it.

Appends are idempotent per (producer, sequence), see gateway/lua/audit.lua: a batch
whose reply was lost, or a spool replayed twice, lands once. One high-water mark per
producer (gateway process) instead of one key per record keeps Redis memory flat.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from .keys import ARCHIVE_GROUP, AUDIT_KEY, AUDIT_MARK_PREFIX, AUDIT_MARK_TTL_S
from .scripts import Scripts

# Records per read of an audit window. One XREVRANGE of 2,000 records holds Redis (and this process's
# loop, reading the reply) for a few milliseconds; one of 10,000 held it for 25 ms or more, during which
# no rate-limit call is answered. The whole window takes as long either way.
AUDIT_PAGE = 2_000


class AuditStream(Scripts):
    """Appends to and reads of ``gw:audit``; the append runs ``audit.lua`` over redis-py with its own deadline."""

    async def append_audit(
        self,
        producer: str,
        records: Sequence[tuple[int, bytes]],
        *,
        maxlen: int,
        timeout_s: float | None = None,
        archive: bool = False,
    ) -> int:
        """Append ``(sequence, record JSON)`` pairs in ascending order; returns how many were new."""
        added, _trimmed = await self.append_audit_counted(
            producer, records, maxlen=maxlen, timeout_s=timeout_s, archive=archive
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
    ) -> tuple[int, int]:
        """As :meth:`append_audit`; returns (records appended, entries trimmed).

        ``archive``: the archiver's consumer group decides what may go; only acknowledged
        (archived) entries are trimmed, whatever ``maxlen`` says. Otherwise every trimmed entry
        went unread.
        """
        if not records:
            return 0, 0
        source, sha = self._script("audit")
        keys = (AUDIT_KEY, AUDIT_MARK_PREFIX + producer)
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
        # Off the hot path (an operator's read): the longer deadline, as for policy reads.
        raw = await self._bounded("audit", self.client.xrevrange(AUDIT_KEY, count=limit), self.load_timeout_s)
        return [orjson.loads(fields[b"r"]) for _id, fields in raw]

    async def read_audit_window(
        self, since_ms: int, *, limit: int, page: int = AUDIT_PAGE
    ) -> AsyncIterator[list[bytes]]:
        """The records appended since ``since_ms`` (epoch milliseconds, by the stream ids' time),
        newest first, as stored JSON, in pages of at most ``page``, ``limit`` entries in all.

        Each page is one bounded call (``audit_window.lua``: XREVRANGE answered as the records alone)
        that resumes below the last id read, so a long window never holds Redis, or this process, for
        long; records appended meanwhile are not included.
        """
        source, sha = self._script("audit_window")
        high, low = "+", f"{max(since_ms, 0)}-0"
        left = limit
        while left > 0:
            count = min(page, left)

            async def run(args: tuple[str, str, int] = (high, low, count)) -> Any:
                try:
                    return await self.client.evalsha(sha, 1, AUDIT_KEY, *args)
                except NoScriptError:
                    await self._load_script(source)
                    return await self.client.evalsha(sha, 1, AUDIT_KEY, *args)

            read, last, *records = await self._bounded("audit", run(), self.load_timeout_s)
            if records:
                yield records
            if int(read) < count:
                return
            left -= int(read)
            high = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    async def audit_length(self) -> int:
        return int(await self._bounded("audit", self.client.xlen(AUDIT_KEY), self.policy_timeout_s))
