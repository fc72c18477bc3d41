"""``gateway audit verify``: every chain whole, every ``seq`` in place, every manifest matching.

Walks each stream's segments in ``seq`` order and recomputes the chain from the first record
(see :mod:`gateway.archive.segments`). The first fault found is reported with the segment (path
under the archive directory), the line in it and the ``seq`` expected there: an edited record
breaks its hash (or its canonical form), a deleted, inserted or reordered line breaks the
``seq`` sequence, a truncated or damaged file fails to decompress or ends short of its name,
a dropped segment leaves a gap in ``seq`` (or, the newest, a manifest that says more). Each
segment's Parquet query index must hold exactly the segment's rows.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import multiprocessing
import os
import re
import zlib
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .columns import index_mismatch
from .segments import (
    INDEX_SUFFIX,
    MANIFEST,
    ArchiveError,
    Head,
    Segment,
    archive_streams,
    canonical,
    list_segments,
    read_lines,
    read_manifest,
    record_time,
)

HEX64 = re.compile(r"[0-9a-f]{64}")
UNKNOWN = "?"  # the previous hash of a segment checked on its own
PARALLEL_FROM = 8  # segments in a stream from which they are checked in worker processes


@dataclass(frozen=True, slots=True)
class Fault:
    """The first place a stream's archive is not what it claims."""

    stream: str
    segment: str | None
    line: int | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = [self.stream]
        if self.segment is not None:
            where.append(f"segment {self.segment}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.seq is not None:
            where.append(f"record seq {self.seq}")
        return f"{', '.join(where)}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("stream", "segment", "line", "seq", "reason")}


class ChainBroken(Exception):
    def __init__(self, fault: Fault) -> None:
        super().__init__(str(fault))
        self.fault = fault


@dataclass(slots=True)
class Chain:
    """A stream's chain as read so far: the next ``seq`` expected and the previous hash."""

    stream: str
    root: Path
    head: Head = field(default_factory=Head)
    # Set when the chain starts mid-archive with the previous hash unknown (a segment checked on
    # its own): the first record's hash input and hash, for the caller to link.
    first_link: tuple[bytes, str] | None = None

    def _fault(self, segment: Segment, line: int | None, reason: str) -> ChainBroken:
        return ChainBroken(Fault(self.stream, segment.relative(self.root), line, self.head.seq + 1, reason))

    def read(self, segment: Segment) -> None:
        """Check ``segment`` continues the chain and advance over it; ChainBroken names the first fault."""
        if segment.first != self.head.seq + 1:
            gap = "missing records (a segment dropped?)" if segment.first > self.head.seq + 1 else "overlaps"
            raise self._fault(segment, None, f"segment starts at seq {segment.first}: {gap}")
        number = 0
        try:
            for number, line in enumerate(read_lines(segment.path), start=1):
                self._record(segment, number, line)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise self._fault(segment, number + 1, f"segment truncated or damaged ({exc})") from exc
        if self.head.seq != segment.last:
            raise self._fault(segment, number + 1, f"segment ends at seq {self.head.seq}, its name says {segment.last}")
        self.head.segments += 1
        self.head.last_segment = segment.relative(self.root)

    def link(self, segment: Segment, check: SegmentCheck) -> None:
        """Continue the chain over a segment checked on its own (:func:`check_segment`)."""
        if segment.first != self.head.seq + 1:
            gap = "missing records (a segment dropped?)" if segment.first > self.head.seq + 1 else "overlaps"
            raise self._fault(segment, None, f"segment starts at seq {segment.first}: {gap}")
        if check.fault is not None:
            raise ChainBroken(check.fault)
        assert check.first_link is not None and check.head is not None
        unhashed, digest = check.first_link
        if hashlib.sha256(self.head.hash.encode() + unhashed).hexdigest() != digest:
            raise self._fault(segment, 1, "hash does not match the chain: record edited")
        if check.index_fault is not None:
            raise ChainBroken(check.index_fault)
        head = check.head
        self.head = Head(
            seq=head.seq,
            hash=head.hash,
            stream_id=head.stream_id,
            first_time=self.head.first_time or head.first_time,
            last_time=head.last_time or self.head.last_time,
            segments=self.head.segments + 1,
            last_segment=head.last_segment,
        )

    def _record(self, segment: Segment, number: int, line: bytes) -> None:
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise self._fault(segment, number, f"not JSON ({exc}): record edited") from exc
        if not isinstance(body, dict):
            raise self._fault(segment, number, "not a JSON object: record edited")
        digest = body.get("hash")
        if not isinstance(digest, str) or not HEX64.fullmatch(digest) or canonical(body) + b"\n" != line:
            raise self._fault(segment, number, "not in canonical form: record edited")
        seq = body.get("seq")
        if seq != self.head.seq + 1:
            raise self._fault(
                segment, number, f"seq {seq} where {self.head.seq + 1} was due: a record deleted, inserted or moved"
            )
        # The canonical JSON without ``hash`` is the line without that member (keys are sorted, so
        # the others keep their order): no second serialization.
        member = b'"hash":"' + digest.encode() + b'"'
        at = line.index(member)
        if line[at - 1 : at] == b",":
            unhashed = line[: at - 1] + line[at + len(member) : -1]
        else:
            unhashed = line[:at] + line[at + len(member) + 1 : -1]
        if self.head.hash == UNKNOWN:
            self.first_link = (unhashed, digest)
        elif hashlib.sha256(self.head.hash.encode() + unhashed).hexdigest() != digest:
            raise self._fault(segment, number, "hash does not match the chain: record edited")
        head = self.head
        head.seq, head.hash, head.stream_id = seq, digest, str(body.get("stream_id"))
        when = record_time(body)
        if head.first_time is None:
            head.first_time = when
        head.last_time = when or head.last_time


@dataclass(frozen=True, slots=True)
class StreamSummary:
    stream: str
    records: int
    segments: int
    first_time: str | None
    last_time: str | None
    head_hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "records": self.records,
            "segments": self.segments,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "head_hash": self.head_hash,
        }


@dataclass(frozen=True, slots=True)
class SegmentCheck:
    """One segment checked on its own: its fault, or its first record's link and its last head."""

    fault: Fault | None
    first_link: tuple[bytes, str] | None = None
    head: Head | None = None
    index_fault: Fault | None = None  # reported after the chain's own faults, which say more


def check_segment(root: Path, stream: str, segment: Segment) -> SegmentCheck:
    """Check a segment without its predecessor: every record but the first's link, and its index."""
    chain = Chain(stream, root, head=Head(seq=segment.first - 1, hash=UNKNOWN))
    try:
        chain.read(segment)
    except ChainBroken as exc:
        return SegmentCheck(exc.fault)
    index_fault = None
    if segment.index.exists():
        differs = index_mismatch(segment.path, stream)
        if differs is not None:
            reason = "the query index does not hold exactly its segment's records (edited?)"
            index_fault = Fault(stream, str(segment.index.relative_to(root)), None, differs or None, reason)
    return SegmentCheck(None, chain.first_link, chain.head, index_fault)


def verify_stream(root: Path, stream: str, *, workers: int = 1) -> StreamSummary:
    """Check one stream's whole chain and its manifest; ChainBroken names the first fault."""
    stream_dir = root / stream
    chain = Chain(stream, root)
    segments, strays = list_segments(stream_dir)
    orphans = sorted(p for p in strays if p.name.endswith(INDEX_SUFFIX))
    for stray in sorted(p for p in strays if p not in orphans):
        raise ChainBroken(Fault(stream, str(stray.relative_to(root)), None, None, "not a segment (unexpected file)"))
    checks: Iterable[SegmentCheck]
    pool: ProcessPoolExecutor | None = None
    if workers > 1 and len(segments) >= PARALLEL_FROM:
        # spawn, not fork: DuckDB's threads in this process must not be forked mid-flight.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        checks = pool.map(check_segment, itertools.repeat(root), itertools.repeat(stream), segments)
    else:
        checks = (check_segment(root, stream, segment) for segment in segments)
    try:
        for segment, check in zip(segments, checks, strict=True):
            chain.link(segment, check)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    head = chain.head
    try:
        manifest = read_manifest(stream_dir)
    except ArchiveError as exc:
        raise ChainBroken(Fault(stream, f"{stream}/{MANIFEST}", None, None, str(exc))) from exc
    if manifest is None:
        if head.seq:
            raise ChainBroken(Fault(stream, f"{stream}/{MANIFEST}", None, None, "manifest missing"))
    elif (manifest.seq, manifest.hash) != (head.seq, head.hash):
        reason = (
            f"manifest says {manifest.seq} records ending in {manifest.hash[:16]}..., "
            f"the segments hold {head.seq} ending in {head.hash[:16]}..."
        )
        if manifest.seq > head.seq:
            reason += ": records missing at the end (the newest segment dropped or cut?)"
        missing = head.seq + 1 if manifest.seq > head.seq else None
        raise ChainBroken(Fault(stream, f"{stream}/{MANIFEST}", None, missing, reason))
    for orphan in orphans:
        reason = "a query index whose segment is missing (the segment removed?)"
        raise ChainBroken(Fault(stream, str(orphan.relative_to(root)), None, None, reason))
    return StreamSummary(stream, head.seq, head.segments, head.first_time, head.last_time, head.hash)


def verify_archive(root: Path, *, workers: int | None = None) -> list[StreamSummary]:
    """Every stream the archive holds; ChainBroken at the first fault. An empty directory verifies.

    ``workers``: processes checking segments side by side (default: one per CPU); the chain's
    links between segments are checked in order here, so the first fault is the one reported.
    """
    if not root.is_dir():
        raise ChainBroken(Fault("-", None, None, None, f"{root}: no such directory"))
    count = workers if workers is not None else os.cpu_count() or 1
    return [verify_stream(root, stream, workers=count) for stream in archive_streams(root)]
