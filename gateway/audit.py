"""The audit trail (contract §10): one record per decision, kept across Redis outages, kills and restarts.

A record's way out:

1. ``record()`` puts the dict on a bounded in-memory queue. It never awaits and
   never blocks; when the queue is full the record is dropped, counted and logged.
2. Every ``audit.flush_ms`` the drain tick numbers the queued records with this
   process's sequence (1, 2, 3...) and appends them to this process's spool file
   in one ``write`` (write-ahead), whatever Redis is doing. That is what makes a
   killed process lose at most ``flush_ms`` of records: once ``write`` returns,
   the bytes are in the kernel's page cache and outlive the process (SIGKILL,
   OOM kill, a crash). No fsync: it would only add protection against the
   machine itself losing power, at a disk flush per tick.
3. Independently of the tick, a sender task appends the written records to the
   Redis stream in batches; a Redis that hangs holds up only the sender, never
   the write-ahead. While everything goes well the sender sends from memory (no
   reading back), and the file is cut back to empty once Redis acknowledged all
   of it. When Redis fails (or falls far behind) the sender drops its memory
   copies and replays from the file instead, in order, until it has caught up.
4. Appends are idempotent per (producer, sequence) (``gateway/lua/audit.lua``):
   a batch whose reply was lost in a timeout, a batch that was sent and then
   replayed from the spool, a spool replayed twice: each record lands once.
5. Each process holds an exclusive ``flock`` on its spool file for its life. A
   file whose lock can be taken belongs to a process that is gone (stopped,
   crashed, SIGKILLed): any gateway process replays it and deletes it. The lock,
   not a pid check, decides, so a reused pid or two workers scanning together
   cannot replay a file twice or steal a live one.

Loss bounds: a graceful stop flushes everything to Redis, or leaves it in the
spool for the next start. A killed process loses what was queued since its last
write-ahead tick (``flush_ms``). Records are dropped, counted by
``gateway_audit_dropped_total`` and logged at error level, only when the queue
is full, i.e. when Redis and the spool both fail.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .settings import AuditSettings
from .storage.clients import StoreUnavailable
from .storage.keys import audit_shard
from .storage.store import Store

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("gateway.audit")

BATCH = 500  # records per Redis script call: short enough not to stall Redis for others
REPLAY_BATCHES_PER_TICK = 20  # a large spool is replayed over several ticks, fresh records keep flowing
RETRY_S = 0.5  # how often a spooling process asks Redis whether it is back
ORPHAN_SCAN_S = 5.0
SEND_TIMEOUT_S = 1.0  # a Redis that does not answer in this time is treated as away
READ_CHUNK = 1 << 20
BACKLOG_REFRESH_S = 2.0  # how often the archiver's backlog is read (one XINFO)
SUFFIX = ".jsonl"

Entry = tuple[int, bytes]  # (sequence, record JSON)


def new_producer_id() -> str:
    """Unique across the gateway processes that share a Redis: pid, start time, and randomness."""
    return f"{os.getpid()}-{int(time.time() * 1000)}-{os.urandom(3).hex()}"


def encode_line(producer: str, seq: int, record: bytes) -> bytes:
    return b'{"producer":"%s","seq":%d,"record":%s}\n' % (producer.encode(), seq, record)


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    producer: str
    seq: int
    record: bytes


def decode_line(line: bytes) -> SpoolEntry | None:
    """None for a line torn by a crash mid-write (the only way a spool line can be malformed)."""
    try:
        entry = orjson.loads(line)
        return SpoolEntry(str(entry["producer"]), int(entry["seq"]), orjson.dumps(entry["record"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def iter_lines(fd: int, start: int, end: int | None = None) -> Iterator[tuple[bytes, int]]:
    """(line, file offset just past it) from byte ``start`` up to ``end`` (or EOF), read in chunks."""
    offset, rest = start, b""
    while end is None or offset < end:
        chunk = os.pread(fd, READ_CHUNK if end is None else min(READ_CHUNK, end - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        data, base, position = rest + chunk, offset - len(rest) - len(chunk), 0
        while (newline := data.find(b"\n", position)) >= 0:
            if newline > position:
                yield data[position:newline], base + newline + 1
            position = newline + 1
        rest = data[position:]
    if rest:
        yield rest, offset


class Spool:
    """This process's spool file: the write-ahead log of its records, locked for its life.

    ``size`` is what was written, ``sent`` how much of it Redis acknowledged; once
    they meet, the file is cut back to empty. At a clean stop with nothing left the
    file is deleted; otherwise it stays for the next process to replay.
    """

    def __init__(self, directory: Path, producer: str) -> None:
        self.directory = directory
        self.producer = producer
        self.path = directory / f"{producer}{SUFFIX}"
        self._line_head = b'{"producer":"%s","seq":' % producer.encode()
        self.fd: int | None = None
        self.size = 0  # bytes written
        self.sent = 0  # bytes acknowledged by Redis

    @property
    def pending(self) -> bool:
        return self.fd is not None and self.sent < self.size

    def _open(self) -> int:
        # Created under a name orphan scans ignore, locked, then renamed: no other process
        # can ever take a live process's new file for an orphan.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.directory / f".{self.producer}{SUFFIX}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temporary, self.path)
            _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        self.size = self.sent = 0
        return fd

    def append(self, entries: Sequence[Entry]) -> int:
        """Write the lines (no fsync, see the module docstring); the new size.

        On failure the file is cut back to its last whole line and OSError raised.
        """
        if self.fd is None:
            self.fd = self._open()
        head = self._line_head  # encode_line's, formatted once: a tick writes hundreds of lines
        data = b"".join([b'%s%d,"record":%s}\n' % (head, seq, record) for seq, record in entries])
        try:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                log.error("audit spool %s may end in a torn line", self.path)
            raise
        self.size += len(data)
        return self.size

    def acknowledged(self, offset: int) -> None:
        """Redis holds everything up to ``offset``; an empty file again once it holds all of it."""
        self.sent = max(self.sent, offset)
        if self.fd is not None and self.size and self.sent >= self.size:
            try:
                os.ftruncate(self.fd, 0)  # O_APPEND: the next write starts at 0 again
            except OSError:
                return  # still whole and in order; replaying it again lands nothing twice
            self.size = self.sent = 0

    def discard(self) -> None:
        """At a clean stop with everything acknowledged: remove the file."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
            self.size = self.sent = 0

    def release(self) -> None:
        """At exit: keep what was not acknowledged for the next process to find, and drop the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(slots=True)
class _Chunk:
    """Records written ahead in one tick, kept in memory for the sender.

    ``end``: the spool size just after them (what an acknowledgement lets go of);
    ``durable``: False when the spool write failed and memory is their only copy.
    """

    entries: list[Entry]
    end: int
    durable: bool


@dataclass(slots=True)
class Orphan:
    """A spool file left by a process that is gone, locked by us while we replay it."""

    path: Path
    fd: int
    offset: int = 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _spool_order(path: Path) -> tuple[int, str]:
    """Oldest process first: names are ``<pid>-<start ms>-<random>.jsonl``."""
    parts = path.name.split("-")
    try:
        return int(parts[1]), path.name
    except (IndexError, ValueError):
        return 0, path.name


def _lock_orphan(path: Path) -> int | None:
    """An fd holding ``path``'s lock, or None while its owner lives (or it is gone already)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another process may have replayed and unlinked it between our open and our lock.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError:
        os.close(fd)
        return None
    return fd


class AuditLog:
    """A bounded in-memory queue, written ahead to the spool every ``flush_ms`` and sent on to Redis."""

    def __init__(
        self,
        store: Store,
        settings: AuditSettings,
        *,
        metrics: Metrics,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.monotonic = monotonic
        self.producer = new_producer_id()
        # The audit shard this process appends to (``audit.shards``; see gateway/storage/audit_shards.py).
        self.shard = audit_shard(self.producer, settings.shards)
        self._orphan_shard_of: tuple[str, int] | None = None  # (producer, shard) of the spool being replayed
        self.spool = Spool(Path(settings.spool_dir), self.producer)
        self._queue: deque[dict[str, Any]] = deque()
        self._held: list[Entry] = []  # numbered; the spool refused them while the sender read the file
        self._memory: deque[_Chunk] = deque()  # written ahead, not yet acknowledged, in order
        self._in_memory = 0  # records in ``_memory``
        # True: the sender replays the spool from ``spool.sent`` (Redis failed or fell behind) and
        # the tick writes to the file only; False: it sends ``_memory``.
        self._from_file = False
        # Records held in memory for the sender beyond which it reads them back from the file instead.
        self._memory_cap = min(4 * BATCH, settings.queue_size)
        self._seq = 0
        self._orphan: Orphan | None = None
        self._next_retry = 0.0
        self._next_scan = 0.0
        self._redis_away = False
        self._spool_failing = False
        self._unlogged_drops = 0
        self._drop_reason = ""
        self._last_drop_log = -1e9
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._backlog: asyncio.Task[None] | None = None

    # --- the hot path -----------------------------------------------------------------------

    def record(self, fields: dict[str, Any]) -> None:
        """Queue one §10 record; O(1), never blocks. Serialization happens in the drain tick."""
        if len(self._queue) + len(self._held) + self._in_memory >= self.settings.queue_size:
            self._drop(1, "audit queue full: Redis and the spool both fail")
            return
        self._queue.append(fields)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._drain_loop(), name="audit-drain")
        if self.settings.archive:
            self._backlog = asyncio.create_task(self._watch_backlog(), name="audit-backlog")

    async def close(self) -> None:
        """Flush everything: to Redis, else to the spool; what is left in the spool waits for a restart."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._backlog is not None:
            await self._backlog
        if self._sender is not None:
            # Not cancelled: a batch in flight must learn whether Redis took it.
            await self._sender
        try:
            self._write_ahead()
            await self._send_pending(final=True)
            if self._held and not self._from_file:
                # The spool refused them, but Redis has caught up: straight to Redis.
                self._write_ahead()
                await self._send_pending(final=True)
        finally:
            lost = len(self._held) + sum(len(c.entries) for c in self._memory if not c.durable)
            if lost:
                self._drop(lost, "audit records unsaved at shutdown: Redis and the spool both failed")
            self._held, self._memory, self._in_memory = [], deque(), 0
            self._log_drops(force=True)
            self._release_orphan()
            if self.spool.pending:
                log.warning(
                    "audit spool kept for replay at the next start",
                    extra={"spool": str(self.spool.path), "bytes": self.spool.size - self.spool.sent},
                )
                self.spool.release()
            else:
                self.spool.discard()

    async def _drain_loop(self) -> None:
        interval = self.settings.flush_ms / 1000
        while not self._stop.is_set():
            try:
                self._write_ahead()
            except Exception:  # the tick must outlive any one bad batch
                log.exception("audit write-ahead failed; retrying")
            if self._sender is None or self._sender.done():
                self._sender = asyncio.create_task(self._send_round(), name="audit-send")
            self._log_drops()
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
            except TimeoutError:
                pass

    async def _send_round(self) -> None:
        try:
            await self._send_pending()
            await self._replay_orphans()
        except Exception:  # the sender must outlive any one bad batch
            log.exception("audit send failed; retrying")

    # --- write-ahead ------------------------------------------------------------------------

    def _write_ahead(self) -> None:
        """Number the queue and append it to the spool in one write; runs on the loop (no awaits)."""
        if not self._queue and not self._held:
            return
        entries = self._take()
        if not entries:
            return
        try:
            end, durable = self.spool.append(entries), True
        except OSError as exc:
            end, durable = self.spool.size, False
            if not self._spool_failing:
                self._spool_failing = True
                log.error(
                    "AUDIT SPOOL UNWRITABLE: %s; records kept in memory until the queue is full",
                    exc,
                    extra={"spool": str(self.spool.path), "held": len(entries)},
                )
        else:
            if self._spool_failing:
                self._spool_failing = False
                log.warning("audit spool writable again", extra={"spool": str(self.spool.path)})
        if self._from_file:
            if durable:
                self.metrics.audit_spooled.inc(len(entries))
            else:
                self._held = entries  # the file must stay in order: written again at the next tick
            return
        self._memory.append(_Chunk(entries, end, durable))
        self._in_memory += len(entries)

    def _take(self) -> list[Entry]:
        batch, self._held = self._held, []
        queue = self._queue
        while queue:
            record = queue.popleft()
            try:
                payload = orjson.dumps(record)
            except TypeError:
                self._drop(1, "audit record not serializable")
                continue
            self._seq += 1
            batch.append((self._seq, payload))
        return batch

    # --- sending ----------------------------------------------------------------------------

    async def _send_pending(self, *, final: bool = False) -> None:
        """Send what the spool holds beyond ``sent`` (file first, then memory), in order."""
        if not final and self._redis_away and self.monotonic() < self._next_retry:
            return
        if self._from_file and not await self._catch_up(final):
            return
        memory = self._memory
        while memory and not self._from_file:
            if self._in_memory > self._memory_cap and all(c.durable for c in memory):
                # Redis falls behind: stop holding copies (memory stays small), read them back later.
                self._to_file()
                return
            # The head chunks, up to a script call's worth of records, in one append.
            chunks: list[_Chunk] = []
            entries: list[Entry] = []
            for chunk in memory:
                if entries and len(entries) + len(chunk.entries) > BATCH:
                    break
                chunks.append(chunk)
                entries.extend(chunk.entries)
            if await self._send(entries):
                # Not taken (or not all): sent again later, from the file when it holds them all;
                # what Redis did take lands only once.
                if all(c.durable for c in memory):
                    self._to_file()
                return
            for chunk in chunks:
                if memory and memory[0] is chunk:
                    memory.popleft()
                    self._in_memory -= len(chunk.entries)
            self.spool.acknowledged(chunks[-1].end)

    def _to_file(self) -> None:
        """Redis is away or behind: the memory copies go; the sender replays the file from ``sent``."""
        self.metrics.audit_spooled.inc(self._in_memory)
        self._memory.clear()
        self._in_memory = 0
        self._from_file = True

    async def _catch_up(self, final: bool) -> bool:
        """Replay the own spool from ``sent``; True once it is all acknowledged (back to memory)."""
        budget = None if final else REPLAY_BATCHES_PER_TICK
        while True:
            spool = self.spool
            if spool.fd is None or spool.sent >= spool.size:
                self._from_file = False
                if spool.fd is not None:
                    spool.acknowledged(spool.size)
                return True
            try:
                done = await self._replay(spool.fd, spool.sent, spool.size, spool.acknowledged, budget)
            except StoreUnavailable as exc:
                self._redis_gone(exc)
                return False
            self._redis_back()
            if not done:
                return False
            if spool.sent < spool.size:
                if not final:
                    return False  # written meanwhile: the next round goes on
                continue
            log.info("audit spool replayed to Redis", extra={"spool": str(spool.path)})

    async def _send(self, batch: list[Entry]) -> list[Entry]:
        """Append to Redis in script-sized chunks; returns what Redis did not take."""
        for index in range(0, len(batch), BATCH):
            try:
                await self._append(self.producer, batch[index : index + BATCH])
            except StoreUnavailable as exc:
                self._redis_gone(exc)
                return batch[index:]
        self._redis_back()
        return []

    def _redis_gone(self, exc: Exception) -> None:
        self._next_retry = self.monotonic() + RETRY_S
        if not self._redis_away:
            self._redis_away = True
            log.warning("audit: Redis unavailable, records wait in the spool %s (%s)", self.spool.path, exc)

    def _redis_back(self) -> None:
        if self._redis_away:
            self._redis_away = False
            log.info("audit: Redis reachable again")

    # --- replay -----------------------------------------------------------------------------

    async def _replay(
        self, fd: int, start: int, end: int | None, progress: Callable[[int], None], budget: int | None
    ) -> bool:
        """Send spool lines from ``start`` in batches; True when all were sent, False when out of budget."""
        batch: list[Entry] = []
        producer, batch_end, sent_batches = "", start, 0
        for line, line_end in iter_lines(fd, start, end):
            entry = decode_line(line)
            if entry is None:
                self._drop(1, "torn audit spool line (the writer was killed mid-write)")
                batch_end = line_end
                continue
            if batch and (entry.producer != producer or len(batch) >= BATCH):
                await self._append(producer, batch)
                progress(batch_end)
                batch, sent_batches = [], sent_batches + 1
                if budget is not None and sent_batches >= budget:
                    return False
            producer = entry.producer
            batch.append((entry.seq, entry.record))
            batch_end = line_end
        if batch:
            await self._append(producer, batch)
        progress(batch_end)
        return True

    async def _append(self, producer: str, batch: list[Entry]) -> None:
        shard = self.shard if producer == self.producer else await self._orphan_shard(producer)
        _added, trimmed = await self.store.append_audit_counted(
            producer,
            batch,
            maxlen=self.settings.stream_maxlen,
            timeout_s=SEND_TIMEOUT_S,
            archive=self.settings.archive,
            shard=shard,
        )
        if trimmed and not self.settings.archive:
            # Archiving off: what MAXLEN trimmed was never archived (docs/operations.md).
            self.metrics.audit_trimmed.inc(trimmed)

    async def _orphan_shard(self, producer: str) -> int:
        """A stopped process's records go to its shard (where its mark is), so each still lands once."""
        if self._orphan_shard_of is None or self._orphan_shard_of[0] != producer:
            self._orphan_shard_of = (producer, await self.store.audit_shard_of(producer, self.settings.shards))
        return self._orphan_shard_of[1]

    async def _watch_backlog(self) -> None:
        """Archiving on: keep ``gateway_audit_unarchived_records`` current (the archiver's backlog)."""
        while not self._stop.is_set():
            try:
                self.metrics.audit_unarchived.set(await self.store.audit_backlog())
            except StoreUnavailable:
                pass  # the gauge keeps its last reading; the Redis error is counted already
            try:
                await asyncio.wait_for(self._stop.wait(), BACKLOG_REFRESH_S)
            except TimeoutError:
                pass

    async def _replay_orphans(self) -> None:
        """Replay spool files of processes that are gone, a budget of batches per tick."""
        if self._orphan is None:
            if self.monotonic() < self._next_scan:
                return
            self._next_scan = self.monotonic() + ORPHAN_SCAN_S
            self._orphan = self._find_orphan()
            if self._orphan is None:
                return
        if self.monotonic() < self._next_retry:
            return
        orphan = self._orphan

        def progress(offset: int) -> None:
            orphan.offset = offset

        try:
            done = await self._replay(orphan.fd, orphan.offset, None, progress, REPLAY_BATCHES_PER_TICK)
        except StoreUnavailable as exc:
            self._redis_gone(exc)
            return
        if done:
            log.info("audit spool of a stopped process replayed", extra={"spool": str(orphan.path)})
            orphan.path.unlink(missing_ok=True)
            self._release_orphan()
            self._next_scan = 0.0  # there may be more

    def _find_orphan(self) -> Orphan | None:
        try:
            names = list(self.spool.directory.iterdir())
        except OSError:
            return None
        for path in sorted((p for p in names if p.name.endswith(SUFFIX)), key=_spool_order):
            if path == self.spool.path:
                continue
            fd = _lock_orphan(path)
            if fd is not None:
                log.info("audit spool of a stopped process found", extra={"spool": str(path)})
                return Orphan(path, fd)
        for path in names:
            # A process killed between creating and renaming its spool left an empty file.
            if path.name.endswith(".tmp") and path.name != f".{self.producer}{SUFFIX}.tmp":
                fd = _lock_orphan(path)
                if fd is not None:
                    path.unlink(missing_ok=True)
                    os.close(fd)
        return None

    def _release_orphan(self) -> None:
        if self._orphan is not None:
            os.close(self._orphan.fd)
            self._orphan = None

    # --- loss accounting --------------------------------------------------------------------

    def _drop(self, count: int, reason: str) -> None:
        self.metrics.audit_dropped.inc(count)
        self._unlogged_drops += count
        self._drop_reason = reason
        self._log_drops()

    def _log_drops(self, *, force: bool = False) -> None:
        # Loud, but at most once a second: a flood of identical lines would bury the reason.
        if not self._unlogged_drops:
            return
        now = self.monotonic()
        if force or now - self._last_drop_log >= 1.0:
            log.error(
                "AUDIT RECORDS LOST: %d dropped (%s)",
                self._unlogged_drops,
                self._drop_reason,
                extra={
                    "dropped": self._unlogged_drops,
                    "queued": len(self._queue),
                    "queue_size": self.settings.queue_size,
                },
            )
            self._unlogged_drops = 0
            self._last_drop_log = now
