"""Prometheus metrics of contract §9, with label children prepared ahead of the hot path.

With several worker processes, prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) sums the workers' values in every scrape.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .settings import Settings

if TYPE_CHECKING:
    from .policy import Snapshot
    from .watcher import PolicyWatcher

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                   120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25)
LIST_NAMES = ("deny-countries", "deny-entities", "partners", "ip-ranges")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """All gateway metrics on one registry; methods are what the request path calls."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        gauge_mode: dict[str, Any] = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        max_mode: dict[str, Any] = {"multiprocess_mode": "max"} if self.multiprocess else {}
        self.requests = Counter("gateway_requests", "Requests by decision, code, model and tier",
                                ["decision", "code", "model", "tier"], registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "Whole request time by decision",
                                  ["decision"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("gateway_overhead_seconds",
                                  "Time the gateway adds to a request (total minus upstream)",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.upstream = Histogram("gateway_upstream_duration_seconds", "Upstream time of proxied requests",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("gateway_upstream_errors", "Upstream failures by kind", ["kind"],
                                       registry=r)
        self.in_flight = Gauge("gateway_in_flight_requests", "Requests being handled", registry=r,
                               **gauge_mode)
        self.policy_version = Gauge("gateway_policy_version", "Policy version this process enforces",
                                    registry=r, **max_mode)
        self.policy_age = Gauge("gateway_policy_age_seconds", "Seconds since the policy was last confirmed",
                                registry=r, **max_mode)
        self.list_entries = Gauge("gateway_list_entries", "Entries per live list", ["list"], registry=r,
                                  **max_mode)
        self.redis_errors = Counter("gateway_redis_errors", "Redis errors and timeouts by operation",
                                    ["op"], registry=r)
        self.fallback = Counter("gateway_ratelimit_fallback", "Rate-limit checks served by the local limiter",
                                registry=r)
        self.audit_spooled = Counter("gateway_audit_spooled", "Audit records written to the local spool",
                                     registry=r)
        self.audit_dropped = Counter("gateway_audit_dropped", "Audit records lost (disk full)", registry=r)
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._duration_children = {d: self.duration.labels(d) for d in ("allow", "block", "rate_limit",
                                                                        "error")}
        for name in LIST_NAMES:
            self.list_entries.labels(name).set(0)
        for kind in ("connect", "timeout", "protocol"):
            self.upstream_errors.labels(kind)
        self.tiers = tuple(settings.tiers)

    def model_label(self, model: str | None, snapshot: Snapshot | None) -> str:
        if model is None:
            return ""
        if snapshot is not None and model in snapshot.models:
            return model
        return "other"

    def request_done(self, *, decision: str, code: str, model: str, tier: str, duration_s: float,
                     upstream_s: float) -> None:
        key = (decision, code, model, tier)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()
        self._duration_children[decision].observe(duration_s)
        if decision == "allow":
            self.upstream.observe(upstream_s)
            self.overhead.observe(max(duration_s - upstream_s, 0.0))
        else:
            self.overhead.observe(duration_s)

    def redis_error(self, op: str) -> None:
        self.redis_errors.labels(op).inc()

    def ratelimit_fallback(self) -> None:
        self.fallback.inc()

    def policy_loaded(self, snapshot: Snapshot | None) -> None:
        self.policy_version.set(snapshot.version if snapshot is not None else 0)
        for name in LIST_NAMES:
            entries = snapshot.lists.get(name, {}) if snapshot is not None else {}
            self.list_entries.labels(name).set(len(entries))
        if snapshot is not None:
            # Label children for the registry's models, so scrapes show them from the start.
            self._request_children = {k: v for k, v in self._request_children.items()
                                      if k[2] in snapshot.models or k[2] in ("", "other")}

    def render(self, watcher: PolicyWatcher | None) -> tuple[bytes, str]:
        if watcher is not None:
            age = watcher.age_s()
            self.policy_age.set(age if age != float("inf") else -1)
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
