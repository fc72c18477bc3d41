"""``make bench-ab REF=<git ref>``: this tree's gateway against the gateway at another commit, interleaved.

A change that must not cost throughput is measured here: the same mock upstream, a bare aiohttp
pass-through proxy, the gateway at REF (checked out into a temporary git worktree) and the gateway of
this tree each get the same wrk load, round after round in turn, each gateway on a Redis of its own
seeded with the same policy by its own code. The machine's speed moves in spells, so each round's
ratio to the bare proxy is taken and the medians of those ratios are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from bench.run import ROOT, SECRET, ensure_wrk, gateway_config, run_wrk, token, wait_http, wrk_script
from gateway.redis_server import RedisServer, free_port

POLICY: dict[str, Any] = {
    "lists": {
        "deny-countries": {"IR": {"reason": "bench", "source": "bench"}},
        "deny-entities": {},
        "partners": {},
        "ip-ranges": {},
    },
    "models": {"gpt-mock": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}},
    "api_keys": {},
    "screening": {"entries": []},
}


def checkout(ref: str, into: Path) -> Path:
    tree = into / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), ref], cwd=ROOT, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ref", help="the git ref to compare against (e.g. HEAD~5, a tag)")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", "6")))
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "5")))
    args = parser.parse_args()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    env = {**os.environ, "BENCH_HS256_SECRET": SECRET}
    procs: list[subprocess.Popen[bytes]] = []
    policy_file = work / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(POLICY))
    baseline = checkout(args.ref, work)

    def stop() -> None:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)

    try:
        with ExitStack() as stack:

            def spawn(tree: Path, *argv: str) -> None:
                procs.append(
                    subprocess.Popen([sys.executable, "-m", *argv], cwd=tree, env={**env, "PYTHONPATH": str(tree)})
                )

            upstream_port, bare_port = free_port(), free_port()
            upstream = f"http://127.0.0.1:{upstream_port}"
            spawn(ROOT, "gateway", "mock-upstream", "--port", str(upstream_port))
            spawn(ROOT, "bench.bare_proxy", upstream, str(bare_port))
            wait_http(upstream + "/v1/models")
            ports = {"bare_proxy": bare_port}
            for name, tree in (("gateway_ref", baseline), ("gateway_this", ROOT)):
                redis = stack.enter_context(RedisServer())
                config_path, config = gateway_config(Path(tempfile.mkdtemp(dir=work)), upstream, redis.url)
                spawn(tree, "gateway", "serve", "--config", str(config_path), "--bootstrap-policy", str(policy_file))
                wait_http(f"http://127.0.0.1:{config['admin']['port']}/readyz", timeout=60)
                ports[name] = config["listen"]["port"]
            stack.callback(stop)  # last registered, first run: the gateways stop before their Redis
            script = wrk_script(work, token())
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
            for _ in range(args.rounds):
                for name, port in ports.items():
                    rounds[name].append(
                        run_wrk(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            script,
                            connections=32,
                            threads=2,
                            seconds=args.seconds,
                        )
                    )
            report(args.ref, rounds)
    finally:
        stop()
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)


def report(ref: str, rounds: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n{'path':<16} {'req/s (median)':>15} {'p99 ms':>8}   req/s of each round")
    for name, runs in rounds.items():
        rps = [run["rps"] for run in runs]
        print(
            f"{name:<16} {statistics.median(rps):>15,.0f} {statistics.median(r['p99_ms'] for r in runs):>8.2f}"
            f"   {', '.join(f'{value:,.0f}' for value in rps)}"
        )
    bare = [run["rps"] for run in rounds["bare_proxy"]]
    for name in ("gateway_ref", "gateway_this"):
        ratios = [run["rps"] / b for run, b in zip(rounds[name], bare, strict=True)]
        print(
            f"{name} / bare proxy: median {statistics.median(ratios):.3f}x "
            f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    pairs = [this["rps"] / old["rps"] for this, old in zip(rounds["gateway_this"], rounds["gateway_ref"], strict=True)]
    print(
        f"this tree / {ref}: median {statistics.median(pairs):.3f}x (rounds {', '.join(f'{r:.3f}' for r in pairs)})"
        f"  [{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}]"
    )


if __name__ == "__main__":
    main()
