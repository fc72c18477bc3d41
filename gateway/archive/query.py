"""``gateway audit query`` and ``gateway audit report``: questions answered from the archive by DuckDB.

DuckDB reads each segment's Parquet index (gateway/archive/columns.py), or, for a segment
without one, the gzipped JSON Lines themselves, with the columns declared (no schema guessing,
fields a record lacks read as NULL). ``--since`` and ``--until`` also choose
which day directories are read at all, so a question about one month of a five-year archive
reads one month of files. The audit stream is every audit shard's directory (``audit``,
``audit-1``...) read together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from .columns import COLUMNS, connect, read_indexed
from .segments import SUFFIX, audit_streams, day_dirs

# --by keys: the report's own names for the columns they group by.
GROUP_KEYS: dict[str, str] = {
    "country": "claimed_country",
    "ip_country": "ip_country",
    "model": "model",
    "code": "code",
    "decision": "decision",
    "status": "status",
    "org": "org",
    "subject": "subject",
    "tier": "tier",
    "policy_version": "policy_version",
    "day": "strftime(CAST(time AS TIMESTAMP), '%Y-%m-%d')",
    "month": "strftime(CAST(time AS TIMESTAMP), '%Y-%m')",
}


RECORD_FILTERS = ("subject", "org", "country", "model", "code", "decision")


class QueryError(ValueError):
    """A question the archive cannot answer as asked (a bad time, an unknown --by key)."""


def parse_time(text: str, *, end: bool = False) -> datetime:
    """An ISO-8601 instant or date, as naive UTC; a bare date as ``end`` bound means the day's end."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day)
            return start + timedelta(days=1) if end else start
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise QueryError(f"not an ISO-8601 time or date: {text!r}") from exc
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when


@dataclass(frozen=True, slots=True)
class Filters:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    subject: str | None = None
    org: str | None = None
    country: str | None = None  # the claimed or the IP country
    model: str | None = None
    code: str | None = None
    decision: str | None = None

    def where(self, stream: str) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.since is not None:
            clauses.append("CAST(time AS TIMESTAMP) >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("CAST(time AS TIMESTAMP) < ?")
            params.append(self.until)
        if stream == "audit":
            for column in ("subject", "org", "model", "code", "decision"):
                value = getattr(self, column)
                if value is not None:
                    clauses.append(f"{column} = ?")
                    params.append(value)
            if self.country is not None:
                clauses.append("(claimed_country = ? OR ip_country = ?)")
                params += [self.country, self.country]
        elif any(getattr(self, name) is not None for name in RECORD_FILTERS):
            raise QueryError("the changes stream is filtered by --since and --until only")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def segment_files(root: Path, stream: str, since: datetime | None, until: datetime | None) -> list[Path]:
    """The segments of the days that can hold records in [since, until)."""
    first = since.date() if since is not None else None
    last = until.date() if until is not None else None
    files: list[Path] = []
    for day_dir in day_dirs(root / stream):
        try:
            day = date(int(day_dir.parent.parent.name), int(day_dir.parent.name), int(day_dir.name))
        except ValueError:
            continue
        # A segment is named after its first record's Redis time; a record's own time may be a
        # moment earlier, so the day before ``since`` is read too.
        if first is not None and day < first - timedelta(days=1):
            continue
        if last is not None and day > last:
            continue
        files.extend(sorted(day_dir.glob(f"*{SUFFIX}")))
    return files


def stream_files(root: Path, stream: str, since: datetime | None, until: datetime | None) -> list[Path]:
    """The segments of ``stream`` (``audit``: of every audit shard) that can hold records in [since, until)."""
    names = audit_streams(root) if stream == "audit" else [stream]
    return [path for name in names for path in segment_files(root, name, since, until)]


# Records of several audit shards in the order they reached Redis: by stream id (milliseconds, then
# sequence), then by their own chain's ``seq`` and hash, so that equal ids sort the same every time.
# With one shard this is ``seq`` order.
AUDIT_ORDER = "CAST(split_part(stream_id, '-', 1) AS BIGINT), CAST(split_part(stream_id, '-', 2) AS BIGINT), seq, hash"


def query(
    root: Path, filters: Filters, *, stream: str = "audit", limit: int | None = 100
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Matching records in ``seq`` order, audit records of several shards in stream id order (at most
    ``limit``; None: all)."""
    files = stream_files(root, stream, filters.since, filters.until)
    names = list(COLUMNS[stream])
    if not files:
        return names, []
    where, params = filters.where(stream)
    order = AUDIT_ORDER if stream == "audit" else "seq"
    sql = f"SELECT * FROM {read_indexed(files, stream)}{where} ORDER BY {order}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    with connect() as db:
        result = db.execute(sql, params)
        columns = [d[0] for d in result.description]
        return columns, result.fetchall()


def report(root: Path, filters: Filters, by: Sequence[str]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Requests per group: ``by`` keys, then ``requests``, ``allowed``, ``blocked`` counts; largest first."""
    unknown = [key for key in by if key not in GROUP_KEYS]
    if unknown or not by:
        raise QueryError(f"--by takes a comma-separated list of {', '.join(GROUP_KEYS)}; got {','.join(by)!r}")
    files = stream_files(root, "audit", filters.since, filters.until)
    names = [*by, "requests", "allowed", "blocked"]
    if not files:
        return names, []
    where, params = filters.where("audit")
    keys = ", ".join(f"{GROUP_KEYS[key]} AS {key}" for key in by)
    order = ", ".join(str(position) for position in range(1, len(by) + 1))
    sql = (
        f"SELECT {keys}, count(*) AS requests, count(*) FILTER (WHERE decision = 'allow') AS allowed, "
        f"count(*) FILTER (WHERE decision = 'block') AS blocked "
        f"FROM {read_indexed(files, 'audit')}{where} GROUP BY ALL ORDER BY requests DESC, {order}"
    )
    with connect() as db:
        result = db.execute(sql, params)
        return [d[0] for d in result.description], result.fetchall()
