"""``make bench``: the gateway against a bare aiohttp pass-through proxy, in one run, with wrk.

Starts a redis-server, the mock model server, the bare proxy and the gateway
(one worker each), drives each with the same wrk load, and prints requests/s,
p50 and p99 plus the gateway/bare ratios; also the policy-scale figures
(snapshot reload time and process memory with a large policy) and the impact
preview's time over 100,000 audit records (bench/impact.py). Results are
written to ``bench/results/<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import yaml

from gateway.redis_server import RedisServer, free_port

from .archive import archive_bench, print_archive
from .impact import impact_preview
from .nginx_authz import start_nginx

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-hs256-secret-0123456789abcdef0123456789"
BODY = '{"model": "gpt-mock", "messages": [{"role": "user", "content": "Hello"}]}'


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def token(tier: str = "bench") -> str:
    now = int(time.time())
    return jwt.encode(
        {
            "sub": "bench-user",
            "org": "bench-org",
            "country": "US",
            "tier": tier,
            "iss": "https://idp.example",
            "aud": "model-gateway",
            "iat": now,
            "exp": now + 86400,
        },
        SECRET,
        algorithm="HS256",
    )


def wrk_script(directory: Path, bearer: str, name: str = "post") -> Path:
    path = directory / f"{name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {bearer}"\n'
    )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, script: Path, *, connections: int, threads: int, seconds: int) -> dict[str, float]:
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non_2xx": int(errors.group(1)) if errors else 0}


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    print("wrk not found; installing it from the Debian packages", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
    if not shutil.which("wrk"):
        sys.exit("make bench needs wrk (apt-get install wrk)")


# Limits far above any load the bench makes: every request is checked and charged, none refused.
TIERS: dict[str, dict[str, Any]] = {
    "bench": {
        "requests_per_minute": 100_000_000,
        "burst": 1_000_000,
        "tokens_per_minute": 1_000_000_000_000,
        "stages": ["general"],
    },
    # The same path with request limits only: no usage capture, no token charge.
    "bench-requests": {"requests_per_minute": 100_000_000, "burst": 1_000_000, "stages": ["general"]},
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
}


def gateway_config(directory: Path, upstream: str, redis_url: str) -> tuple[Path, dict[str, Any]]:
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstream": {"url": upstream},
        "redis": {"url": redis_url},
        "auth": {"algorithms": ["HS256"], "hs256_secret_env": "BENCH_HS256_SECRET"},
        "tiers": TIERS,
        "audit": {"spool_dir": str(directory / "spool")},
        "logging": {"level": "warning"},
        # The decision service, for nginx in front of the model server (bench/nginx_authz.py).
        "authz": {"host": "127.0.0.1", "port": free_port(), "model_header": "X-Gateway-Model"},
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def seed(redis_url: str, *, entities: int = 0, partners: int = 0) -> None:
    from gateway.bootstrap import import_policy
    from gateway.storage.store import Store

    lists: dict[str, Any] = {
        "deny-countries": {"IR": {"reason": "bench"}},
        "deny-entities": {f"entity-{i}": {"reason": "bench", "source": "bench"} for i in range(entities)},
        "partners": {f"org-{i}": {"reason": "bench", "source": "bench"} for i in range(partners)},
        "ip-ranges": {},
    }
    document = {
        "lists": lists,
        "models": {
            "gpt-mock": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}
        },
    }

    async def run() -> None:
        store = Store.from_url(redis_url, timeout_s=30)
        try:
            await import_policy(store, document, actor="bench", tiers=("bench", "bench-requests", "public"))
        finally:
            await store.close()

    asyncio.run(run())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def readyz(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin + "/readyz", timeout=2) as response:
        return dict(json.loads(response.read()))


def policy_scale(gateway_pid: int, admin: str, redis_url: str) -> dict[str, float]:
    """Reload time and memory with 100,000 deny-entities and 10,000 partners."""
    before = readyz(admin)["policy_version"]
    started = time.perf_counter()
    seed(redis_url, entities=100_000, partners=10_000)
    deadline = time.monotonic() + 30
    state = readyz(admin)
    while state["policy_version"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
        state = readyz(admin)
    visible_s = round(time.perf_counter() - started, 3)
    first_reload = state.get("last_reload_ms", -1.0)

    # Then the steady state: a change reads the changed entry only, whatever the list's size (the
    # changed list's index is copied: a few ms for the 100,000-entry deny-entities list).
    def reload_ms(list_name: str, key: str) -> float:
        version = add_list_entry(redis_url, list_name, key)
        while readyz(admin)["policy_version"] < version:
            time.sleep(0.02)  # a reload is timed inside the gateway; polling harder would slow it
        return float(readyz(admin)["last_reload_ms"])

    small = [reload_ms("deny-countries", "AQ") for _ in range(5)]
    large = [reload_ms("deny-entities", f"bench-entity-{i}") for i in range(5)]
    partners = [reload_ms("partners", f"bench-partner-{i}") for i in range(5)]
    return {
        "import_and_visible_s": visible_s,
        "first_reload_ms": first_reload,
        "reload_ms_median_small_list_change": statistics.median(small),
        "reload_ms_median_deny_entities_change": statistics.median(large),
        "reload_ms_median_partners_change": statistics.median(partners),
        "rss_mb_large_policy": round(rss_mb(gateway_pid), 1),
    }


def add_list_entry(redis_url: str, list_name: str = "deny-countries", key: str = "AQ") -> int:
    from gateway.storage.keys import list_key
    from gateway.storage.ops import HashSet
    from gateway.storage.store import Store

    async def run() -> int:
        store = Store.from_url(redis_url, timeout_s=5)
        try:
            entry = {
                "reason": "bench",
                "source": "bench",
                "added_by": "bench",
                "added_at": "2026-01-01T00:00:00Z",
                "expires_at": None,
            }
            version, _ = await store.write(
                [HashSet(list_key(list_name), key, entry)],
                actor="bench",
                now_iso="2026-01-01T00:00:00Z",
                target="bench",
            )
            return version
        finally:
            await store.close()

    return asyncio.run(run())


def micro_costs() -> dict[str, float]:
    """In-process costs of the per-request steps, in microseconds (no I/O)."""
    import timeit

    from gateway.identity import Authenticator
    from gateway.jwks import KeyRing
    from gateway.policy.decide import Rules, decide
    from gateway.policy.model import Caller
    from gateway.policy.wire import build_snapshot
    from gateway.settings import parse_settings

    settings = parse_settings(
        {
            "upstream": {"url": "http://up"},
            "auth": {"algorithms": ["HS256"], "hs256_secret_env": "BENCH_HS256_SECRET"},
            "tiers": {"bench": {"stages": ["general"]}, "public": {"stages": ["general"]}},
        },
        environ={"BENCH_HS256_SECRET": SECRET},
    )
    authenticator = Authenticator(
        settings.auth, settings.tiers.keys(), KeyRing.from_settings(settings.auth, {"BENCH_HS256_SECRET": SECRET})
    )
    header = f"Bearer {token()}"
    authenticator.authenticate(header, {})
    entry = {"reason": "bench", "source": "bench", "added_by": "b", "added_at": "2026-01-01T00:00:00Z"}
    snapshot = build_snapshot(
        version=1,
        generation="g",
        loaded_at=time.time(),
        api_keys={},
        lists={
            "deny-entities": {f"entity-{i}": json.dumps(entry).encode() for i in range(100_000)},
            "deny-countries": {"IR": json.dumps(entry).encode()},
            "partners": {f"org-{i}": entry for i in range(10_000)},
            "ip-ranges": {},
        },
        models={"gpt-mock": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}},
    )
    rules = Rules.from_settings(settings)
    caller = Caller(
        subject="bench-user", org="bench-org", org_name=None, tier="bench", claimed_country="US", ip="10.1.2.3"
    )
    now = time.time()
    n = 20_000
    jwt_us = timeit.timeit(lambda: authenticator.authenticate(header, {}), number=n) / n * 1e6
    decide_us = timeit.timeit(lambda: decide(snapshot, caller, "gpt-mock", now, rules), number=n) / n * 1e6
    return {
        "cached_jwt_check_us": round(jwt_us, 2),
        "decide_us_100k_entities": round(decide_us, 2),
        **rules_costs(entry, rules, caller, now),
    }


def rules_costs(entry: dict[str, Any], rules: Any, caller: Any, now: float, rounds: int = 21) -> dict[str, float]:
    """``decide`` with 50 country groups and 1,000 licences loaded against the same policy without
    them: the groups are named by deny-countries and by the model's allowed countries, the licences
    belong to other organisations. Each time is the best of ``rounds`` interleaved runs (the least
    disturbed by other load); the ratio (with / without) is the median of the rounds' ratios."""
    import timeit

    from gateway.policy.decide import decide
    from gateway.policy.validate import format_instant
    from gateway.policy.wire import build_snapshot

    codes = ["GB", "JP", "DE", "FR", "IT", "ES", "NL", "SE", "NO", "FI", "DK", "PL", "CZ", "AT", "BE", "IE"]
    groups = {f"G:{i}": entry | {"countries": codes[i % 8 : i % 8 + 8]} for i in range(50)}
    groups["E:1"] = entry | {"countries": ["IR", "KP", "SY"]}
    expires = format_instant(now + 86400)
    licences = {
        f"L-{i}": entry | {"org": f"org-{i}", "models": ["model"], "countries": ["@G:1"], "expires_at": expires}
        for i in range(1000)
    }
    base_model = {"stage": "general", "timeline": [], "export_suspended": False}

    def snapshot(with_rules: bool) -> Any:
        allowed = ["US", "@G:0", "@G:7"] if with_rules else ["US", *codes]
        deny = {"@E:1": entry} if with_rules else {code: entry for code in ("IR", "KP", "SY")}
        return build_snapshot(
            version=1,
            generation="g",
            loaded_at=now,
            api_keys={},
            lists={
                "deny-countries": deny,
                "country-groups": groups if with_rules else {},
                "licences": licences if with_rules else {},
            },
            models={
                "gpt-mock": base_model | {"allowed_countries": None},
                "model": base_model | {"allowed_countries": allowed},
            },
        )

    out: dict[str, float] = {}
    n = 5_000
    snapshots = {with_rules: snapshot(with_rules) for with_rules in (False, True)}
    for label, model in (("open", "gpt-mock"), ("restricted", "model")):
        timings: dict[bool, list[float]] = {False: [], True: []}
        for snap in snapshots.values():
            assert decide(snap, caller, model, now, rules).allowed
        # Interleaved rounds, each ratio taken within its round: a burst of other load on the machine
        # skews one round, not the comparison.
        for _ in range(rounds):
            for with_rules, snap in snapshots.items():
                timings[with_rules].append(
                    timeit.timeit(lambda snap=snap, model=model: decide(snap, caller, model, now, rules), number=n) / n
                )
        ratios = sorted(with_ / without for with_, without in zip(timings[True], timings[False], strict=True))
        out[f"decide_us_{label}_model"] = round(min(timings[False]) * 1e6, 3)
        out[f"decide_us_{label}_model_50_groups_1000_licences"] = round(min(timings[True]) * 1e6, 3)
        out[f"decide_ratio_{label}_model_with_groups_licences"] = round(ratios[len(ratios) // 2], 3)
    return out


async def _first_byte_ms(host: str, port: int, path: str) -> float:
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(STREAM_BODY)}\r\n"
        f"Connection: close\r\n\r\n{STREAM_BODY}"
    ).encode()
    started = time.perf_counter()
    writer.write(request)
    await reader.readuntil(b"data:")  # the first SSE event's first bytes (after the status and headers)
    elapsed = (time.perf_counter() - started) * 1000
    writer.close()
    return elapsed


STREAM_BODY = '{"model": "gpt-mock", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'


def time_to_first_byte(ports: dict[str, int], samples: int = 200) -> dict[str, float]:
    """p50 time to the first SSE event at concurrency 1 (the mock waits 5 ms between events)."""

    async def run() -> dict[str, float]:
        out: dict[str, float] = {}
        for name, port in ports.items():
            timings = sorted(
                [await _first_byte_ms("127.0.0.1", port, "/v1/chat/completions?delay=0.005") for _ in range(samples)]
            )
            out[f"ttfb_p50_ms_{name}"] = round(timings[len(timings) // 2], 3)
        return out

    result = asyncio.run(run())
    result["ttfb_gateway_minus_bare_ms"] = round(result["ttfb_p50_ms_gateway"] - result["ttfb_p50_ms_bare_proxy"], 3)
    return result


def stream_memory(port: int, pid: int, megabytes: int = 100) -> dict[str, float]:
    """Gateway RSS while a slow reader takes a 100 MiB stream: flat means nothing is buffered whole."""

    async def run() -> dict[str, float]:
        before = rss_mb(pid)
        peak = before
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model": "gpt-mock"}'  # every proxied request names its model
        writer.write(
            (
                f"POST /v1/bulk?mb={megabytes} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token()}"
                f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            + body
        )
        received = 0
        started = time.perf_counter()
        while chunk := await reader.read(256 * 1024):
            received += len(chunk)
            await asyncio.sleep(0.004)  # about 50 MiB/s at most: slower than the upstream sends
            if received % (8 * 1024 * 1024) < len(chunk):
                peak = max(peak, rss_mb(pid))
        writer.close()
        if received < megabytes * 2**20:
            raise RuntimeError(f"the stream through the gateway ended after {received} bytes of {megabytes} MiB")
        return {
            "stream_mib": round(received / 2**20, 1),
            "stream_seconds": round(time.perf_counter() - started, 1),
            "rss_mb_before_stream": before,
            "rss_mb_peak_during_stream": peak,
            "rss_growth_mb": round(peak - before, 1),
        }

    return asyncio.run(run())


def propagation(redis_url: str, admins: list[str], changes: int = 200) -> dict[str, float]:
    """Time from a committed list change until every process enforces its version."""
    import aiohttp

    from gateway.storage.keys import list_key
    from gateway.storage.ops import HashDelete, HashSet
    from gateway.storage.store import Store

    async def run() -> dict[str, float]:
        store = Store.from_url(redis_url, timeout_s=2)
        delays: list[float] = []
        entry = {
            "reason": "bench",
            "source": "bench",
            "added_by": "bench",
            "added_at": "2026-01-01T00:00:00Z",
            "expires_at": None,
        }
        async with aiohttp.ClientSession() as client:

            async def version_of(admin: str) -> int:
                async with client.get(admin + "/readyz") as response:
                    return int((await response.json())["policy_version"])

            async def seen(admin: str, version: int) -> None:
                while await version_of(admin) < version:  # noqa: ASYNC110 - polling another process
                    await asyncio.sleep(0.001)

            for i in range(changes):
                op = (
                    HashSet(list_key("deny-countries"), "AQ", entry)
                    if i % 2 == 0
                    else HashDelete(list_key("deny-countries"), "AQ")
                )
                version, _ = await store.write([op], actor="bench", now_iso="2026-01-01T00:00:00Z", target="bench")
                committed = time.perf_counter()
                await asyncio.gather(*(seen(admin, version) for admin in admins))
                delays.append((time.perf_counter() - committed) * 1000)
        await store.close()
        delays.sort()
        return {
            "processes": len(admins),
            "changes": changes,
            "visible_p50_ms": round(delays[len(delays) // 2], 1),
            "visible_p99_ms": round(delays[int(len(delays) * 0.99) - 1], 1),
            "visible_max_ms": round(delays[-1], 1),
        }

    return asyncio.run(run())


class Cluster:
    """Child processes of one bench run, stopped together."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env or self.env)
        self.procs.append(proc)
        return proc

    def gateway(
        self, upstream: str, redis_url: str, *, workers: int = 1
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        config_path, config = gateway_config(Path(tempfile.mkdtemp(dir=self.work)), upstream, redis_url)
        proc = self.spawn("gateway", "serve", "--config", str(config_path), "--workers", str(workers))
        wait_http(f"http://127.0.0.1:{config['admin']['port']}/readyz")
        return proc, config

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", "6")))
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("BENCH_ROUNDS", "3")),
        help="interleaved runs per path; medians are reported (the machine is shared)",
    )
    parser.add_argument(
        "--paths-only", action="store_true", help="the interleaved paths and the fleet inputs alone (no sections)"
    )
    args = parser.parse_args()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    env = {**os.environ, "BENCH_HS256_SECRET": SECRET}
    os.environ["BENCH_HS256_SECRET"] = SECRET
    results: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "connections": 32,
        "load_generator": "wrk",
        "paths": {},
    }
    cluster = Cluster(work, env)
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        stack.callback(cluster.stop)
        seed(redis.url)
        upstream_port, bare_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        mock = cluster.spawn("gateway", "mock-upstream", "--port", str(upstream_port))
        cluster.spawn("bench.bare_proxy", upstream, str(bare_port))
        wait_http(upstream + "/v1/models")
        wait_http(f"http://127.0.0.1:{bare_port}/v1/models")
        gateway, config = cluster.gateway(upstream, redis.url)
        admin = f"http://127.0.0.1:{config['admin']['port']}"
        script = wrk_script(work, token())
        ports = {"upstream": upstream_port, "bare_proxy": bare_port, "gateway": config["listen"]["port"]}
        chat = "http://127.0.0.1:{}/v1/chat/completions"
        targets = {name: (chat.format(port), script) for name, port in ports.items()}
        targets["gateway_request_limits"] = (
            chat.format(ports["gateway"]),
            wrk_script(work, token("bench-requests"), "post-requests"),
        )
        # nginx as the data plane: alone, and asking the gateway's decision service (auth_request).
        nginx_bare, nginx_bare_port = start_nginx(work, upstream_port, 0, authz=False)
        nginx_authz, nginx_authz_port = start_nginx(work, upstream_port, config["authz"]["port"])
        stack.callback(_stop, nginx_bare)
        stack.callback(_stop, nginx_authz)
        targets["nginx_bare"] = (chat.format(nginx_bare_port), script)
        targets["nginx_authz"] = (chat.format(nginx_authz_port), script)
        results["rounds"] = args.rounds
        results["path_rounds"] = {}
        fleet = fleet_counters(redis.url, gateway.pid)
        results["paths"] = measure_paths(
            targets,
            args.seconds,
            args.rounds,
            results["path_rounds"],
            {"gateway": fleet, "gateway_request_limits": fleet},
        )
        results["ratios"] = path_ratios(results["path_rounds"])
        results["fleet_inputs"] = {
            name: {k: v for k, v in results["paths"][name].items() if k.endswith("_per_req")}
            for name in ("gateway", "gateway_request_limits")
        }
        results["load_average"] = os.getloadavg()
        if args.paths_only:
            print_table(results, sections=())
            write_results(results)
            return
        results["micro"] = micro_costs()
        results["impact"] = impact_preview()
        results["streaming"] = time_to_first_byte({k: v for k, v in ports.items() if k != "upstream"})
        results["streaming"].update(stream_memory(config["listen"]["port"], gateway.pid))
        others = [cluster.gateway(upstream, redis.url)[1] for _ in range(2)]
        results["propagation"] = propagation(
            redis.url, [admin] + [f"http://127.0.0.1:{c['admin']['port']}" for c in others]
        )
        results["policy"] = {"rss_mb_small_policy": round(rss_mb(gateway.pid), 1)}
        results["policy"].update(policy_scale(gateway.pid, admin, redis.url))
        seed(redis.url)  # back to the small policy for the workers runs
        assert redis.process is not None
        redis_pid = redis.process.pid
        # Two workers can only scale where there are cores to spare. With the aiohttp mock upstream,
        # wrk, the upstream and Redis share the same two cores; CPU per request shows whether a second
        # worker adds cost of its own. With the light upstream, they take little of the second core.
        results["workers"] = scale_workers(
            cluster, upstream, redis.url, script, args.seconds, args.rounds, {"redis": redis_pid, "upstream": mock.pid}
        )
        light_port = free_port()
        light_upstream = cluster.spawn("bench.light_upstream", str(light_port))
        light = f"http://127.0.0.1:{light_port}"
        wait_http(light + "/v1/models")
        results["workers_light_upstream"] = scale_workers(
            cluster,
            light,
            redis.url,
            script,
            args.seconds,
            args.rounds,
            {"redis": redis_pid, "upstream": light_upstream.pid},
        )
    results["archive"] = archive_bench()
    print_table(results)
    print_archive(results["archive"])
    write_results(results)


def write_results(results: dict[str, Any]) -> None:
    out = ROOT / "bench" / "results" / f"{results['time'].replace(':', '')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {out.relative_to(ROOT)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (Linux /proc)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_per_request(pid: int, run: Callable[[], dict[str, float]]) -> tuple[dict[str, float], float]:
    """``run()``'s figures, and the CPU microseconds the process tree of ``pid`` spent per request."""
    before = process_tree_cpu_s(pid)
    row = run()
    spent = process_tree_cpu_s(pid) - before
    requests = row["rps_c32"] * row["seconds"]
    return row, round(spent / requests * 1e6, 1)


def scale_workers(
    cluster: Cluster, upstream: str, redis_url: str, script: Path, seconds: int, rounds: int, others: dict[str, int]
) -> dict[str, float]:
    """``--workers 2`` against one worker on ``upstream``, taking turns for ``rounds`` rounds (medians).

    Also the CPU that Redis, the upstream and wrk (``others``: name -> pid; wrk is this process's
    child) spend per request while two workers serve, and how many of the machine's cores all of
    them keep busy: where that reaches the core count, the second worker is short of a core.
    """
    chat = "http://127.0.0.1:{}/v1/chat/completions"
    gateways = {}
    for workers in (1, 2):
        proc, config = cluster.gateway(upstream, redis_url, workers=workers)
        url = chat.format(config["listen"]["port"])
        run_wrk(url, script, connections=8, threads=1, seconds=2)  # warm-up
        gateways[workers] = (proc.pid, url)
    rps: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    beside: dict[str, list[float]] = {name: [] for name in (*others, "wrk")}
    for _ in range(rounds):
        for workers, (pid, url) in gateways.items():
            others_before = {name: process_tree_cpu_s(other) for name, other in others.items()}
            wrk_before = _children_cpu_s()
            row, spent = cpu_per_request(
                pid, lambda url=url: measure_path(url, script, seconds, single=False, warm=False)
            )
            rps[workers].append(row["rps_c32"])
            cpu[workers].append(spent)
            if workers == 2:
                requests = row["rps_c32"] * row["seconds"]
                for name, other in others.items():
                    beside[name].append((process_tree_cpu_s(other) - others_before[name]) / requests * 1e6)
                beside["wrk"].append((_children_cpu_s() - wrk_before) / requests * 1e6)
    one, two = statistics.median(rps[1]), statistics.median(rps[2])
    result = {
        "rps_c32_one_worker": one,
        "rps_c32_two_workers": two,
        "two_over_one": round(two / one, 3),
        "cpu_us_per_request_one_worker": statistics.median(cpu[1]),
        "cpu_us_per_request_two_workers": statistics.median(cpu[2]),
    }
    result.update(
        {
            f"cpu_us_per_request_{name}_two_workers": round(statistics.median(values), 1)
            for name, values in beside.items()
        }
    )
    total_us = result["cpu_us_per_request_two_workers"] + sum(statistics.median(v) for v in beside.values())
    result["cores_busy_two_workers"] = round(total_us * two / 1e6, 2)
    return result


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


Counters = Callable[[], dict[str, float]]


def fleet_counters(redis_url: str, gateway_pid: int) -> Counters:
    """What the fleet model is computed from, read before and after a run: Redis's script calls and
    commands (INFO commandstats; those run inside scripts counted too), Redis's CPU (used_cpu_user +
    used_cpu_sys) and the gateway process's CPU."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)

    def read() -> dict[str, float]:
        stats = client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        cpu = client.info("cpu")
        return {
            "redis_calls": calls.get("evalsha", 0) + calls.get("eval", 0),
            "redis_cmds": sum(n for name, n in calls.items() if name != "info"),
            "redis_xadd": calls.get("xadd", 0),
            "redis_cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "gateway_cpu_s": process_tree_cpu_s(gateway_pid),
        }

    return read


def measure_path(
    url: str, script: Path, seconds: int, *, single: bool = True, warm: bool = True, counters: Counters | None = None
) -> dict[str, float]:
    if warm:
        run_wrk(url, script, connections=8, threads=1, seconds=2)
    before = counters() if counters is not None else {}
    loaded = run_wrk(url, script, connections=32, threads=2, seconds=seconds)
    row = {"rps_c32": loaded["rps"], "p99_ms_c32": loaded["p99_ms"], "non_2xx": loaded["non_2xx"], "seconds": seconds}
    if counters is not None:
        after, requests = counters(), max(1.0, loaded["rps"] * seconds)
        for key in ("redis_calls", "redis_cmds", "redis_xadd"):
            row[f"{key}_per_req"] = round((after[key] - before[key]) / requests, 4)
        row["redis_cpu_us_per_req"] = round((after["redis_cpu_s"] - before["redis_cpu_s"]) / requests * 1e6, 2)
        row["gateway_cpu_us_per_req"] = round((after["gateway_cpu_s"] - before["gateway_cpu_s"]) / requests * 1e6, 1)
    if single:
        one = run_wrk(url, script, connections=1, threads=1, seconds=max(3, seconds // 2))
        row.update({"p50_ms_c1": one["p50_ms"], "p99_ms_c1": one["p99_ms"], "non_2xx": row["non_2xx"] + one["non_2xx"]})
    return row


def path_ratios(rounds: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Gateway / bare proxy ratios: each round's ratio, then their median. The paths of a round run
    seconds apart, so a slow spell of the machine (they come and go) moves both sides of a round's ratio."""

    def ratio(path: str, key: str) -> float:
        pairs = zip(rounds[path], rounds["bare_proxy"], strict=True)
        return round(statistics.median(mine[key] / bare[key] for mine, bare in pairs), 3)

    def versus(path: str, other: str, key: str) -> float:
        pairs = zip(rounds[path], rounds[other], strict=True)
        return round(statistics.median(mine[key] / theirs[key] for mine, theirs in pairs), 3)

    nginx: dict[str, float] = {}
    if "nginx_authz" in rounds:
        nginx = {
            "rps_nginx_authz_over_bare": ratio("nginx_authz", "rps_c32"),
            "p50_c1_nginx_authz_over_bare": ratio("nginx_authz", "p50_ms_c1"),
            "rps_nginx_authz_over_gateway": versus("nginx_authz", "gateway", "rps_c32"),
            "p50_c1_nginx_authz_over_gateway": versus("nginx_authz", "gateway", "p50_ms_c1"),
        }
    return {
        **nginx,
        "rps_gateway_over_bare": ratio("gateway", "rps_c32"),
        "p50_c1_gateway_over_bare": ratio("gateway", "p50_ms_c1"),
        "p99_c1_gateway_over_bare": ratio("gateway", "p99_ms_c1"),
        "rps_request_limits_over_bare": ratio("gateway_request_limits", "rps_c32"),
        "p50_c1_request_limits_over_bare": ratio("gateway_request_limits", "p50_ms_c1"),
        "p99_c1_request_limits_over_bare": ratio("gateway_request_limits", "p99_ms_c1"),
    }


def measure_paths(
    targets: dict[str, tuple[str, Path]],
    seconds: int,
    rounds: int,
    runs: dict[str, list[dict[str, float]]],
    counters: dict[str, Counters] | None = None,
) -> dict[str, dict[str, float]]:
    """Each path measured ``rounds`` times, the paths taking turns, and the median of each figure kept:
    a burst of load from elsewhere on the machine then skews one run of one path, not a ratio.
    ``runs`` receives every round's figures, so the spread can be judged from the results file."""
    runs.update({name: [] for name in targets})
    for url, script in targets.values():
        run_wrk(url, script, connections=8, threads=1, seconds=2)  # warm-up
    for _ in range(rounds):
        for name, (url, script) in targets.items():
            runs[name].append(measure_path(url, script, seconds, warm=False, counters=(counters or {}).get(name)))
    return {
        name: {
            key: (sum(r[key] for r in rows) if key == "non_2xx" else statistics.median(r[key] for r in rows))
            for key in rows[0]
        }
        for name, rows in runs.items()
    }


SECTIONS = (
    ("micro", "per-request steps, in process"),
    ("streaming", "streaming (SSE first byte at c1; 100 MiB to a slow reader)"),
    ("propagation", "list change visible on every process"),
    ("policy", "policy scale (100,000 deny-entities + 10,000 partners)"),
    ("impact", "impact preview (100,000 audit records, 10,000 callers; p50 of 5 runs)"),
    ("workers", "--workers 2 against one worker (wrk, mock upstream and Redis on the same 2 cores)"),
    ("workers_light_upstream", "--workers 2 against one worker, light upstream (bench/light_upstream.py)"),
)


def print_table(results: dict[str, Any], sections: tuple[tuple[str, str], ...] = SECTIONS) -> None:
    print(f"\n{'path':<24} {'req/s c32':>10} {'p99 c32':>9} {'p50 c1':>8} {'p99 c1':>8} {'non-2xx':>8}")
    for name, row in results["paths"].items():
        print(
            f"{name:<24} {row['rps_c32']:>10.0f} {row['p99_ms_c32']:>7.2f}ms {row['p50_ms_c1']:>6.2f}ms "
            f"{row['p99_ms_c1']:>6.2f}ms {row['non_2xx']:>8}"
        )
    print("\nratios (gateway / bare proxy; the median of each round's ratio):")
    for key, value in results["ratios"].items():
        print(f"  {key:<28} {value:.3f}")
    print(f"\nfleet model inputs at c32 (median of the rounds; load average {results['load_average']}):")
    for name, row in results["fleet_inputs"].items():
        print(f"  {name}: " + ", ".join(f"{key} {value}" for key, value in row.items()))
    for section, title in sections:
        print(f"\n{title}:")
        for key, value in results[section].items():
            print(f"  {key:<32} {value}")


if __name__ == "__main__":
    main()
