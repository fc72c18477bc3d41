"""``make bench``: the gateway against a bare aiohttp pass-through proxy, in one run, with wrk.

Starts a redis-server, the mock model server, the bare proxy and the gateway
(one worker each), drives each with the same wrk load, and prints requests/s,
p50 and p99 plus the gateway/bare ratios; also the policy-scale figures
(snapshot reload time and process memory with a large policy). Results are
written to ``bench/results/<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import yaml

from gateway.redis_server import RedisServer, free_port

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


def token() -> str:
    now = int(time.time())
    return jwt.encode({"sub": "bench-user", "org": "bench-org", "country": "US", "tier": "bench",
                       "iss": "https://idp.example", "aud": "model-gateway", "iat": now, "exp": now + 86400},
                      SECRET, algorithm="HS256")


def wrk_script(directory: Path, bearer: str) -> Path:
    path = directory / "post.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {bearer}"\n')
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, script: Path, *, connections: int, threads: int, seconds: int) -> dict[str, float]:
    output = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                             "-s", str(script), url], capture_output=True, text=True, check=True).stdout
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


def gateway_config(directory: Path, upstream: str, redis_url: str) -> tuple[Path, dict[str, Any]]:
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstream": {"url": upstream},
        "redis": {"url": redis_url},
        "auth": {"algorithms": ["HS256"], "hs256_secret_env": "BENCH_HS256_SECRET"},
        "tiers": {"bench": {"requests_per_minute": 100_000_000, "burst": 1_000_000,
                            "tokens_per_minute": 1_000_000_000_000, "stages": ["general"]},
                  "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]}},
        "audit": {"spool_dir": str(directory / "spool")},
        "logging": {"level": "warning"},
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def seed(redis_url: str, *, entities: int = 0, partners: int = 0) -> None:
    from gateway.bootstrap import import_policy
    from gateway.store import Store

    lists: dict[str, Any] = {
        "deny-countries": {"IR": {"reason": "bench"}},
        "deny-entities": {f"entity-{i}": {"reason": "bench", "source": "bench"} for i in range(entities)},
        "partners": {f"org-{i}": {"reason": "bench", "source": "bench"} for i in range(partners)},
        "ip-ranges": {},
    }
    document = {"lists": lists, "models": {"gpt-mock": {"stage": "general", "timeline": [],
                                                        "allowed_countries": None,
                                                        "export_suspended": False}}}

    async def run() -> None:
        store = Store.from_url(redis_url, timeout_s=30)
        try:
            await import_policy(store, document, actor="bench", tiers=("bench", "public"))
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
    return {"import_and_visible_s": round(time.perf_counter() - started, 3),
            "snapshot_reload_ms": state.get("last_reload_ms", -1.0),
            "rss_mb_large_policy": round(rss_mb(gateway_pid), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", "8")))
    args = parser.parse_args()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    env = {**os.environ, "BENCH_HS256_SECRET": SECRET}
    results: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "seconds": args.seconds, "connections": 32, "paths": {}}
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        seed(redis.url)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: [p.terminate() for p in procs])
        upstream_port, bare_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "mock-upstream", "--port",
                                       str(upstream_port)], cwd=ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.bare_proxy", upstream, str(bare_port)],
                                      cwd=ROOT))
        config_path, config = gateway_config(work, upstream, redis.url)
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
                                   cwd=ROOT, env=env)
        procs.append(gateway)
        admin = f"http://127.0.0.1:{config['admin']['port']}"
        wait_http(upstream + "/v1/models")
        wait_http(f"http://127.0.0.1:{bare_port}/v1/models")
        wait_http(admin + "/readyz")
        script = wrk_script(work, token())
        targets = {"upstream": upstream, "bare_proxy": f"http://127.0.0.1:{bare_port}",
                   "gateway": f"http://127.0.0.1:{config['listen']['port']}"}
        for name, base in targets.items():
            url = base + "/v1/chat/completions"
            run_wrk(url, script, connections=8, threads=1, seconds=2)  # warm-up
            loaded = run_wrk(url, script, connections=32, threads=2, seconds=args.seconds)
            single = run_wrk(url, script, connections=1, threads=1, seconds=max(3, args.seconds // 2))
            results["paths"][name] = {"rps_c32": loaded["rps"], "p99_ms_c32": loaded["p99_ms"],
                                      "p50_ms_c1": single["p50_ms"], "p99_ms_c1": single["p99_ms"],
                                      "non_2xx": loaded["non_2xx"] + single["non_2xx"]}
        bare, gw = results["paths"]["bare_proxy"], results["paths"]["gateway"]
        results["ratios"] = {"rps_gateway_over_bare": round(gw["rps_c32"] / bare["rps_c32"], 3),
                             "p50_c1_gateway_over_bare": round(gw["p50_ms_c1"] / bare["p50_ms_c1"], 3),
                             "p99_c1_gateway_over_bare": round(gw["p99_ms_c1"] / bare["p99_ms_c1"], 3)}
        results["policy"] = {"rss_mb_small_policy": round(rss_mb(gateway.pid), 1)}
        results["policy"].update(policy_scale(gateway.pid, admin, redis.url))
    print_table(results)
    out = ROOT / "bench" / "results" / f"{results['time'].replace(':', '')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {out.relative_to(ROOT)}")


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'path':<12} {'req/s c32':>10} {'p99 c32':>9} {'p50 c1':>8} {'p99 c1':>8} {'non-2xx':>8}")
    for name, row in results["paths"].items():
        print(f"{name:<12} {row['rps_c32']:>10.0f} {row['p99_ms_c32']:>7.2f}ms {row['p50_ms_c1']:>6.2f}ms "
              f"{row['p99_ms_c1']:>6.2f}ms {row['non_2xx']:>8}")
    print("\nratios (gateway / bare proxy):")
    for key, value in results["ratios"].items():
        print(f"  {key:<28} {value:.3f}")
    print("\npolicy scale (100,000 deny-entities + 10,000 partners):")
    for key, value in results["policy"].items():
        print(f"  {key:<28} {value}")


if __name__ == "__main__":
    main()
