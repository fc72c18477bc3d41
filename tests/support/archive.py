"""Audit archive tests: records to archive, the archiver as a real process, and the archive read back."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from gateway.archive.segments import list_segments
from gateway.storage.store import Store

from .gateway_process import ROOT

COUNTRIES = ("US", "DE", "IR", "FR")
MODELS = ("frontier-x", "gpt-mock")


def audit_record(i: int, **fields: Any) -> dict[str, Any]:
    """A §10-shaped record; country, model and code cycle with ``i``."""
    country = COUNTRIES[i % len(COUNTRIES)]
    blocked = country == "IR"
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{i % 1000:03d}Z",
        "request_id": f"req-{i}",
        "subject": f"user-{i % 7}",
        "org": f"org-{i % 3}",
        "tier": "partner",
        "claimed_country": country,
        "client_ip": "203.0.113.7",
        "ip_country": country,
        "model": MODELS[i % len(MODELS)],
        "decision": "block" if blocked else "allow",
        "code": "country_blocked" if blocked else "",
        "policy_version": 3,
        "status": 451 if blocked else 200,
        "upstream_status": None if blocked else 200,
        "duration_ms": 1.5,
    }
    if i % 10 == 0:
        record["screening"] = {"entry": "Example Trading LLC", "score": 0.87}
    record.update(fields)
    return record


async def fill(
    store: Store,
    count: int,
    *,
    maxlen: int = 1000,
    archive: bool = True,
    start: int = 1,
    producer: str = "producer-1",
    shard: int | None = None,
    batch: int = 500,
) -> int:
    """Append ``count`` records as one gateway process would (to ``shard``: default, its producer's),
    ``batch`` records per call (each call's records are stream entries of up to 256); returns how
    many were trimmed."""
    trimmed = 0
    for first in range(start, start + count, batch):
        records = [(i, orjson.dumps(audit_record(i))) for i in range(first, min(first + batch, start + count))]
        _added, cut = await store.append_audit_counted(producer, records, maxlen=maxlen, archive=archive, shard=shard)
        trimmed += cut
    return trimmed


def archive_config(directory: Path, redis_url: str, *, maxlen: int = 1000, shards: int = 1) -> Path:
    path = directory / "archiver.yaml"
    config = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "redis": {"url": redis_url},
        "audit": {"stream_maxlen": maxlen, "archive": True, "shards": shards},
        "logging": {"level": "warning"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def gateway_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def archived(root: Path, stream: str = "audit") -> list[dict[str, Any]]:
    """Every archived record of ``stream``, in file and line order."""
    segments, _strays = list_segments(root / stream)
    records: list[dict[str, Any]] = []
    for segment in segments:
        with gzip.open(segment.path, "rb") as lines:
            records.extend(orjson.loads(line) for line in lines)
    return records
