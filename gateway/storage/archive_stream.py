"""The archiver's side of the audit and change streams: a consumer group, acknowledgements, the backlog.

The archiver reads every audit shard (``gw:audit``, ``gw:audit:<shard>``) and ``{gw}:changes``
through the consumer group :data:`~gateway.storage.keys.ARCHIVE_GROUP`, one group per stream. An
entry it has made durable is acknowledged and may then be trimmed (``gateway/lua/archive_ack.lua``);
one it has not is never trimmed while archiving is on (``gateway/lua/audit.lua``). The group's
pending list is what makes a restart resume where a killed archiver stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .audit_entries import entry_records, trim_slack
from .audit_shards import AuditShards
from .clients import StoreUnavailable
from .keys import ARCHIVE_GROUP, AUDIT_KEY, audit_counts_key, audit_key

ACK_CHUNK = 1000  # entry ids per script call: far below Lua's unpack limit


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry as read: its id, and its records' payloads, oldest first (one for a change
    or a single-record audit entry, a batch entry's records; None: the entry is gone from the stream)."""

    id: str
    payloads: list[bytes] | None

    @property
    def records(self) -> int:
        return len(self.payloads or ())


def _audit_shard_of_key(key: str) -> int | None:
    """The audit shard a stream key names (``gw:audit``: 0, ``gw:audit:<shard>``); None for another key."""
    if key == AUDIT_KEY:
        return 0
    prefix, _, shard = key.rpartition(":")
    return int(shard) if prefix == AUDIT_KEY and shard.isdigit() else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ArchiveStream(AuditShards):
    """Consumer-group reads, acknowledgements and backlog of an archived stream."""

    async def ensure_archive_group(self, key: str) -> None:
        """Create the group at the stream's start (everything in Redis is still to be archived)."""
        try:
            await self._bounded("archive", self.client.xgroup_create(key, ARCHIVE_GROUP, id="0", mkstream=True))
        except StoreUnavailable as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists already: nothing to do
                raise

    async def read_archive_batch(
        self, key: str, field: bytes | None, consumer: str, count: int, *, after: str | None
    ) -> list[StreamEntry]:
        """Entries delivered to ``consumer`` before but not acknowledged, with ids past ``after``; with
        ``after`` None, entries never delivered. Oldest first. ``field``: the payload field; None for
        an audit shard, whose entries are batches or single records (gateway/storage/audit_entries.py)."""
        reply = await self._bounded(
            "archive",
            self.client.xreadgroup(ARCHIVE_GROUP, consumer, {key: after if after is not None else ">"}, count=count),
            self.load_timeout_s,
        )
        entries: list[StreamEntry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                if not fields:
                    entries.append(StreamEntry(_text(entry_id), None))
                elif field is None:
                    entries.append(StreamEntry(_text(entry_id), entry_records(fields)))
                else:
                    payload = fields.get(field)
                    entries.append(StreamEntry(_text(entry_id), None if payload is None else [payload]))
        return entries

    async def ack_archived(
        self, key: str, ids: Sequence[str], *, keep: int, counts: str | None = None
    ) -> tuple[int, int]:
        """Acknowledge archived entries and trim acknowledged ones beyond the newest ``keep`` records
        (``counts``: an audit shard's record counts key) or entries (without: the change history).

        Returns (entries acknowledged, records or entries trimmed).
        """
        acked = trimmed = 0
        keys = (key,) if counts is None else (key, counts)
        chunks = [ids[i : i + ACK_CHUNK] for i in range(0, len(ids), ACK_CHUNK)] or [[]]
        for chunk in chunks:
            reply = await self.run_script(
                "archive_ack", keys, (ARCHIVE_GROUP, keep, trim_slack(keep), *chunk), timeout_s=self.load_timeout_s
            )
            acked += int(reply[0])
            trimmed += int(reply[1])
        return acked, trimmed

    async def archive_backlog(self, key: str) -> int:
        """Records not yet archived; an audit shard's by :meth:`audit_shard_backlog`, the change
        history's entries (one record each)."""
        shard = _audit_shard_of_key(key)
        if shard is not None:
            return await self.audit_shard_backlog(shard)
        return await self.entry_backlog(key)

    async def audit_shard_backlog(self, shard: int) -> int:
        """An audit shard's records not yet archived (``audit_backlog.lua``: by the batch entries'
        running totals); where the totals cannot say (an older gateway's single-record entry at either
        end of the backlog), its entries, each counted as one record."""
        key = audit_key(shard)
        records = await self.run_script(
            "audit_backlog", (key, audit_counts_key(shard)), (ARCHIVE_GROUP,), timeout_s=self.policy_timeout_s
        )
        return int(records) if int(records) >= 0 else await self.entry_backlog(key)

    async def entry_backlog(self, key: str) -> int:
        """Entries not yet archived: undelivered plus delivered-unacknowledged; the whole stream when
        the archiver has never run (no group)."""
        length = int(await self._bounded("archive", self.client.xlen(key), self.policy_timeout_s))
        if not await self._bounded("archive", self.client.exists(key), self.policy_timeout_s):
            return 0
        groups = await self._bounded("archive", self.client.xinfo_groups(key), self.policy_timeout_s)
        for group in groups:
            if _text(group.get("name")) != ARCHIVE_GROUP:
                continue
            lag = group.get("lag")
            if lag is None:
                # Redis cannot say (an entry deleted inside the unread range): the stream length
                # is an upper bound, and the alert errs on the side of firing.
                return length
            return int(lag) + int(group.get("pending") or 0)
        return length

    async def audit_backlog(self) -> int:
        """Audit records not yet archived, summed over the shards."""
        keys = await self.audit_keys()
        return sum(await asyncio.gather(*(self.audit_shard_backlog(shard) for shard in range(len(keys)))))
