"""``gateway audit archive|verify|query|report``: argument parsing and output; the work is elsewhere.

Imports stay inside the handlers, so the other ``gateway`` subcommands never load DuckDB.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _archive(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import signal

    from ..logs import setup_logging
    from ..settings import ConfigError, load_settings, read_secret
    from ..storage.clients import StoreUnavailable
    from ..storage.store import Store
    from .archiver import Archiver, stream_specs
    from .segments import ArchiveError

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.logging)
    url = settings.redis.url
    if url is None:
        print("gateway: the archiver needs redis.url (an embedded Redis is private to its gateway)", file=sys.stderr)
        return 2
    if not settings.audit.archive:
        print(
            "gateway: warning: audit.archive is false in this config, so the gateways trim the audit stream to "
            "audit.stream_maxlen whether or not a record was archived; set it to true",
            file=sys.stderr,
        )

    async def run() -> int:
        store = Store.from_url(
            url,
            timeout_s=max(settings.redis.timeout_s, 1.0),
            password=read_secret(settings.redis.password_env, os.environ),
            tls=settings.redis.tls_options(),
            policy_timeout_s=settings.redis.policy_timeout_s,
            audit_shards=settings.audit.shards,
        )
        archiver = Archiver(
            store,
            args.dir,
            stream_specs(settings.audit.stream_maxlen, settings.audit.shards),
            segment_records=args.segment_records,
            segment_seconds=args.segment_seconds,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            archiver.open()
            return await archiver.run(once=args.once, stop=stop)
        finally:
            archiver.close()
            await store.close()

    try:
        archived = asyncio.run(run())
    except (ArchiveError, StoreUnavailable) as exc:
        print(f"gateway: archive: {exc}", file=sys.stderr)
        return 1
    if args.once:
        print(f"archived {archived} records into {args.dir}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import time

    from .verify import ChainBroken, verify_archive

    started = time.perf_counter()
    try:
        summaries = verify_archive(args.dir)
    except ChainBroken as exc:
        if args.json:
            print(json.dumps({"ok": False, "fault": exc.fault.to_json()}))
        print(f"gateway: audit verify: FAILED: {exc.fault}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"ok": True, "streams": [s.to_json() for s in summaries], "seconds": round(elapsed, 3)}))
        return 0
    if not summaries:
        print(f"{args.dir}: empty archive (no streams)")
    for s in summaries:
        print(
            f"{s.stream}: {s.records} records in {s.segments} segments, {s.first_time} .. {s.last_time}, "
            f"head {s.head_hash}"
        )
    print(f"ok ({elapsed:.2f} s)")
    return 0


def _filters(args: argparse.Namespace) -> Any:
    from .query import Filters, parse_time

    return Filters(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until, end=True) if args.until else None,
        subject=getattr(args, "subject", None),
        org=getattr(args, "org", None),
        country=getattr(args, "country", None),
        model=getattr(args, "model", None),
        code=getattr(args, "code", None),
        decision=getattr(args, "decision", None),
    )


def _print_rows(args: argparse.Namespace, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
    if args.json:
        for row in rows:
            print(json.dumps(dict(zip(columns, row, strict=True)), default=str, ensure_ascii=False))
        return
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return
    from ..admin.cli_io import table

    print(table([c.upper() for c in columns], [["" if v is None else v for v in row] for row in rows]))


def _query(args: argparse.Namespace) -> int:
    from .query import QueryError, query

    try:
        columns, rows = query(args.dir, _filters(args), stream=args.stream, limit=args.limit or None)
    except QueryError as exc:
        print(f"gateway: audit query: {exc}", file=sys.stderr)
        return 2
    if not args.json and not args.csv:
        # The table shows what a person reads; --json and --csv carry every column.
        keep = [c for c in columns if c not in ("hash", "stream_id", "before", "after", "screening", "shadow")]
        rows = [tuple(row[columns.index(c)] for c in keep) for row in rows]
        columns = keep
    _print_rows(args, columns, rows)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .query import QueryError, report

    try:
        columns, rows = report(args.dir, _filters(args), [k.strip() for k in args.by.split(",") if k.strip()])
    except QueryError as exc:
        print(f"gateway: audit report: {exc}", file=sys.stderr)
        return 2
    _print_rows(args, columns, rows)
    return 0


def _time_and_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, type=Path, help="the archive directory")
    parser.add_argument("--since", help="ISO-8601 time or date (UTC), inclusive")
    parser.add_argument("--until", help="ISO-8601 time (exclusive) or date (inclusive: the whole day)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON Lines, one object per row")
    output.add_argument("--csv", action="store_true", help="CSV with a header row")


def _record_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject")
    parser.add_argument("--org")
    parser.add_argument("--country", help="the caller's claimed country or its IP's country")
    parser.add_argument("--model")
    parser.add_argument("--code", help="the decision's code, e.g. country_blocked")
    parser.add_argument("--decision", choices=("allow", "block", "rate_limit", "error"))


def add_archive_commands(audit: Any) -> None:
    """Add ``archive``, ``verify``, ``query`` and ``report`` under ``gateway audit``."""
    archive = audit.add_parser("archive", help="move the audit trail and change history into an archive directory")
    archive.add_argument("--config", required=True, type=Path, help="the gateway's YAML config (for its Redis)")
    archive.add_argument("--dir", required=True, type=Path, help="the archive directory")
    archive.add_argument("--once", action="store_true", help="archive what Redis holds now, then exit")
    archive.add_argument("--segment-records", type=int, default=100_000, help="records per segment at most")
    archive.add_argument(
        "--segment-seconds", type=float, default=60.0, help="longest a read record waits for its segment"
    )
    archive.set_defaults(func=_archive)

    verify = audit.add_parser("verify", help="check every hash chain and manifest of an archive")
    verify.add_argument("--dir", required=True, type=Path, help="the archive directory")
    verify.add_argument("--json", action="store_true", help="the summary (or the fault) as JSON")
    verify.set_defaults(func=_verify)

    query = audit.add_parser("query", help="archived records matching filters, in seq order")
    _time_and_output(query)
    _record_filters(query)
    query.add_argument("--stream", choices=("audit", "changes"), default="audit")
    query.add_argument("--limit", type=int, default=100, help="rows at most (0: all)")
    query.set_defaults(func=_query)

    report = audit.add_parser("report", help="archived decisions counted by country, model, code...")
    _time_and_output(report)
    _record_filters(report)
    report.add_argument("--by", required=True, help="comma-separated: country,model,code (see the docs for all)")
    report.set_defaults(func=_report)
