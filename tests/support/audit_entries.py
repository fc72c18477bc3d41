"""Audit records read straight from a shard's stream entries, whichever format each entry has."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.storage.audit_entries import entry_records


def records_of(fields: dict[bytes, Any]) -> list[dict[str, Any]]:
    """The records of one raw stream entry (a batch's or a single record's), oldest first."""
    return [orjson.loads(record) for record in entry_records(fields) or []]


def record_ids(fields: dict[bytes, Any]) -> list[str]:
    """``producer:sequence`` of each record of one raw entry, oldest first. A batch entry's ``id``
    names its first and last sequence; the records between are that producer's in order, no gap."""
    entry_id = fields[b"id"].decode()
    if b"b" not in fields:
        return [entry_id]
    producer, _, span = entry_id.rpartition(":")
    first, _, last = span.partition("-")
    count = int(fields[b"n"])
    assert int(last) - int(first) + 1 == count, f"{entry_id}: {count} records"
    return [f"{producer}:{seq}" for seq in range(int(first), int(last) + 1)]


def stream_records(entries: list[tuple[bytes, dict[bytes, Any]]]) -> list[tuple[dict[str, Any], str]]:
    """The records of raw entries (XRANGE's answer), oldest first, each with its ``producer:sequence``."""
    return [pair for _id, fields in entries for pair in zip(records_of(fields), record_ids(fields), strict=True)]
