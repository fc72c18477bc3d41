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

from .audit_shards import AuditShards
from .clients import StoreUnavailable
from .keys import ARCHIVE_GROUP

ACK_CHUNK = 1000  # entry ids per script call: far below Lua's unpack limit


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry as read: its id, and its payload (None: the entry is gone from the stream)."""

    id: str
    payload: bytes | None


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
        self, key: str, field: bytes, consumer: str, count: int, *, after: str | None
    ) -> list[StreamEntry]:
        """Entries delivered to ``consumer`` before but not acknowledged, with ids past ``after``; with
        ``after`` None, entries never delivered. Oldest first."""
        reply = await self._bounded(
            "archive",
            self.client.xreadgroup(ARCHIVE_GROUP, consumer, {key: after if after is not None else ">"}, count=count),
            self.load_timeout_s,
        )
        entries: list[StreamEntry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append(StreamEntry(_text(entry_id), fields.get(field) if fields else None))
        return entries

    async def ack_archived(self, key: str, ids: Sequence[str], *, keep: int) -> tuple[int, int]:
        """Acknowledge archived entries and trim acknowledged ones beyond the newest ``keep``.

        Returns (acknowledged, trimmed).
        """
        acked = trimmed = 0
        chunks = [ids[i : i + ACK_CHUNK] for i in range(0, len(ids), ACK_CHUNK)] or [[]]
        for chunk in chunks:
            reply = await self.run_script(
                "archive_ack", (key,), (ARCHIVE_GROUP, keep, *chunk), timeout_s=self.load_timeout_s
            )
            acked += int(reply[0])
            trimmed += int(reply[1])
        return acked, trimmed

    async def archive_backlog(self, key: str) -> int:
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
        return sum(await asyncio.gather(*(self.archive_backlog(key) for key in keys)))
