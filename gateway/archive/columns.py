"""The query index of a segment: its records' columns as Parquet, beside it, for fast questions.

Segments are the evidence; the Parquet file beside each (``<first>-<last>.parquet``) is derived
from it, so a question about a million records reads a few columns instead of decompressing and
parsing every line. ``gateway audit verify`` checks each index holds exactly its segment's rows;
a query over a segment without one reads the segment itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb

from .segments import index_path, publish, stream_kind, temporary_for

AUDIT_COLUMNS: dict[str, str] = {
    "time": "VARCHAR",
    "request_id": "VARCHAR",
    "subject": "VARCHAR",
    "org": "VARCHAR",
    "org_name": "VARCHAR",
    "tier": "VARCHAR",
    "claimed_country": "VARCHAR",
    "client_ip": "VARCHAR",
    "ip_country": "VARCHAR",
    "model": "VARCHAR",
    "decision": "VARCHAR",
    "code": "VARCHAR",
    "policy_version": "BIGINT",
    "status": "INTEGER",
    "upstream_status": "INTEGER",
    "duration_ms": "DOUBLE",
    "key_id": "VARCHAR",
    # Present on some records only: a screening match, a shadow decision, a revoked stream.
    "screening": "JSON",
    "shadow": "JSON",
    "revoked": "BOOLEAN",
    "seq": "BIGINT",
    "stream_id": "VARCHAR",
    "hash": "VARCHAR",
}
CHANGES_COLUMNS: dict[str, str] = {
    "time": "VARCHAR",
    "actor": "VARCHAR",
    "target": "VARCHAR",
    "version": "BIGINT",
    "effect": "VARCHAR",
    "before": "JSON",
    "after": "JSON",
    "seq": "BIGINT",
    "stream_id": "VARCHAR",
    "hash": "VARCHAR",
}
COLUMNS = {"audit": AUDIT_COLUMNS, "changes": CHANGES_COLUMNS}


def quoted(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def read_segments(files: Sequence[Path | str], stream: str) -> str:
    """SQL reading the segments' declared columns (a field a record lacks reads as NULL); ``stream``
    is a stream directory's name (an audit shard's reads as ``audit``)."""
    columns = ", ".join(f"'{name}': '{kind}'" for name, kind in COLUMNS[stream_kind(stream)].items())
    listed = ", ".join(quoted(f) for f in files)
    return f"read_json([{listed}], format='newline_delimited', compression='gzip', columns={{{columns}}})"


def read_indexed(files: Sequence[Path], stream: str) -> str:
    """SQL reading the segments, from their Parquet index where there is one."""
    indexed = [f for f in files if index_path(f).exists()]
    plain = [f for f in files if not index_path(f).exists()]
    parts = []
    if indexed:
        parts.append(f"SELECT * FROM read_parquet([{', '.join(quoted(index_path(f)) for f in indexed)}])")
    if plain:
        parts.append(f"SELECT * FROM {read_segments(plain, stream)}")
    return "(" + " UNION ALL BY NAME ".join(parts) + ")"


def write_index(segment: Path, stream: str) -> Path:
    """Write (durably) the Parquet index of ``segment``."""
    path = index_path(segment)
    temporary = temporary_for(path)
    with connect() as db:
        db.execute(
            f"COPY (SELECT * FROM {read_segments([segment], stream)}) TO {quoted(temporary)} "
            "(FORMAT parquet, COMPRESSION zstd)"
        )
    publish(temporary, path)
    return path


def connect() -> duckdb.DuckDBPyConnection:
    db = duckdb.connect(":memory:")
    db.execute("SET enable_progress_bar = false")
    return db


def index_mismatch(segment: Path, stream: str) -> int | None:
    """None when the index holds exactly the segment's rows; else the first ``seq`` that differs
    (0 when no row says, e.g. the index unreadable)."""
    index = f"read_parquet({quoted(index_path(segment))})"
    source = read_segments([segment], stream)
    # Fast path: row count and the sum of the rows' hashes agree (one scan of each side).
    digest = "SELECT count(*), sum(hash(t)::HUGEINT) FROM (SELECT * FROM {}) t"
    try:
        with connect() as db:
            if db.execute(digest.format(index)).fetchone() == db.execute(digest.format(source)).fetchone():
                return None
            row = db.execute(
                f"SELECT min(seq) FROM ((SELECT * FROM {index} EXCEPT ALL SELECT * FROM {source}) "
                f"UNION ALL (SELECT * FROM {source} EXCEPT ALL SELECT * FROM {index}))"
            ).fetchone()
    except duckdb.Error:
        return 0
    return int(row[0] or 0) if row is not None else 0
