"""The per-step ledger: the gateway's full path against the forwarder alone, in one process, one run.

``python -m bench.profile`` starts a redis-server and the mock model server, then serves two
listeners from one gateway runtime on one event loop: the full public path, and the forwarder alone
(the request read into its canonical view and forwarded, usage captured; no identity, decision,
rate limit, metrics or audit). wrk drives each in turn for ``--rounds`` rounds: once without a
profiler, for the process CPU each request costs (the gap between the two is the gateway's own
work), and once under cProfile, for where that work goes: the CPU time inside each step, divided by
the requests served (µs per request per step). cProfile slows what it measures, so each step is
also given scaled to the unprofiled CPU (the profiled share of the unprofiled total).
Redis commands and Redis CPU per request (INFO commandstats and used_cpu_* around each unprofiled
run) are printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis as redis_sync
from aiohttp import web
from aiohttp.web_request import BaseRequest

from gateway.app import create_public_server
from gateway.proxy import ProxyOutcome
from gateway.redis_server import RedisServer, free_port
from gateway.runtime import Runtime, create_runtime
from gateway.server import tune_gc
from gateway.settings import parse_settings

from .run import ROOT, SECRET, TIERS, seed, token, wait_http, wrk_script

# (file, function) -> ledger line; the first is the whole request, whatever the path.
STEPS: list[tuple[str, str, str]] = [
    ("public.py", "handle", "whole request (PublicPath.handle)"),
    ("request_model.py", "begin", "request view: method, client address"),
    ("admission.py", "enforced", "policy freshness"),
    ("admission.py", "identify", "identity (cached JWT)"),
    ("admission.py", "caller", "caller and countries"),
    ("request_model.py", "read", "body, model, upstream headers"),
    ("admission.py", "decide", "decision (rows 2-8)"),
    ("ratelimit.py", "check", "rate-limit check (lease or Redis)"),
    ("ratelimit.py", "headers", "rate-limit headers"),
    ("proxy.py", "forward", "forwarding (upstream request and relay)"),
    ("ratelimit.py", "charge", "token charge"),
    ("public.py", "_finish", "metrics, access log, audit record (_finish)"),
    ("metrics.py", "request_done", "  of which metrics"),
    ("public.py", "_audit_record", "  of which the audit record"),
    ("audit.py", "record", "  of which the audit queue"),
    ("logs.py", "bind_request", "request id and log context"),
]
FORWARDER_STEP = ("profile.py", "forward_only", "whole request (forwarder alone)")


def _settings(upstream: str, redis_url: str, work: Path) -> Any:
    return parse_settings(
        {
            "upstream": {"url": upstream},
            "redis": {"url": redis_url},
            "auth": {"algorithms": ["HS256"], "hs256_secret_env": "BENCH_HS256_SECRET"},
            "tiers": TIERS,
            "audit": {"spool_dir": str(work / "spool")},
            "logging": {"level": "warning"},
        },
        environ={"BENCH_HS256_SECRET": SECRET},
    )


def _forwarder_alone(runtime: Runtime) -> Any:
    reader, forwarder = runtime.reader, runtime.forwarder

    async def usage(tokens: int) -> None:
        return None

    async def forward_only(request: BaseRequest) -> web.StreamResponse:
        view = reader.begin(request)
        await reader.read(view, request, request_id="bench", identity_headers=(), upstream_auth=None)
        return await forwarder.forward(
            request, view, request_id="bench", extra_response_headers=(), on_usage=usage, outcome=ProxyOutcome()
        )

    return web.Server(forward_only, access_log=None)


async def _wrk(url: str, script: Path, seconds: int, connections: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url, stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    found = re.search(r"(\d+) requests in", out.decode())
    return int(found.group(1)) if found else 0


def _redis_counters(client: redis_sync.Redis) -> tuple[dict[str, int], float]:
    """Calls per command (commands run by scripts counted apart from the EVALSHA that ran them), the
    microseconds Redis spent in each (``usec:<command>``), and Redis's CPU seconds."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    calls.update({"usec:" + name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()})
    cpu = client.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


TOP: dict[str, list[dict[str, float]]] = {}


def _top(profile: cProfile.Profile, requests: int, count: int = 25) -> dict[str, float]:
    """The functions with the most CPU of their own (µs per request under the profiler)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:count]
    return {f"{Path(f).name}:{line} {n}": v[2] / requests * 1e6 for (f, line, n), v in rows}


def _ledger(profile: cProfile.Profile, requests: int, steps: list[tuple[str, str, str]]) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for file, name, label in steps:
        total = sum(v[3] for (f, _, n), v in stats.items() if n == name and f.endswith(f"/{file}"))
        out[label] = total / requests * 1e6
    return out


async def _measure(
    url: str, script: Path, seconds: int, connections: int, redis_client: redis_sync.Redis
) -> dict[str, float]:
    calls, rcpu = _redis_counters(redis_client)
    cpu = time.process_time()
    requests = await _wrk(url, script, seconds, connections)
    spent = time.process_time() - cpu
    calls2, rcpu2 = _redis_counters(redis_client)
    requests = max(1, requests)
    delta = {name: n - calls.get(name, 0) for name, n in calls2.items() if n != calls.get(name, 0)}
    delta.pop("info", None)  # this bench's own
    delta.pop("usec:info", None)
    usec = {name: delta.pop(name) for name in list(delta) if name.startswith("usec:")}
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
    return {
        "requests": requests,
        "cpu_us": spent / requests * 1e6,
        "redis_calls": scripts / requests,  # script calls: the round trips a request costs Redis
        "redis_cmds": sum(delta.values()) / requests,  # every command, those inside scripts too
        "redis_cpu_us": (rcpu2 - rcpu) / requests * 1e6,
        **{f"cmd_{name}": n / requests for name, n in delta.items()},
        **{f"us_{name[5:]}": n / requests for name, n in usec.items()},
    }


async def _profiled(url: str, script: Path, seconds: int, connections: int) -> tuple[cProfile.Profile, int]:
    profile = cProfile.Profile()
    profile.enable()
    requests = await _wrk(url, script, seconds, connections)
    profile.disable()
    return profile, max(1, requests)


async def run(seconds: int, rounds: int, connections: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gw-profile-"))
    with RedisServer() as redis:
        await asyncio.to_thread(seed, redis.url)
        port = free_port()
        mock = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port), cwd=ROOT
        )
        try:
            upstream = f"http://127.0.0.1:{port}"
            await asyncio.to_thread(wait_http, upstream + "/v1/models")
            settings = _settings(upstream, redis.url, work)
            async with create_runtime(settings, environ={"BENCH_HS256_SECRET": SECRET}) as runtime:
                tune_gc()  # as a served worker runs: the collector's thresholds and frozen start-up objects
                return await _rounds(runtime, redis.url, work, seconds, rounds, connections)
        finally:
            mock.terminate()
            await mock.wait()


async def _rounds(
    runtime: Runtime, redis_url: str, work: Path, seconds: int, rounds: int, connections: int
) -> dict[str, Any]:
    script = wrk_script(work, token())
    servers = {"full": create_public_server(runtime), "forwarder": _forwarder_alone(runtime)}
    urls: dict[str, str] = {}
    runners = []
    for name, server in servers.items():
        runner = web.ServerRunner(server)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
    client = redis_sync.Redis.from_url(redis_url)
    plain: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    ledgers: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    try:
        for url in urls.values():
            await _wrk(url, script, 2, connections)  # warm-up: connections, caches, leases
        for _ in range(rounds):
            for name, url in urls.items():
                plain[name].append(await _measure(url, script, seconds, connections, client))
                profile, requests = await _profiled(url, script, seconds, connections)
                steps = STEPS if name == "full" else [FORWARDER_STEP, *STEPS[1:2], *STEPS[5:6], *STEPS[9:10]]
                ledgers[name].append(_ledger(profile, requests, steps))
                TOP.setdefault(name, []).append(_top(profile, requests))
    finally:
        client.close()
        for runner in runners:
            await runner.cleanup()
    med = {
        name: {k: statistics.median(r.get(k, 0.0) for r in rows) for k in set().union(*rows)}
        for name, rows in plain.items()
    }
    led = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in ledgers.items()}
    return {"plain": med, "ledger": led, "rounds": rounds, "seconds": seconds, "connections": connections}


def print_ledger(result: dict[str, Any]) -> None:
    plain, ledger = result["plain"], result["ledger"]
    print(f"\nCPU per request, no profiler (median of {result['rounds']} rounds, wrk -c{result['connections']}):")
    for name, row in plain.items():
        print(
            f"  {name:<10} {row['cpu_us']:7.1f} µs; Redis per request: {row['redis_calls']:.3f} script calls, "
            f"{row['redis_cmds']:.3f} commands (those inside scripts too), {row['redis_cpu_us']:.1f} µs CPU"
        )
        by_command = sorted((k[4:], v) for k, v in row.items() if k.startswith("cmd_"))
        print("    calls: " + ", ".join(f"{name} {value:.3f}" for name, value in by_command))
        busy = sorted((k[3:], v) for k, v in row.items() if k.startswith("us_") and v >= 0.05)
        print("    µs in Redis: " + ", ".join(f"{name} {value:.2f}" for name, value in busy))
    gap = plain["full"]["cpu_us"] - plain["forwarder"]["cpu_us"]
    print(f"  gateway's own work: {gap:.1f} µs per request")
    for name in ("full", "forwarder"):
        rows = ledger[name]
        whole = next(iter(rows.values()))
        scale = plain[name]["cpu_us"] / whole if whole else 0.0
        print(f"\nledger, {name} (µs per request under cProfile; scaled to the unprofiled CPU):")
        for label, value in rows.items():
            print(f"  {label:<48} {value:8.1f} {value * scale:8.1f}")
    if TOP:
        for name, runs in TOP.items():
            print(f"\nmost CPU of their own, {name} (µs per request under cProfile, last round):")
            for label, value in runs[-1].items():
                print(f"  {label:<70} {value:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    print_ledger(runner(run(args.seconds, args.rounds, args.connections)))


if __name__ == "__main__":
    main()
