"""Filtered reads of the audit stream for the operator (``GET /admin/v1/audit?subject=...``).

Redis cannot filter a stream by field, so the read walks it newest first in chunks, within the
stream-id range the time bounds allow, keeping what matches, until it has ``limit`` records or has
looked at ``scan_cap`` records: an operator's question never holds Redis or the admin listener for
long. All the audit shards are walked together, merged newest first by stream id. The archive
(``gateway audit query``) answers questions about anything older.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson

from .audit_shards import AuditShards

CHUNK = 1000
# A record is appended to the stream after its decision (batched, or later from a spool): its
# stream id is at or after its time, and usually within this much of it.
APPEND_SLACK_MS = 300_000


@dataclass(frozen=True, slots=True)
class AuditPage:
    records: list[dict[str, Any]]
    scanned: int
    complete: bool  # False: stopped at the scan cap, older matches may exist


class AuditSearch(AuditShards):
    async def search_audit(
        self,
        limit: int,
        match: Callable[[dict[str, Any]], bool],
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        scan_cap: int = 200_000,
    ) -> AuditPage:
        """Matching records newest first; ids searched from ``since_ms`` (minus a minute for clocks)
        to ``until_ms`` plus :data:`APPEND_SLACK_MS`."""
        # Stream ids are milliseconds since 1970: a bound before that is the stream's start.
        high = "+" if until_ms is None else str(max(until_ms + APPEND_SLACK_MS, 0))
        low = "-" if since_ms is None else str(max(since_ms - 60_000, 0))
        records: list[dict[str, Any]] = []
        scanned = 0
        batches = self.read_audit_records(high, low, limit=scan_cap, page=CHUNK)
        async with aclosing(batches):
            async for batch in batches:
                scanned += len(batch)
                for raw_record in batch:
                    record = orjson.loads(raw_record)
                    if match(record):
                        records.append(record)
                        if len(records) == limit:
                            return AuditPage(records, scanned, True)
        return AuditPage(records, scanned, scanned < scan_cap)
