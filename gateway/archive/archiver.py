"""``gateway audit archive``: move the audit shards and ``{gw}:changes`` into the archive, each record once.

Each audit shard (``gw:audit``, ``gw:audit:<shard>``) is its own stream with its own chain
(``audit``, ``audit-<shard>``): as many shards as the config's ``audit.shards`` or as gateways
appended to (``gw:audit-shards``, checked again every :data:`SHARD_CHECK_S`), so shards added while
the archiver runs are archived too.

One round per stream: read through the consumer group (first what was delivered before and never
acknowledged, i.e. what a killed archiver left, then new entries), write a segment and the
manifest durably, and only then acknowledge and trim. Records are buffered into segments of about
``segment_records`` or ``segment_seconds`` of waiting, whichever comes first; a segment never
spans two UTC days. An audit entry may hold a batch of records (gateway/storage/audit_entries.py):
each record gets its own ``seq`` and chain link, in order, and a segment ends on an entry boundary
(it may pass ``segment_records`` by less than one entry), so the chain head's stream id says which
entries are archived, whole.

Exactly once across a kill at any point:

- killed before the segment's rename: the temporary file is deleted at the next start and the
  entries, still pending in the group, are read and written again;
- killed after the rename, before the manifest: the start finds the newest segment past the
  manifest, checks it continues the chain, writes its query index if that is missing, and
  brings the manifest up to it;
- killed after the manifest, before the acknowledgement: the entries come back as pending, but
  their Redis ids are at or below the chain head's ``stream_id``; they are acknowledged, not
  written again.

``GATEWAY_ARCHIVE_CRASH_AT=<point>:<n>`` (``tmp``, ``segment``, ``index``, ``manifest`` or ``ack``) makes the
process SIGKILL itself the n-th time it reaches that point: the fault-injection hook of the
crash-safety tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..storage.archive_stream import StreamEntry
from ..storage.audit_entries import ENTRY_RECORDS
from ..storage.clients import StoreUnavailable
from ..storage.keys import CHANGES_KEY, CHANGES_MAXLEN, audit_counts_key, audit_key
from ..storage.store import Store
from . import segments as seg
from .columns import write_index
from .segments import ArchiveError, Head, audit_stream_name, stream_kind
from .verify import Chain, ChainBroken

log = logging.getLogger("gateway.archive")

CONSUMER = "archiver"
READ_COUNT = 5000
CRASH_ENV = "GATEWAY_ARCHIVE_CRASH_AT"
LOCK_NAME = ".archiver.lock"
SHARD_CHECK_S = 10.0  # how often the running archiver asks whether gateways append to more audit shards


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """An archived stream: its directory name, Redis key, payload field (None: an audit shard's entries,
    batches or single records), how many to keep in Redis (records, or entries without ``counts``), and
    an audit shard's record counts key."""

    name: str
    key: str
    field: bytes | None
    keep: int
    counts: str | None = None


def audit_spec(shard: int, keep: int) -> StreamSpec:
    return StreamSpec(audit_stream_name(shard), audit_key(shard), None, keep, audit_counts_key(shard))


def stream_specs(audit_keep: int, shards: int = 1) -> tuple[StreamSpec, ...]:
    """The audit shards 0..``shards``-1, each keeping ``audit_keep`` records in Redis, and the changes."""
    return (
        *(audit_spec(shard, audit_keep) for shard in range(shards)),
        StreamSpec("changes", CHANGES_KEY, b"c", CHANGES_MAXLEN),
    )


def recover(root: Path, stream: str) -> Head:
    """The chain head a (re)start continues from; completes a manifest a kill left one segment behind.

    ArchiveError when manifest and segments disagree in a way no kill can cause (run verify).
    """
    stream_dir = root / stream
    if not stream_dir.is_dir():
        return Head()
    removed = seg.remove_temporaries(stream_dir)
    if removed:
        log.info("removed %d half-written file(s) of a stopped archiver", removed, extra={"stream": stream})
    manifest = seg.read_manifest(stream_dir)
    base = manifest or Head()
    last = seg.last_segment(stream_dir)
    if last is None:
        if base.seq:
            raise ArchiveError(f"{stream}: the manifest says {base.seq} records, but there is no segment")
        return base
    if last.last == base.seq:
        _ensure_index(last.path, stream)
        return base
    if last.first != base.seq + 1:
        raise ArchiveError(
            f"{stream}: the manifest ends at seq {base.seq}, the newest segment {last.relative(root)} "
            f"does not follow it; run `gateway audit verify`"
        )
    chain = Chain(stream, root, head=dataclasses.replace(base))
    try:
        chain.read(last)
    except ChainBroken as exc:
        raise ArchiveError(f"the newest segment does not continue the chain: {exc}") from exc
    _ensure_index(last.path, stream)
    seg.write_manifest(stream_dir, stream, chain.head)
    log.info("manifest brought up to the newest segment", extra={"stream": stream, "records": chain.head.seq})
    return chain.head


def _ensure_index(segment: Path, stream: str) -> None:
    """A kill between a segment's rename and its index's leaves the index to write."""
    if not seg.index_path(segment).exists():
        write_index(segment, stream)


class CrashHook:
    """``GATEWAY_ARCHIVE_CRASH_AT``: SIGKILL this process the n-th time a named point is reached."""

    def __init__(self, spec: str | None) -> None:
        self.point, self.remaining = "", 0
        if spec:
            point, _, count = spec.partition(":")
            self.point, self.remaining = point, int(count or 1)

    def __call__(self, point: str) -> None:
        if point == self.point:
            self.remaining -= 1
            if self.remaining <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


@dataclass(slots=True)
class _Buffer:
    entries: list[StreamEntry] = field(default_factory=list)
    records: int = 0
    since: float = 0.0
    pending_after: str | None = "0"  # the pending list is read first, from its start


class Archiver:
    def __init__(
        self,
        store: Store,
        root: Path,
        specs: tuple[StreamSpec, ...],
        *,
        segment_records: int = 100_000,
        segment_seconds: float = 60.0,
        poll_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.root = root
        self.specs = specs
        self.segment_records = segment_records
        self.segment_seconds = segment_seconds
        self.poll_s = poll_s
        self.monotonic = monotonic
        self.heads: dict[str, Head] = {}
        self.buffers = {spec.name: _Buffer() for spec in specs}
        self.archived = 0
        self.crash = CrashHook(os.environ.get(CRASH_ENV))
        self._lock_fd: int | None = None
        self._next_shard_check = 0.0

    def open(self) -> None:
        """Lock the directory (one archiver per archive) and find each chain's head."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ArchiveError(f"{self.root}: another archiver is running on this directory") from exc
        self._lock_fd = fd
        for spec in self.specs:
            self.heads[spec.name] = recover(self.root, spec.name)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def run(self, *, once: bool, stop: asyncio.Event | None = None) -> int:
        """Archive until ``stop`` (or, ``once``, until both streams are drained); returns records archived."""
        stop = stop or asyncio.Event()
        ready = False
        while not stop.is_set():
            try:
                if not ready or self.monotonic() >= self._next_shard_check:
                    await self._add_shards()
                if not ready:
                    for spec in self.specs:
                        await self.store.ensure_archive_group(spec.key)
                    ready = True
                read = 0
                for spec in self.specs:
                    read += await self.round(spec, final=once)
            except StoreUnavailable as exc:
                if once:
                    raise
                self._redis_gone(exc)
                read = 0
            if once and read == 0:
                break
            if read == 0:
                try:
                    await asyncio.wait_for(stop.wait(), self.poll_s)
                except TimeoutError:
                    pass
        try:
            for spec in self.specs:  # a stop writes what was read: it is then durable, not re-read
                await self.flush(spec)
        except StoreUnavailable as exc:
            log.warning("stopping with Redis away; the next start acknowledges what was written (%s)", exc)
        return self.archived

    async def _add_shards(self) -> None:
        """Archive every audit shard gateways append to; a shard new since the start gets its chain
        (continued, should its directory exist) and its consumer group."""
        self._next_shard_check = self.monotonic() + SHARD_CHECK_S
        keeps = [spec.keep for spec in self.specs if stream_kind(spec.name) == "audit"]
        if not keeps:
            return  # an archiver of other streams only
        known = {spec.key for spec in self.specs}
        for shard in range(await self.store.audit_shard_count()):
            spec = audit_spec(shard, keeps[0])
            if spec.key in known:
                continue
            self.heads[spec.name] = recover(self.root, spec.name)
            self.buffers[spec.name] = _Buffer()
            await self.store.ensure_archive_group(spec.key)
            self.specs = (*self.specs, spec)
            log.info("archiving another audit shard", extra={"stream": spec.name, "key": spec.key})

    def _redis_gone(self, exc: StoreUnavailable) -> None:
        """Redis failed mid-round: start over from the pending list, as a restart would.

        What was written is not written again (its ids are at or below the chain head) but is
        acknowledged when Redis is back; what was read and not written is read again.
        """
        log.warning("Redis unavailable; retrying every %.1f s (%s)", self.poll_s, exc)
        for buffer in self.buffers.values():
            buffer.entries, buffer.records = [], 0
            buffer.pending_after = "0"

    async def round(self, spec: StreamSpec, *, final: bool) -> int:
        """Read what is there (up to a segment's worth) and write a segment when one is due.

        A segment ends on an entry boundary: reads ask for as many entries as could hold what the
        segment still lacks were each a full batch entry, so a segment passes ``segment_records`` by
        less than one entry's records.
        """
        buffer = self.buffers[spec.name]
        read = 0
        per_entry = 1 if spec.counts is None else ENTRY_RECORDS
        while buffer.records < self.segment_records:
            count = min(READ_COUNT, -(-(self.segment_records - buffer.records) // per_entry))
            pending = buffer.pending_after is not None
            got = await self.store.read_archive_batch(
                spec.key, spec.field, CONSUMER, count, after=buffer.pending_after if pending else None
            )
            if not got:
                if pending:
                    buffer.pending_after = None  # pending list done: new entries next
                    continue
                break
            if pending:
                buffer.pending_after = got[-1].id
            if not buffer.entries:
                buffer.since = self.monotonic()
            buffer.entries.extend(got)
            buffer.records += sum(entry.records for entry in got)
            read += len(got)
        due = buffer.records >= self.segment_records or (
            buffer.entries and (final or self.monotonic() - buffer.since >= self.segment_seconds)
        )
        if due:
            await self.flush(spec)
        return read

    async def flush(self, spec: StreamSpec) -> None:
        """Write the buffer as segments (one per UTC day), the manifest, then acknowledge and trim."""
        buffer = self.buffers[spec.name]
        entries, buffer.entries, buffer.records = buffer.entries, [], 0
        if not entries:
            return
        head = self.heads[spec.name]
        floor = seg.id_key(head.stream_id)
        fresh = [e for e in entries if seg.id_key(e.id) > floor]
        gone = [e for e in fresh if e.payloads is None]
        if gone:
            log.error(
                "ARCHIVE GAP: %d entries were removed from Redis before they were archived",
                len(gone),
                extra={"stream": spec.name, "first": gone[0].id},
            )
        fresh = [e for e in fresh if e.payloads is not None]
        started = time.perf_counter()
        day_start = 0
        for index in range(1, len(fresh) + 1):
            if index == len(fresh) or seg.day_of(fresh[index].id) != seg.day_of(fresh[day_start].id):
                self._write_segment(spec, fresh[day_start:index])
                day_start = index
        acked, trimmed = await self.store.ack_archived(
            spec.key, [e.id for e in entries], keep=spec.keep, counts=spec.counts
        )
        self.crash("ack")
        records = sum(e.records for e in fresh)
        self.archived += records
        if fresh:
            elapsed = time.perf_counter() - started
            log.info(
                "archived %d records",
                records,
                extra={
                    "stream": spec.name,
                    "seq": self.heads[spec.name].seq,
                    "acknowledged": acked,
                    "trimmed": trimmed,
                    "seconds": round(elapsed, 3),
                },
            )

    def _write_segment(self, spec: StreamSpec, entries: list[StreamEntry]) -> None:
        head = self.heads[spec.name]
        lines: list[bytes] = []
        digest, seq = head.hash, head.seq
        first_time = last_time = None
        for entry in entries:
            assert entry.payloads is not None
            # A batch entry's records each get their own seq and chain link, in the order appended;
            # all carry the entry's id.
            for payload in entry.payloads:
                seq += 1
                try:
                    record = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    record = {"unparsed": payload.decode("utf-8", "replace")}
                body = seg.archived_body(record, seq, entry.id)
                line, digest = seg.seal(digest, body)
                lines.append(line)
                when = seg.record_time(body)
                first_time = first_time or when
                last_time = when or last_time
        stream_dir = self.root / spec.name
        path = seg.segment_path(stream_dir, entries[0].id, head.seq + 1, seq)
        if self.crash.point == "tmp":
            self._crash_after_temporary(path, b"".join(lines))
        seg.write_durable(path, b"".join(lines), compress=True)
        self.crash("segment")
        write_index(path, spec.name)
        self.crash("index")
        new = Head(
            seq=seq,
            hash=digest,
            stream_id=entries[-1].id,
            first_time=head.first_time or first_time,
            last_time=last_time or head.last_time,
            segments=head.segments + 1,
            last_segment=str(path.relative_to(self.root)),
        )
        seg.write_manifest(stream_dir, spec.name, new)
        self.heads[spec.name] = new
        self.crash("manifest")

    def _crash_after_temporary(self, path: Path, data: bytes) -> None:
        """The fault hook's ``tmp`` point: half a temporary file written, then killed before the rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(f".{path.name}.tmp").write_bytes(data[: len(data) // 2])
        self.crash("tmp")
