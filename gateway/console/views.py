"""What the console's pages show, computed from what the gateway holds: the decisions-per-minute
chart, the process's policy gauges and firing alerts read from its metrics, change diffs, and the
audit trail filtered and written as CSV. Pure functions over data; no I/O.
"""

from __future__ import annotations

import csv
import difflib
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

# The audit fields shown and exported, in this order.
AUDIT_COLUMNS = (
    "time",
    "request_id",
    "subject",
    "org",
    "tier",
    "claimed_country",
    "client_ip",
    "ip_country",
    "model",
    "decision",
    "code",
    "status",
    "upstream_status",
    "policy_version",
    "duration_ms",
)
# The admin API's audit filters (exact), then the console's own two over what they find.
AUDIT_FILTERS = ("subject", "org", "model", "code", "since", "until", "decision", "country")
CONSOLE_ONLY_FILTERS = ("decision", "country")
CHART_MINUTES = 60
ALERT_COUNTERS = ("gateway_redis_errors_total", "gateway_audit_spooled_total", "gateway_audit_dropped_total")
# Fixed colours per well-known code so a chart reads the same from day to day (and in screenshots).
CODE_COLOURS = {
    "": "#2e7d32",
    "country_denied": "#c62828",
    "export_restricted": "#ad1457",
    "export_suspended": "#6a1b9a",
    "entity_denied": "#4527a0",
    "unauthenticated": "#ef6c00",
    "rate_limited": "#f9a825",
    "not_released": "#00838f",
    "partner_required": "#1565c0",
    "model_unknown": "#5d4037",
}
OTHER_COLOURS = ("#37474f", "#827717", "#283593", "#bf360c")


@dataclass(slots=True)
class Bar:
    x: float
    y: float
    height: float
    colour: str
    label: str


@dataclass(slots=True)
class Chart:
    """Stacked bars, one per minute, by decision code; sizes in SVG user units."""

    width: int = 720
    height: int = 200
    bars: list[Bar] = field(default_factory=list)
    legend: list[tuple[str, str, int]] = field(default_factory=list)  # (code, colour, requests)
    peak: int = 0
    total: int = 0
    start: str = ""
    end: str = ""


def parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def minute_chart(records: Iterable[bytes | Mapping[str, Any]], now: float) -> Chart:
    """Decisions per minute by code over the last hour, from audit records (newest first or not)."""
    end_minute = int(now // 60)
    start_minute = end_minute - CHART_MINUTES + 1
    counts: dict[int, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for raw in records:
        record = orjson.loads(raw) if isinstance(raw, bytes) else raw
        at = parse_time(record.get("time"))
        if at is None:
            continue
        minute = int(at // 60)
        if not start_minute <= minute <= end_minute:
            continue
        code = str(record.get("code") or "")
        counts.setdefault(minute, Counter())[code] += 1
        totals[code] += 1
    chart = Chart()
    chart.start = _clock(start_minute * 60)
    chart.end = _clock(end_minute * 60 + 59)
    chart.total = sum(totals.values())
    chart.peak = max((sum(c.values()) for c in counts.values()), default=0)
    others = iter(OTHER_COLOURS * 8)
    colours = {code: CODE_COLOURS.get(code) or next(others, "#455a64") for code, _n in totals.most_common()}
    chart.legend = [(code or "allowed", colours[code], n) for code, n in totals.most_common()]
    if chart.peak == 0:
        return chart
    slot = chart.width / CHART_MINUTES
    for index in range(CHART_MINUTES):
        minute_counts = counts.get(start_minute + index)
        if not minute_counts:
            continue
        base = float(chart.height)
        for code, n in sorted(minute_counts.items()):
            height = chart.height * n / chart.peak
            base -= height
            label = f"{_clock((start_minute + index) * 60)} {code or 'allowed'}: {n}"
            chart.bars.append(Bar(x=index * slot + 1, y=base, height=height, colour=colours[code], label=label))
    return chart


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M")


@dataclass(frozen=True, slots=True)
class ProcessGauge:
    process: str
    version: int
    age_s: float


@dataclass(slots=True)
class MetricsView:
    processes: list[ProcessGauge] = field(default_factory=list)
    alerts: list[tuple[str, str]] = field(default_factory=list)  # (name, what it means)


def read_metrics(exposition: str, *, max_staleness_s: float) -> MetricsView:
    """This gateway's policy version and age per process, and the alerts its counters show firing.

    The alerts are deploy/prometheus/alerts.yml's, read on this gateway's counters since it started
    (Prometheus itself judges them over its own windows)."""
    view = MetricsView()
    versions: dict[str, float] = {}
    ages: dict[str, float] = {}
    sums: dict[str, float] = dict.fromkeys(ALERT_COUNTERS, 0.0)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            process = sample.labels.get("pid", "this process")
            if sample.name == "gateway_policy_version":
                versions[process] = sample.value
            elif sample.name == "gateway_policy_age_seconds":
                ages[process] = sample.value
            elif sample.name in ALERT_COUNTERS:
                sums[sample.name] += sample.value
    for process in sorted(versions):
        view.processes.append(ProcessGauge(process, int(versions[process]), ages.get(process, float("inf"))))
    if any(g.version == 0 or g.age_s > max_staleness_s for g in view.processes):
        view.alerts.append(("GatewayPolicyStale", "a process holds no policy it can vouch for: callers get 503"))
    if sums["gateway_redis_errors_total"] > 0:
        view.alerts.append(("GatewayRedisErrors", f"{sums['gateway_redis_errors_total']:.0f} Redis errors"))
    if sums["gateway_audit_spooled_total"] > 0:
        view.alerts.append(("GatewayAuditSpooling", "audit records waited in the local spool for Redis"))
    if sums["gateway_audit_dropped_total"] > 0:
        view.alerts.append(("GatewayAuditDropped", f"{sums['gateway_audit_dropped_total']:.0f} audit records lost"))
    return view


def pretty(value: Any) -> str:
    if value is None:
        return ""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def diff_lines(before: Any, after: Any) -> list[tuple[str, str]]:
    """A line diff of two JSON values: (``add``|``del``|``same``, line)."""
    out: list[tuple[str, str]] = []
    for line in difflib.ndiff(pretty(before).splitlines(), pretty(after).splitlines()):
        tag, text = line[:2], line[2:]
        if tag == "+ ":
            out.append(("add", text))
        elif tag == "- ":
            out.append(("del", text))
        elif tag == "  ":
            out.append(("same", text))
    return out


def audit_matches(record: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    """Whether a record passes every filter given (exact, case-insensitive; ``country`` is either the
    claimed or the IP country)."""
    for name, wanted in filters.items():
        want = wanted.strip().lower()
        if not want:
            continue
        if name == "country":
            have = {str(record.get("claimed_country") or "").lower(), str(record.get("ip_country") or "").lower()}
            if want not in have:
                return False
        elif str(record.get(name) or "").lower() != want:
            return False
    return True


def audit_csv(records: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(AUDIT_COLUMNS)
    for record in records:
        writer.writerow([_csv_cell(record.get(column)) for column in AUDIT_COLUMNS])
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula is kept as text.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
