"""The audit stream's entry format: how a script call's records are packed into stream entries,
and how every reader unpacks both kinds of entry.

A batch entry (what ``gateway/lua/audit.lua`` writes) carries up to :data:`ENTRY_RECORDS` records
of one producer, in the order appended, and at most :data:`ENTRY_BYTES` of them:

- ``n``: how many records it holds;
- ``total``: the shard's running count of records appended in batch entries, up to and including
  this one (``{gw:audit}:records`` ``appended``): two entries' totals give the records between them
  without reading what lies between (the archiver's backlog, a lost counter rebuilt);
- ``id``: ``<producer>:<first sequence>-<last sequence>``;
- ``b``: the records' JSON as one JSON array, each record on a line of its own (``[`` record
  ``,\\n`` record ... ``]``). A record's compact JSON never holds a line break (one inside a string
  is written ``\\n``), so a reader splits the array at the line breaks instead of parsing it.

A single-record entry (``r``: the record's JSON, ``id``: ``<producer>:<sequence>``) is what gateways
wrote before; a rolling upgrade runs both on one stream, so every reader takes both, and counts a
single-record entry as one record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

# Records per batch entry, and its records' bytes at most: a reader holds one entry whole.
ENTRY_RECORDS = 256
ENTRY_BYTES = 512 * 1024
# Trimming by records starts once a shard holds this much beyond ``audit.stream_maxlen`` (at least
# one whole entry, so each trim removes one): one trim per so many records appended, not one per call.
TRIM_SLACK_SHARE = 100


def trim_slack(maxlen: int) -> int:
    """Records a shard may hold beyond ``maxlen`` before it is trimmed back to about ``maxlen``."""
    return max(ENTRY_RECORDS, maxlen // TRIM_SLACK_SHARE)


def compact(record: bytes) -> bytes:
    """A record's JSON without line breaks (as orjson writes it), so a batch entry can be split."""
    return orjson.dumps(orjson.loads(record)) if b"\n" in record else record


def pack_entries(records: Sequence[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
    """``(sequence, record JSON)`` pairs in ascending order as the batch entries they become:
    (first sequence, records, ``b``). An entry's sequences run without a gap (a torn spool line
    dropped leaves one: the entry ends there), so the script can skip a replayed prefix by count."""
    entries: list[tuple[int, int, bytes]] = []
    run: list[bytes] = []
    first = previous = size = 0
    for seq, raw in records:
        record = compact(raw)
        if run and (seq != previous + 1 or len(run) == ENTRY_RECORDS or size + 2 + len(record) > ENTRY_BYTES):
            entries.append((first, len(run), b"[" + b",\n".join(run) + b"]"))
            run, size = [], 0
        if not run:
            first, size = seq, len(record)
        else:
            size += 2 + len(record)
        run.append(record)
        previous = seq
    if run:
        entries.append((first, len(run), b"[" + b",\n".join(run) + b"]"))
    return entries


def batch_records(payload: bytes, count: int) -> list[bytes]:
    """The records of a batch entry's ``b``, oldest first, each as its JSON."""
    records = payload[1:-1].split(b",\n")
    if len(records) != count or not payload.startswith(b"[") or not payload.endswith(b"]"):
        # Not as this module writes it (hand-made): parse it whole instead.
        parsed = orjson.loads(payload)
        return [orjson.dumps(record) for record in parsed] if isinstance(parsed, list) else [payload]
    return records


def entry_records(fields: Mapping[bytes, Any]) -> list[bytes] | None:
    """The records of one entry as read with XRANGE/XREADGROUP, oldest first; None when it holds
    neither a batch nor a record."""
    batch = fields.get(b"b")
    if batch is not None:
        return batch_records(batch, int(fields.get(b"n") or 0))
    record = fields.get(b"r")
    return None if record is None else [record]


def unpacked(count: int, payload: bytes) -> list[bytes]:
    """One entry as ``audit_window.lua`` answers it: ``count`` 0 for a single record, else a batch's
    record count; its records oldest first."""
    return [payload] if count == 0 else batch_records(payload, count)
