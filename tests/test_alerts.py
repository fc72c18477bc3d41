"""deploy/: every metric the alert rules and the Grafana dashboard query exists in a gateway's /metrics.

With promtool on PATH (Debian's ``prometheus`` package), the rules and the
Prometheus config are also checked by promtool, and the rules' unit tests run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from .support.gateway_process import ROOT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth
from .support.upstream import Upstream
from .test_metrics import Samples, scrape

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
# Series Prometheus makes itself (per target), not the gateway.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"instance", "job", "le"}
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "avg",
    "or",
    "and",
    "unless",
    "without",
    "on",
    "ignoring",
    "bool",
    "count",
    "le",
}
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
NAME = re.compile(r"\b([a-z_:][a-z0-9_:]*)\b(?!\s*\()")


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers not followed by '(' that are no keyword."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_braces = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "[]", without_braces)
    without_grouping = GROUPING.sub("", without_ranges)
    return {
        name
        for name in NAME.findall(without_grouping)
        if name not in PROMQL_WORDS and not name.startswith("__") and not name.isdigit()
    }


def labels_used(expr: str) -> set[str]:
    used: set[str] = set()
    for _name, matchers in SELECTOR.findall(expr):
        used |= {m.split("=")[0].rstrip("!~ ").strip() for m in matchers.split(",") if m.strip()}
    for group in GROUPING.findall(expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    return used


@pytest.fixture(scope="module")
def exposition(upstream: Upstream) -> Iterator[Samples]:
    """The /metrics samples of a gateway that served one request (so histograms have data)."""
    import asyncio

    from gateway.redis_server import RedisServer

    async def run(gateway: GatewayProcess) -> Samples:
        async with (
            aiohttp.ClientSession() as client,
            client.get(gateway.url + "/v1/models", headers=auth()) as response,
        ):
            assert response.status == 200
        return await scrape(gateway.admin_url)

    with RedisServer() as redis_server:
        seed_policy(redis_server.url)
        gateway = GatewayProcess(gateway_config(upstream.url), redis_url=redis_server.url).start()
        try:
            yield asyncio.run(run(gateway))
        finally:
            gateway.stop()


def exposed_labels(samples: Samples) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, labels in samples:
        found.setdefault(name, set()).update(key for key, _value in labels)
    return found


def check_expressions(exprs: list[str], samples: Samples) -> set[str]:
    exposed = exposed_labels(samples)
    referenced: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        for name in names - PROMETHEUS_SERIES:
            assert name in exposed, f"{name} (in {expr!r}) is not in the gateway's /metrics"
        labels = set().union(*(exposed.get(name, set()) for name in names)) | TARGET_LABELS
        unknown = labels_used(expr) - labels
        assert not unknown, f"labels {unknown} (in {expr!r}) are on none of {names}"
        referenced |= names
    return referenced


def test_alert_rules_query_only_exposed_metrics(exposition: Samples) -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "GatewayPolicyStale",
        "GatewayRedisErrors",
        "GatewayAuditSpooling",
        "GatewayAuditDropped",
        "GatewayHigh5xxRatio",
        "GatewayOverheadP99High",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    referenced = check_expressions([rule["expr"] for rule in rules], exposition)
    assert {
        "gateway_policy_age_seconds",
        "gateway_policy_version",
        "gateway_redis_errors_total",
        "gateway_audit_spooled_total",
        "gateway_audit_dropped_total",
        "gateway_requests_total",
        "gateway_overhead_seconds_bucket",
    } <= referenced
    stale = next(rule for rule in rules if rule["alert"] == "GatewayPolicyStale")["expr"]
    assert "gateway_policy_age_seconds > 30" in stale and "gateway_policy_version == 0" in stale
    overhead = next(rule for rule in rules if rule["alert"] == "GatewayOverheadP99High")["expr"]
    assert "histogram_quantile(0.99" in overhead and "> 0.005" in overhead


def test_dashboard_queries_only_exposed_metrics(exposition: Samples) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs()
    referenced = check_expressions(exprs, exposition)
    assert {
        "gateway_requests_total",
        "gateway_overhead_seconds_bucket",
        "gateway_upstream_duration_seconds_bucket",
        "gateway_policy_version",
        "gateway_policy_age_seconds",
        "gateway_redis_errors_total",
        "gateway_ratelimit_fallback_total",
        "gateway_audit_spooled_total",
        "gateway_audit_dropped_total",
    } <= referenced
    joined = "\n".join(exprs)
    assert "sum by (decision)" in joined and "sum by (code)" in joined
    for metric in ("gateway_overhead_seconds_bucket", "gateway_upstream_duration_seconds_bucket"):
        assert re.search(rf"histogram_quantile\(0\.99, [^\n]*{metric}", joined), metric


def test_prometheus_scrapes_the_admin_listener() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "export-gateway")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets and all(target.endswith(":9901") for target in targets)
    # GatewayScrapeDown names this job.
    assert any('job="export-gateway"' in rule["expr"] for rule in alert_rules())


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_checks_config_and_rules_and_runs_rule_tests() -> None:
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (args, result.stdout, result.stderr)


def test_expression_parsing_helpers() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (instance, le) (rate(gateway_overhead_seconds_bucket"
        '{instance=~"$instance", decision!="allow"}[5m]))) > 0.005 or up{job="x"} == 0'
    )
    assert metric_names(expr) == {"gateway_overhead_seconds_bucket", "up"}
    assert labels_used(expr) == {"instance", "le", "decision", "job"}
