"""Prometheus metrics of contract §9, with label children prepared ahead of the hot path.

Label values are bounded by construction: ``decision`` and ``code`` come from
the gateway's own fixed sets, ``model`` is a registry model or ``other`` (``""``
when a request names none), ``tier`` a configured tier (``""`` before identity
is known). No subject, org, key or IP ever becomes a label value.

With several worker processes, prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by ``serve --workers N``) adds up counters
and histograms over the workers in every scrape. Gauges say how they combine:
in-flight requests add up; the policy version shows the lowest any worker
enforces and the policy age the oldest, so one lagging worker is never hidden
behind a healthy one.

The standard ``process_*`` series (memory, CPU, open files, start time) come from
prometheus-client's process collector in one process. Its multiprocess mode does
not carry them, so with workers each worker copies its own readings into gauges
and a counter that the multiprocess collector combines: memory, CPU seconds and
open files summed over the workers (the gateway's whole footprint), the file
limit the lowest and the start time the earliest of any worker.

In one process, the per-request series (requests, the three latency histograms,
requests in flight) are counted in plain Python integers on the request path and
handed to prometheus-client whenever its registry is read (a scrape): the same
series, names, buckets and values, without prometheus-client's lock and calls on
every request. Everything runs on the one event loop, so nothing else writes them
meanwhile. With workers, each worker's values must be in its files the moment a
scrape in another worker reads them, so those series are updated as each request
ends, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from .policy.names import LIST_NAMES
from .settings import Settings

if TYPE_CHECKING:
    from .policy.model import Snapshot
    from .watcher import PolicyWatcher

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
DECISIONS = ("allow", "block", "rate_limit", "error")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "protocol")
REDIS_OPS = ("poll", "load", "script", "audit", "write", "publish", "ping", "changes", "admin")
GAUGE_REFRESH_S = 1.0

# Which codes each decision can carry, and which model and tier labels they can meet,
# so the children prepared ahead are the ones that can occur and no more.
ANY_MODEL, NO_MODEL, OTHER_MODEL, REGISTRY_MODEL = "any", "none", "other", "registry"
CODES: tuple[tuple[str, str, str, bool], ...] = (
    # decision, code, which models, tier known
    ("allow", "", ANY_MODEL, True),
    ("block", "policy_stale", NO_MODEL, False),
    ("block", "unauthenticated", NO_MODEL, False),
    ("block", "entity_denied", ANY_MODEL, True),
    ("block", "country_denied", ANY_MODEL, True),
    ("block", "model_unknown", OTHER_MODEL, True),
    ("block", "export_suspended", REGISTRY_MODEL, True),
    ("block", "export_restricted", REGISTRY_MODEL, True),
    ("block", "not_released", REGISTRY_MODEL, True),
    ("block", "partner_required", REGISTRY_MODEL, True),
    ("rate_limit", "rate_limited", ANY_MODEL, True),
    ("rate_limit", "token_rate_limited", ANY_MODEL, True),
    ("error", "invalid_request", NO_MODEL, True),
    ("error", "request_too_large", NO_MODEL, True),
    ("error", "upstream_unreachable", ANY_MODEL, True),
    ("error", "upstream_timeout", ANY_MODEL, True),
)

# The codes a request in flight can be ended with when a new policy version refuses it.
REVOKED_CODES = (
    "unauthenticated",
    "entity_denied",
    "country_denied",
    "model_unknown",
    "export_suspended",
    "export_restricted",
    "not_released",
    "partner_required",
)

RequestKey = tuple[str, str, str, str]

# What gateway_shadow_decisions_total{code} can be labelled with: the codes of rows 2-8 a shadow
# decision can carry, and "" when the shadow policy allows what the live one blocks.
SHADOW_CODES = (
    "",
    "entity_denied",
    "country_denied",
    "model_required",
    "ambiguous_request",
    "model_unknown",
    "export_suspended",
    "export_restricted",
    "not_released",
    "partner_required",
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def request_label_sets(models: Iterable[str], tiers: Iterable[str]) -> list[RequestKey]:
    """Every (decision, code, model, tier) that a request can produce under this registry."""
    registry = sorted(models)
    tier_values = list(tiers)
    choices = {ANY_MODEL: ["", "other", *registry], NO_MODEL: [""], OTHER_MODEL: ["other"], REGISTRY_MODEL: registry}
    keys: list[RequestKey] = []
    for decision, code, model_set, tier_known in CODES:
        for model in choices[model_set]:
            for tier in tier_values if tier_known else [""]:
                keys.append((decision, code, model, tier))
    return keys


# How a scrape combines the workers' values of a gauge (the modes Gauge accepts).
MultiprocessMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"
]

# process_* gauge -> how a scrape combines the workers' values (prometheus-client multiprocess modes).
PROCESS_GAUGES: dict[str, tuple[str, MultiprocessMode]] = {
    "process_resident_memory_bytes": ("Resident memory size in bytes, summed over workers", "livesum"),
    "process_virtual_memory_bytes": ("Virtual memory size in bytes, summed over workers", "livesum"),
    "process_open_fds": ("Number of open file descriptors, summed over workers", "livesum"),
    "process_max_fds": ("Maximum number of open file descriptors; over workers the lowest", "livemin"),
    "process_start_time_seconds": (
        "Start time of the process since unix epoch in seconds; over workers the earliest",
        "livemin",
    ),
}


class WorkerProcessMetrics:
    """``process_*`` for one worker among several, written where the multiprocess collector reads them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Reads /proc/self like the single-process collector, so the numbers mean the same; not registered.
        self._source = ProcessCollector(registry=None)
        self._gauges = {
            name: Gauge(name, help_text, registry=registry, multiprocess_mode=mode)
            for name, (help_text, mode) in PROCESS_GAUGES.items()
        }
        # A counter, so a worker's CPU seconds still count after it exits, as a total should.
        self._cpu = Counter(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds, summed over workers",
            registry=registry,
        )
        self._cpu_counted = 0.0
        self.refresh()

    def refresh(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                gauge = self._gauges.get(sample.name)
                if gauge is not None:
                    gauge.set(sample.value)
                elif sample.name == "process_cpu_seconds_total" and sample.value > self._cpu_counted:
                    self._cpu.inc(sample.value - self._cpu_counted)
                    self._cpu_counted = sample.value


class _Pending:
    """Observations of one histogram child not yet handed to it: a count per bucket and their sum.

    ``bounds`` are the child's finite upper bounds; an observation's bucket is the first bound at or
    above it (``bisect_left``), the last slot being ``+Inf``, as prometheus-client places it.
    """

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Any, bounds: tuple[float, ...]) -> None:
        self.child = child
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def fold(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        # prometheus-client has no public way to add n observations at once; its child keeps one
        # value per bucket (not cumulative) and one for the sum, which is what is added to here.
        buckets = self.child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        self.child._sum.inc(self.sum)
        self.sum = 0.0


class _FoldOnCollect:
    """Registered first on the registry: every read of it (a scrape) first folds the pending counts in."""

    def __init__(self, fold: Callable[[], None]) -> None:
        self._fold = fold

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._fold()
        return []


class Metrics:
    """All gateway metrics on one registry; methods are what the request path calls."""

    # What the public handler calls as a request starts and ends (requests in flight).
    request_started: Callable[[], None]
    request_ended: Callable[[], None]

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        # ``*_created`` series double the exposition and no dashboard reads them.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        self.tiers = tuple(settings.tiers)
        r = self.registry
        # Counted in plain integers in one process (see the module docstring); with workers, at once.
        self._deferred = not self.multiprocess
        if self._deferred:
            r.register(_FoldOnCollect(self.fold))
        self.requests = Counter(
            "gateway_requests",
            "Requests by decision, code, model and tier",
            ["decision", "code", "model", "tier"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request time by decision",
            ["decision"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time the gateway adds to a request (total minus upstream)",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "gateway_upstream_duration_seconds",
            "Upstream time of proxied requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter("gateway_upstream_errors", "Upstream failures by kind", ["kind"], registry=r)
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.policy_version = Gauge(
            "gateway_policy_version",
            "Policy version enforced (0: none); over workers the lowest",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.policy_age = Gauge(
            "gateway_policy_age_seconds",
            "Seconds since the policy version was last confirmed (+Inf: never); over workers the oldest",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.list_entries = Gauge(
            "gateway_list_entries",
            "Entries per live list in the enforced policy",
            ["list"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.redis_errors = Counter(
            "gateway_redis_errors", "Redis errors and timeouts by operation", ["op"], registry=r
        )
        self.fallback = Counter(
            "gateway_ratelimit_fallback", "Rate-limit checks served by the local limiter", registry=r
        )
        self.audit_spooled = Counter(
            "gateway_audit_spooled", "Audit records written to the local spool while Redis was away", registry=r
        )
        self.audit_dropped = Counter(
            "gateway_audit_dropped", "Audit records lost (queue full: Redis and spool both failing)", registry=r
        )
        self.revoked_requests = Counter(
            "gateway_revoked_requests",
            "Requests in flight ended because a new policy version refuses them, by code",
            ["code"],
            registry=r,
        )
        self.shadow_decisions = Counter(
            "gateway_shadow_decisions",
            "Requests the shadow policy (shadow entries enforced) decides otherwise, by its code (empty: allow)",
            ["code"],
            registry=r,
        )
        self._shadow_codes = {code: self.shadow_decisions.labels(code) for code in SHADOW_CODES}
        self.audit_trimmed = Counter(
            "gateway_audit_trimmed",
            "Audit records trimmed from Redis by audit.stream_maxlen unarchived (archiving off)",
            registry=r,
        )
        self.audit_unarchived = Gauge(
            "gateway_audit_unarchived_records",
            "Audit records in Redis not yet archived (archiving on); over workers the largest reading",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.screening_review = Counter(
            "gateway_screening_review",
            "Requests whose caller's organisation screened in the review band: recorded, not blocked",
            registry=r,
        )
        # Memory, CPU and open files: read at each scrape in one process; with workers, each worker's
        # readings are refreshed with the policy gauges (a scrape reaches one worker, not all of them).
        self._process: WorkerProcessMetrics | None = None
        if self.multiprocess:
            self._process = WorkerProcessMetrics(r)
        else:
            ProcessCollector(registry=r)
        self._requests: dict[RequestKey, Any] = {}
        self._durations = {d: self.duration.labels(d) for d in DECISIONS}
        self._pending_requests: dict[RequestKey, int] = {}
        latency, overhead = tuple(map(float, LATENCY_BUCKETS)), tuple(map(float, OVERHEAD_BUCKETS))
        self._pending_durations = {d: _Pending(child, latency) for d, child in self._durations.items()}
        self._pending_overhead = _Pending(self.overhead, overhead)
        self._pending_upstream = _Pending(self.upstream, latency)
        self.in_flight_now = 0  # requests in flight, in one process; the gauge reads it when scraped
        if self._deferred:
            self.request_started, self.request_ended = self._started, self._ended
            self.in_flight.set_function(lambda: self.in_flight_now)
        else:
            self.request_started, self.request_ended = self.in_flight.inc, self.in_flight.dec
        self._redis_errors = {op: self.redis_errors.labels(op) for op in REDIS_OPS}
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)
        self._revoked = {code: self.revoked_requests.labels(code) for code in REVOKED_CODES}
        self.policy_version.set(0)
        self.policy_age.set(float("inf"))
        for name in LIST_NAMES:
            self.list_entries.labels(name).set(0)
        self._prepare(models=())
        self._task: asyncio.Task[None] | None = None

    def _prepare(self, models: Iterable[str]) -> None:
        for key in request_label_sets(models, self.tiers):
            if key not in self._requests:
                self._requests[key] = self.requests.labels(*key)

    # --- the request path -------------------------------------------------------------------

    def model_label(self, model: str | None, snapshot: Snapshot | None) -> str:
        if model is None:
            return ""
        if snapshot is not None and model in snapshot.models:
            return model
        return "other"

    def _started(self) -> None:
        self.in_flight_now += 1

    def _ended(self) -> None:
        self.in_flight_now -= 1

    def request_done(
        self, *, decision: str, code: str, model: str, tier: str, duration_s: float, upstream_s: float
    ) -> None:
        key = (decision, code, model, tier)
        if self._deferred:
            pending = self._pending_requests
            pending[key] = pending.get(key, 0) + 1
            histogram = self._pending_durations[decision]
            histogram.counts[bisect_left(histogram.bounds, duration_s)] += 1
            histogram.sum += duration_s
            overhead = self._pending_overhead
            if decision == "allow":
                upstream = self._pending_upstream
                upstream.counts[bisect_left(upstream.bounds, upstream_s)] += 1
                upstream.sum += upstream_s
                duration_s = max(duration_s - upstream_s, 0.0)
            overhead.counts[bisect_left(overhead.bounds, duration_s)] += 1
            overhead.sum += duration_s
            return
        child = self._requests.get(key)
        if child is None:  # a combination not foreseen; still bounded, since every part is
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()
        self._durations[decision].observe(duration_s)
        if decision == "allow":
            self.upstream.observe(upstream_s)
            self.overhead.observe(max(duration_s - upstream_s, 0.0))
        else:
            self.overhead.observe(duration_s)

    def fold(self) -> None:
        """Hand the counts taken on the request path to prometheus-client (one process: at each read)."""
        pending = self._pending_requests
        if pending:
            for key, count in pending.items():
                child = self._requests.get(key)
                if child is None:  # a combination not foreseen; still bounded, since every part is
                    child = self._requests[key] = self.requests.labels(*key)
                child.inc(count)
            pending.clear()
        for histogram in self._pending_durations.values():
            histogram.fold()
        self._pending_overhead.fold()
        self._pending_upstream.fold()

    def request_revoked(self, code: str) -> None:
        child = self._revoked.get(code)
        if child is None:
            child = self._revoked[code] = self.revoked_requests.labels(code)
        child.inc()

    def shadow_decision(self, code: str) -> None:
        """One request the shadow policy decides otherwise; ``code`` is the shadow decision's ("" allow)."""
        child = self._shadow_codes.get(code)
        if child is None:  # a code not foreseen; still one of the decision's own, so bounded
            child = self._shadow_codes[code] = self.shadow_decisions.labels(code)
        child.inc()

    def redis_error(self, op: str) -> None:
        child = self._redis_errors.get(op)
        if child is None:
            child = self._redis_errors[op] = self.redis_errors.labels(op)
        child.inc()

    def ratelimit_fallback(self) -> None:
        self.fallback.inc()

    # --- policy gauges ----------------------------------------------------------------------

    def policy_loaded(self, snapshot: Snapshot | None) -> None:
        """Watcher callback on every snapshot swap: gauges, and label children for new models."""
        self.policy_version.set(snapshot.version if snapshot is not None else 0)
        for name in LIST_NAMES:
            entries = snapshot.lists.get(name, {}) if snapshot is not None else {}
            self.list_entries.labels(name).set(len(entries))
        if snapshot is not None:
            self._prepare(snapshot.models)

    def refresh_policy_gauges(self, watcher: PolicyWatcher) -> None:
        self.policy_version.set(watcher.version)
        self.policy_age.set(watcher.age_s())
        if self._process is not None:
            self._process.refresh()

    def start(self, watcher: PolicyWatcher) -> None:
        """Keep the age gauge current: with workers, a scrape reaches one worker, not all of them."""

        async def refresh() -> None:
            while True:
                self.refresh_policy_gauges(watcher)
                await asyncio.sleep(GAUGE_REFRESH_S)

        self._task = asyncio.create_task(refresh(), name="metrics-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- exposition -------------------------------------------------------------------------

    def render(self, watcher: PolicyWatcher | None) -> tuple[bytes, str]:
        if watcher is not None:
            self.refresh_policy_gauges(watcher)
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
