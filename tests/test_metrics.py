"""Contract §9 metrics, scraped from running gateway processes after known traffic."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import DECISIONS, LATENCY_BUCKETS, OVERHEAD_BUCKETS, Metrics
from gateway.redis_server import RedisServer, free_port
from gateway.settings import parse_settings

from .support.gateway_process import BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CONTRACT_METRICS: dict[str, set[str]] = {
    # exposition sample name -> its label names (contract §9)
    "gateway_requests_total": {"decision", "code", "model", "tier"},
    "gateway_request_duration_seconds_bucket": {"decision", "le"},
    "gateway_overhead_seconds_bucket": {"le"},
    "gateway_upstream_duration_seconds_bucket": {"le"},
    "gateway_upstream_errors_total": {"kind"},
    "gateway_in_flight_requests": set(),
    "gateway_policy_version": set(),
    "gateway_policy_age_seconds": set(),
    "gateway_list_entries": {"list"},
    "gateway_redis_errors_total": {"op"},
    "gateway_ratelimit_fallback_total": set(),
    "gateway_audit_spooled_total": set(),
    "gateway_audit_dropped_total": set(),
    "gateway_revoked_requests_total": {"code"},
}

METRICS_POLICY: dict[str, Any] = {
    "lists": {
        **BASE_POLICY["lists"],
        "deny-entities": {
            "evil-corp": {"reason": "test", "source": "test"},
            "evil-org": {"reason": "test", "source": "test"},
        },
    },
    "models": {
        **BASE_POLICY["models"],
        "secret-model": {"stage": "internal", "timeline": [], "allowed_countries": None, "export_suspended": False},
    },
}

TIERS = {
    # Refused answers (401s under the default tier among them) are limited apart: not what is measured here.
    "public": {
        "requests_per_minute": 1,
        "burst": 1,
        "tokens_per_minute": None,
        "stages": ["general"],
        "blocked_per_minute": 1000,
    },
    "partner": {
        "requests_per_minute": 6000,
        "burst": 600,
        "tokens_per_minute": None,
        "stages": ["partners", "general"],
    },
    "internal": {
        "requests_per_minute": 6000,
        "burst": 600,
        "tokens_per_minute": None,
        "stages": ["internal", "partners", "general"],
    },
}


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(admin_url: str) -> Samples:
    async with aiohttp.ClientSession() as client, client.get(admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing sample fails the test (it should have been prepared)."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels`` (e.g. over worker pids)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def metrics_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_every_metric_and_label_after_known_traffic(metrics_redis: RedisServer, upstream: Upstream) -> None:
    version = seed_policy(metrics_redis.url, METRICS_POLICY)
    dead = f"http://127.0.0.1:{free_port()}"
    config = gateway_config(
        upstream.url,
        tiers=TIERS,
        limits={"max_body_bytes": 1024},
        policy={"unknown_model": "allow"},
        upstream={"routes": {"dead-*": dead}},
    )
    gateway = GatewayProcess(config, redis_url=metrics_redis.url).start()
    try:
        before = await scrape(gateway.admin_url)
        # Children are prepared when the snapshot loads: a zero series exists before any traffic.
        assert (
            value(
                before,
                "gateway_requests_total",
                decision="block",
                code="export_suspended",
                model="secret-model",
                tier="partner",
            )
            == 0
        )
        assert value(before, "gateway_requests_total", decision="allow", code="", model="gpt-mock", tier="public") == 0
        await _known_traffic(gateway)
        samples = await scrape(gateway.admin_url)
    finally:
        gateway.stop()

    for name, label_names in CONTRACT_METRICS.items():
        found = [dict(ls) for (n, ls) in samples if n == name]
        assert found, f"{name} missing from the exposition"
        assert all(set(labels) == label_names for labels in found), (name, found[:3])

    def requests(decision: str, code: str, model: str, tier: str) -> float:
        return value(samples, "gateway_requests_total", decision=decision, code=code, model=model, tier=tier)

    assert requests("allow", "", "gpt-mock", "partner") == 3
    assert requests("allow", "", "other", "partner") == 1  # unknown model, allowed by config
    assert requests("block", "country_denied", "gpt-mock", "partner") == 1  # 451
    assert requests("block", "entity_denied", "gpt-mock", "partner") == 1  # 451
    assert requests("block", "not_released", "secret-model", "partner") == 1  # 403
    assert requests("block", "unauthenticated", "", "") == 2  # 401: none and a bad token
    assert requests("rate_limit", "rate_limited", "gpt-mock", "public") == 1  # 429
    assert requests("allow", "", "gpt-mock", "public") == 1
    assert requests("error", "request_too_large", "", "partner") == 1  # 413
    assert requests("error", "upstream_unreachable", "other", "partner") == 1  # 502
    assert total(samples, "gateway_requests_total") == 13

    assert value(samples, "gateway_upstream_errors_total", kind="connect") == 1
    assert value(samples, "gateway_upstream_errors_total", kind="timeout") == 0
    assert value(samples, "gateway_request_duration_seconds_count", decision="allow") == 5
    assert value(samples, "gateway_request_duration_seconds_count", decision="block") == 5
    assert value(samples, "gateway_request_duration_seconds_count", decision="rate_limit") == 1
    assert value(samples, "gateway_request_duration_seconds_count", decision="error") == 2
    assert value(samples, "gateway_overhead_seconds_count") == 13
    assert value(samples, "gateway_upstream_duration_seconds_count") == 5
    assert value(samples, "gateway_in_flight_requests") == 0
    assert value(samples, "gateway_policy_version") == version
    assert 0 <= value(samples, "gateway_policy_age_seconds") < 3
    assert value(samples, "gateway_list_entries", list="deny-countries") == 1
    assert value(samples, "gateway_list_entries", list="deny-entities") == 2
    assert value(samples, "gateway_list_entries", list="partners") == 1
    assert value(samples, "gateway_list_entries", list="ip-ranges") == 0
    assert value(samples, "gateway_audit_dropped_total") == 0
    assert value(samples, "gateway_audit_spooled_total") == 0

    # Bounded labels: no caller's subject, org, model name of its own choosing, or address.
    label_values = {v for (_n, ls) in samples for _k, v in ls}
    for leaked in ("alice", "bob", "acme", "evil-org", "mystery-model", "dead-model", "127.0.0.1"):
        assert leaked not in label_values


async def _known_traffic(gateway: GatewayProcess) -> None:
    partner = auth()
    big = b"x" * 2000
    expected = [
        ("POST", {"model": "gpt-mock"}, partner, 200),
        ("POST", {"model": "gpt-mock"}, partner, 200),
        ("POST", {"model": "gpt-mock"}, partner, 200),
        ("POST", {"model": "mystery-model"}, partner, 200),
        ("POST", {"model": "gpt-mock"}, auth(hs_token(country="IR")), 451),
        ("POST", {"model": "gpt-mock"}, auth(hs_token(org="evil-org")), 451),
        ("POST", {"model": "secret-model"}, partner, 403),
        ("POST", {"model": "gpt-mock"}, {}, 401),
        ("POST", {"model": "gpt-mock"}, auth("not-a-token"), 401),
        ("POST", {"model": "gpt-mock"}, auth(hs_token("bob", tier="public")), 200),
        ("POST", {"model": "gpt-mock"}, auth(hs_token("bob", tier="public")), 429),
        ("POST", big, partner, 413),
        ("POST", {"model": "dead-model"}, partner, 502),
    ]
    async with aiohttp.ClientSession() as client:
        for method, body, headers, status in expected:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with client.request(
                method, gateway.url + "/v1/chat/completions", headers=headers, **kwargs
            ) as response:
                assert response.status == status, (body, status, await response.text())


async def test_new_registry_models_get_children_and_version_follows(
    metrics_redis: RedisServer, upstream: Upstream
) -> None:
    first = seed_policy(metrics_redis.url, METRICS_POLICY)
    gateway = GatewayProcess(gateway_config(upstream.url), redis_url=metrics_redis.url).start()
    try:
        assert value(await scrape(gateway.admin_url), "gateway_policy_version") == first
        models = {**METRICS_POLICY["models"], "fresh-model": METRICS_POLICY["models"]["gpt-mock"]}
        second = seed_policy(metrics_redis.url, {**METRICS_POLICY, "models": models})
        assert second > first
        samples: Samples = {}
        for _ in range(100):
            samples = await scrape(gateway.admin_url)
            if samples.get(("gateway_policy_version", frozenset())) == second:
                break
            await asyncio.sleep(0.05)
        assert value(samples, "gateway_policy_version") == second
        assert (
            value(samples, "gateway_requests_total", decision="allow", code="", model="fresh-model", tier="partner")
            == 0
        )
    finally:
        gateway.stop()


async def test_redis_errors_and_local_rate_limit_counted_while_redis_is_away(
    fresh_redis: RedisServer, upstream: Upstream
) -> None:
    seed_policy(fresh_redis.url)
    config = gateway_config(upstream.url, policy={"max_staleness_s": 30})
    gateway = GatewayProcess(config, redis_url=fresh_redis.url).start()
    try:
        before = await scrape(gateway.admin_url)
        assert value(before, "gateway_redis_errors_total", op="poll") == 0
        fresh_redis.stop()
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as client:
            for _ in range(3):  # served from the last snapshot, limited locally
                async with client.post(
                    gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=auth()
                ) as response:
                    assert response.status == 200
        after = await scrape(gateway.admin_url)
    finally:
        gateway.stop()
    assert value(after, "gateway_redis_errors_total", op="poll") >= 2
    assert value(after, "gateway_ratelimit_fallback_total") >= 3
    assert value(after, "gateway_policy_age_seconds") >= 0.4


async def test_workers_are_summed_in_one_scrape(metrics_redis: RedisServer, upstream: Upstream) -> None:
    version = seed_policy(metrics_redis.url, METRICS_POLICY)
    client_redis = redis_sync.Redis.from_url(metrics_redis.url)
    client_redis.delete("gw:audit")
    gateway = GatewayProcess(
        gateway_config(upstream.url, audit={"flush_ms": 20}), redis_url=metrics_redis.url, workers=2
    ).start()
    requests = 40
    try:
        await _wait_for_workers(gateway, 2)
        for _ in range(requests):
            # A new connection per request, so the kernel spreads them over both workers.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
                async with client.get(gateway.url + "/v1/models", headers=auth()) as response:
                    assert response.status == 200
        samples = await scrape(gateway.admin_url)
        await asyncio.sleep(0.3)
        producers = {fields[b"id"].split(b"-")[0] for _id, fields in client_redis.xrange("gw:audit")}
    finally:
        gateway.stop()
        client_redis.close()
    assert len(producers) == 2, "both workers must have served requests"
    assert total(samples, "gateway_requests_total") == requests
    assert value(samples, "gateway_requests_total", decision="allow", code="", model="", tier="partner") == requests
    assert value(samples, "gateway_overhead_seconds_count") == requests
    assert value(samples, "gateway_policy_version") == version
    assert value(samples, "gateway_in_flight_requests") == 0
    assert value(samples, "gateway_list_entries", list="deny-entities") == 2


async def _wait_for_workers(gateway: GatewayProcess, count: int) -> set[int]:
    """A worker answers /healthz only once started (policy loaded), so distinct pids mean ready workers."""
    pids: set[int] = set()
    for _ in range(300):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            async with client.get(gateway.admin_url + "/healthz") as health:
                pids.add((await health.json())["pid"])
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {len(pids)} of {count} workers answered")


PROCESS_SERIES = (
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
)


def _proc_rss_and_fds(pid: int) -> tuple[float, int]:
    """A process's resident memory (bytes) and open descriptors, read from /proc as the collector does."""
    import os

    with open(f"/proc/{pid}/stat", "rb") as stat:
        rss_pages = int(stat.read().split(b")")[-1].split()[21])
    return float(rss_pages * os.sysconf("SC_PAGE_SIZE")), len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("workers", [1, 2])
async def test_process_metrics_cover_every_worker(metrics_redis: RedisServer, upstream: Upstream, workers: int) -> None:
    import time

    seed_policy(metrics_redis.url, METRICS_POLICY)
    started = time.time()
    gateway = GatewayProcess(
        gateway_config(upstream.url, tiers=TIERS), redis_url=metrics_redis.url, workers=workers
    ).start()
    headers = auth(hs_token(f"process-metrics-{workers}-{time.monotonic_ns()}"))  # a rate bucket of its own
    try:
        pids = await _wait_for_workers(gateway, workers)
        first = await scrape(gateway.admin_url)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            for _ in range(200):  # some CPU for the counter to show
                async with client.get(gateway.url + "/v1/models", headers=headers) as response:
                    assert response.status == 200
        await asyncio.sleep(1.2)  # every worker refreshes its readings once a second
        readings = [_proc_rss_and_fds(pid) for pid in pids]
        samples = await scrape(gateway.admin_url)
    finally:
        gateway.stop()
    for name in PROCESS_SERIES:
        assert [ls for (n, ls) in samples if n == name] == [frozenset()], f"{name}: one series, no labels"
    rss = value(samples, "process_resident_memory_bytes")
    own_rss = sum(r for r, _ in readings)
    # The sum over the workers (each within a second of the scrape), not one worker's figure.
    assert 0.8 * own_rss <= rss <= 1.25 * own_rss, (rss, readings)
    fds = value(samples, "process_open_fds")
    assert abs(fds - sum(f for _, f in readings)) <= 4 * workers, (fds, readings)
    assert value(samples, "process_max_fds") >= 256
    assert started - 5 <= value(samples, "process_start_time_seconds") <= time.time()
    assert value(samples, "process_virtual_memory_bytes") >= rss
    assert value(samples, "process_cpu_seconds_total") > value(first, "process_cpu_seconds_total") > 0


def test_request_counts_taken_in_plain_integers_scrape_as_prometheus_client_counts_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One process counts each request in plain integers and hands the counts to prometheus-client
    when scraped: the exposition is what observing every request in prometheus-client gives, bucket
    edges, +Inf and scrapes in between included."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics(parse_settings({"upstream": {"url": "http://127.0.0.1:9"}}, environ={}))
    reference = CollectorRegistry()
    requests = Counter("gateway_requests", "", ["decision", "code", "model", "tier"], registry=reference)
    duration = Histogram(
        "gateway_request_duration_seconds", "", ["decision"], buckets=LATENCY_BUCKETS, registry=reference
    )
    overhead = Histogram("gateway_overhead_seconds", "", buckets=OVERHEAD_BUCKETS, registry=reference)
    upstream = Histogram("gateway_upstream_duration_seconds", "", buckets=LATENCY_BUCKETS, registry=reference)
    for decision in DECISIONS:
        duration.labels(decision)
    edges = [0.0, *LATENCY_BUCKETS, *OVERHEAD_BUCKETS, 301.0, 1e9]
    chosen = random.Random(19)
    keys = [("allow", "", "", "public"), ("block", "unauthenticated", "", ""), ("error", "upstream_timeout", "x", "z")]
    for round_ in range(3):
        for _ in range(400):
            decision, code, model, tier = chosen.choice(keys)
            total_s = chosen.choice(edges) if chosen.random() < 0.5 else chosen.uniform(0, 2)
            upstream_s = chosen.choice([0.0, total_s, total_s / 2, chosen.choice(edges)])
            metrics.request_done(
                decision=decision, code=code, model=model, tier=tier, duration_s=total_s, upstream_s=upstream_s
            )
            requests.labels(decision, code, model, tier).inc()
            duration.labels(decision).observe(total_s)
            if decision == "allow":
                upstream.observe(upstream_s)
                overhead.observe(max(total_s - upstream_s, 0.0))
            else:
                overhead.observe(total_s)
        ours = parse(generate_latest(metrics.registry).decode())  # a scrape: the counts so far handed over
        theirs = parse(generate_latest(reference).decode())
        compared = [key for key in theirs if not key[0].endswith("_sum")]
        assert len(compared) > 100, round_
        assert {key: ours.get(key) for key in compared} == {key: theirs[key] for key in compared}
        for key in theirs:
            if key[0].endswith("_sum"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key


def test_requests_in_flight_are_read_when_scraped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics(parse_settings({"upstream": {"url": "http://127.0.0.1:9"}}, environ={}))

    def in_flight() -> float:
        return value(parse(metrics.render(None)[0].decode()), "gateway_in_flight_requests")

    metrics.request_started()
    metrics.request_started()
    assert in_flight() == 2
    metrics.request_ended()
    assert in_flight() == 1
    metrics.request_ended()
    assert in_flight() == 0
