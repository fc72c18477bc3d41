"""The archive's layout on disk, its hash chain, and its manifests.

::

    DIR/<stream>/YYYY/MM/DD/<first-seq>-<last-seq>.jsonl.gz   one segment: gzipped JSON Lines
    DIR/<stream>/manifest.json                                the stream's head: records, head hash

``<stream>`` is ``audit`` (``gw:audit``, audit shard 0), ``audit-<shard>`` (``gw:audit:<shard>``)
or ``changes`` (``{gw}:changes``): one chain per Redis stream. Every record is the
stream entry's own JSON object with three fields added: ``seq`` (1, 2, 3... per stream, no gaps),
``stream_id`` (the Redis entry id it came from) and ``hash``, the SHA-256 (hex) of the previous
record's ``hash`` (64 zeros before the first) followed by this record's canonical JSON without
``hash`` (keys sorted, no whitespace, UTF-8). A line is exactly the canonical JSON of the record
with its ``hash``, so any changed byte breaks either the line's form or the chain.

Files appear whole or not at all: written under a temporary name, fsynced, renamed, and the
directory fsynced. A temporary file left by a killed writer is deleted at the next start.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

GENESIS = "0" * 64
AUDIT_SHARD_DIR = re.compile(r"^audit-([1-9]\d*)$")
MANIFEST = "manifest.json"
SUFFIX = ".jsonl.gz"
INDEX_SUFFIX = ".parquet"  # the segment's columns for queries, beside it (see gateway/archive/columns.py)
SEGMENT_NAME = re.compile(r"^(\d{12,})-(\d{12,})\.jsonl\.gz$")
# Added to each record; a stream record that already holds one of these keeps its own fields under
# ``record`` instead, so nothing the gateway wrote is ever overwritten.
RESERVED = ("seq", "stream_id", "hash")
COMPRESSLEVEL = 6


class ArchiveError(Exception):
    """The archive on disk is not what its chain and manifest say: the archiver refuses to extend it."""


def audit_stream_name(shard: int) -> str:
    """The archive directory of an audit shard: ``audit`` for shard 0 (as before shards), else ``audit-<shard>``."""
    return "audit" if shard == 0 else f"audit-{shard}"


def stream_kind(stream: str) -> str:
    """``audit`` or ``changes``: which records (and columns) a stream directory holds."""
    return "audit" if AUDIT_SHARD_DIR.match(stream) else stream


def audit_streams(root: Path) -> list[str]:
    """The audit stream directories in ``root``, by shard: ``audit``, ``audit-1``, ``audit-2``..."""
    shards = [0] if (root / "audit").is_dir() else []
    try:
        names = [path.name for path in root.iterdir() if path.is_dir()]
    except OSError:
        names = []
    shards += sorted(int(found.group(1)) for name in names if (found := AUDIT_SHARD_DIR.match(name)))
    return [audit_stream_name(shard) for shard in shards]


def archive_streams(root: Path) -> list[str]:
    """Every stream directory in ``root``: the audit shards', then ``changes``."""
    return audit_streams(root) + (["changes"] if (root / "changes").is_dir() else [])


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def link(previous: str, body: Any) -> str:
    """The chain hash of a record whose canonical JSON (without ``hash``) is ``body``."""
    return hashlib.sha256(previous.encode("ascii") + canonical(body)).hexdigest()


def archived_body(record: Any, seq: int, stream_id: str) -> dict[str, Any]:
    if isinstance(record, dict) and not any(name in record for name in RESERVED):
        return {**record, "seq": seq, "stream_id": stream_id}
    return {"record": record, "seq": seq, "stream_id": stream_id}


def seal(previous: str, body: dict[str, Any]) -> tuple[bytes, str]:
    """The segment line of ``body`` chained after ``previous``, and its hash."""
    digest = link(previous, body)
    return canonical({**body, "hash": digest}) + b"\n", digest


def entry_ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


def id_key(stream_id: str) -> tuple[int, int]:
    """A Redis stream id as a sortable pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def day_of(stream_id: str) -> tuple[int, int, int]:
    when = datetime.fromtimestamp(entry_ms(stream_id) / 1000, UTC)
    return when.year, when.month, when.day


def segment_name(first: int, last: int) -> str:
    return f"{first:012d}-{last:012d}{SUFFIX}"


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    first: int
    last: int

    def relative(self, root: Path) -> str:
        return str(self.path.relative_to(root))

    @property
    def index(self) -> Path:
        return index_path(self.path)


def index_path(segment: Path) -> Path:
    return segment.with_name(segment.name.removesuffix(SUFFIX) + INDEX_SUFFIX)


def parse_segment(path: Path) -> Segment | None:
    match = SEGMENT_NAME.match(path.name)
    if match is None:
        return None
    return Segment(path, int(match.group(1)), int(match.group(2)))


def day_dirs(stream_dir: Path) -> list[Path]:
    """The stream's day directories, oldest first."""
    return sorted(p for p in stream_dir.glob("[0-9]*/[0-9]*/[0-9]*") if p.is_dir())


def list_segments(stream_dir: Path) -> tuple[list[Segment], list[Path]]:
    """Every segment by first seq, and the files in day directories that are not segments."""
    segments: list[Segment] = []
    strays: list[Path] = []
    indexes: list[Path] = []
    for day in day_dirs(stream_dir):
        for path in day.iterdir():
            segment = parse_segment(path)
            if segment is not None:
                segments.append(segment)
            elif path.name.endswith(INDEX_SUFFIX):
                indexes.append(path)
            else:
                strays.append(path)
    names = {segment.index for segment in segments}
    strays += [path for path in indexes if path not in names]  # an index without its segment
    segments.sort(key=lambda s: (s.first, s.last))
    return segments, strays


def last_segment(stream_dir: Path) -> Segment | None:
    """The newest segment, looking only into the newest day directory that holds one."""
    for day in reversed(day_dirs(stream_dir)):
        found = [s for s in map(parse_segment, day.iterdir()) if s is not None]
        if found:
            return max(found, key=lambda s: s.first)
    return None


def read_lines(path: Path) -> Iterator[bytes]:
    """The segment's lines; gzip raises EOFError, gzip.BadGzipFile or zlib.error on a damaged file."""
    with gzip.open(path, "rb") as stream:
        yield from stream


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing each parent of a directory created, so a new directory survives a crash too."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def publish(temporary: Path, path: Path) -> None:
    """Make a fully written ``temporary`` file durable under its final name."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    fsync_dir(path.parent)


def temporary_for(path: Path) -> Path:
    """A name :func:`remove_temporaries` deletes if the writer dies before the rename."""
    return path.with_name(f".{path.name}.tmp")


def write_durable(path: Path, data: bytes, *, compress: bool = False) -> None:
    """``path`` appears whole or not at all: temporary name, fsync, rename, directory fsync."""
    _make_dirs(path.parent)
    temporary = temporary_for(path)
    with open(temporary, "wb") as out:
        if compress:
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=COMPRESSLEVEL, mtime=0) as gz:
                gz.write(data)
        else:
            out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(temporary, path)
    fsync_dir(path.parent)


def segment_path(stream_dir: Path, first_id: str, first: int, last: int) -> Path:
    year, month, day = day_of(first_id)
    return stream_dir / f"{year:04d}" / f"{month:02d}" / f"{day:02d}" / segment_name(first, last)


def remove_temporaries(stream_dir: Path) -> int:
    """Delete what a killed writer left half-written; returns how many."""
    removed = 0
    for path in [*stream_dir.glob(".*.tmp"), *stream_dir.glob("[0-9]*/[0-9]*/[0-9]*/.*.tmp")]:
        path.unlink(missing_ok=True)
        removed += 1
    return removed


@dataclass(slots=True)
class Head:
    """Where a stream's chain ends: the last record's seq, hash and Redis id, and the time span."""

    seq: int = 0
    hash: str = GENESIS
    stream_id: str = "0-0"
    first_time: str | None = None
    last_time: str | None = None
    segments: int = 0
    last_segment: str | None = None

    def to_json(self, stream: str) -> dict[str, Any]:
        return {
            "stream": stream,
            "records": self.seq,
            "head_hash": self.hash,
            "head_stream_id": self.stream_id,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "segments": self.segments,
            "last_segment": self.last_segment,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Head:
        return cls(
            seq=int(data["records"]),
            hash=str(data["head_hash"]),
            stream_id=str(data["head_stream_id"]),
            first_time=data.get("first_time"),
            last_time=data.get("last_time"),
            segments=int(data.get("segments", 0)),
            last_segment=data.get("last_segment"),
        )


def read_manifest(stream_dir: Path) -> Head | None:
    path = stream_dir / MANIFEST
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as exc:
        raise ArchiveError(f"{path}: not JSON: {exc}") from exc
    try:
        return Head.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"{path}: missing or bad field: {exc}") from exc


def write_manifest(stream_dir: Path, stream: str, head: Head) -> None:
    write_durable(stream_dir / MANIFEST, orjson.dumps(head.to_json(stream), option=orjson.OPT_INDENT_2) + b"\n")


def record_time(body: dict[str, Any]) -> str | None:
    value = body.get("time")
    return value if isinstance(value, str) else None
