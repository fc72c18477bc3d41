"""Impact preview time: 100,000 audit records from 10,000 distinct callers decided again under a change.

Seeds a redis-server of its own with the large policy (100,000 ``deny-entities``, 10,000 ``partners``)
and the audit records, starts a gateway runtime in this process on it, and times
:meth:`gateway.impact.ImpactPreview.preview` for a ``deny-countries`` addition a few times, with a
task on the event loop that measures the loop's worst stall meanwhile (the loop serves requests in a
gateway), and the CPU the preview costs this process and Redis (the wall time on a shared machine
grows with others' load, the CPU does not). ``python -m bench.impact`` runs it alone; ``make bench`` includes it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.redis_server import RedisServer

RECORDS = 100_000
CALLERS = 10_000
COUNTRIES = ("US", "DE", "BR", "JP", "GB")
ENTRY = {"reason": "bench", "source": "bench"}


def _record(n: int) -> bytes:
    caller = n % CALLERS
    return orjson.dumps(
        {
            "time": "2026-01-01T00:00:00.000Z",
            "request_id": f"bench-{n}",
            "subject": f"user-{caller}",
            "org": f"org-{caller % 500}",
            "org_name": None,
            "tier": "bench",
            "claimed_country": COUNTRIES[caller % len(COUNTRIES)],
            "client_ip": f"10.{caller // 256}.{caller % 256}.1",
            "ip_country": None,
            "model": "gpt-mock",
            "decision": "allow",
            "code": "",
            "policy_version": 1,
            "status": 200,
            "upstream_status": 200,
            "duration_ms": 1.0,
        }
    )


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(redis_url: str, redis_pid: int, runs: int) -> dict[str, Any]:
    from gateway.bootstrap import import_policy
    from gateway.impact import ImpactLimits, ImpactPreview
    from gateway.runtime import create_runtime
    from gateway.settings import parse_settings
    from gateway.storage.keys import list_key
    from gateway.storage.ops import HashSet
    from gateway.storage.store import Store

    store = Store.from_url(redis_url, timeout_s=30)
    try:
        document = {
            "lists": {
                "deny-countries": {"IR": ENTRY},
                "deny-entities": {f"entity-{i}": ENTRY for i in range(100_000)},
                "partners": {f"org-{i}": ENTRY for i in range(10_000)},
                "ip-ranges": {},
            },
            "models": {
                "gpt-mock": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}
            },
        }
        await import_policy(store, document, actor="bench", tiers=("bench",))
        for start in range(0, RECORDS, 5000):
            batch = [(n + 1, _record(n)) for n in range(start, min(start + 5000, RECORDS))]
            await store.append_audit("bench", batch, maxlen=RECORDS * 2)
        with tempfile.TemporaryDirectory(prefix="gw-bench-impact-") as spool:
            settings = parse_settings(
                {
                    "upstream": {"url": "http://127.0.0.1:9"},
                    "auth": {"algorithms": ["HS256"], "hs256_secret_env": "BENCH_HS256_SECRET"},
                    "tiers": {"bench": {"stages": ["general"]}, "public": {"stages": ["general"]}},
                    "audit": {"spool_dir": str(Path(spool) / "spool")},
                },
                environ={"BENCH_HS256_SECRET": "bench-hs256-secret-0123456789abcdef0123456789"},
            )
            environ = {"BENCH_HS256_SECRET": "bench-hs256-secret-0123456789abcdef0123456789"}
            async with create_runtime(settings, store=store, environ=environ) as runtime:
                engine = ImpactPreview(
                    store=store,
                    admission=runtime.admission,
                    rules=runtime.admission.rules,
                    screening=settings.screening,
                    limits=ImpactLimits(timeout_s=60),
                )
                ops = [HashSet(list_key("deny-countries"), "BR", ENTRY)]
                times, cpu, redis_cpu, stalls, answer = [], [], [], [], {}
                for _ in range(runs):
                    worst = [0.0]
                    done = asyncio.Event()

                    async def tick(worst: list[float] = worst, done: asyncio.Event = done) -> None:
                        last = time.monotonic()
                        while not done.is_set():
                            await asyncio.sleep(0.002)
                            now = time.monotonic()
                            worst[0] = max(worst[0], now - last)
                            last = now

                    ticker = asyncio.create_task(tick())
                    started, cpu_started, redis_started = time.perf_counter(), time.process_time(), _cpu_s(redis_pid)
                    answer = await engine.preview(ops, hours=1)
                    times.append((time.perf_counter() - started) * 1000)
                    cpu.append((time.process_time() - cpu_started) * 1000)
                    redis_cpu.append((_cpu_s(redis_pid) - redis_started) * 1000)
                    done.set()
                    await ticker
                    stalls.append(worst[0] * 1000)
    finally:
        await store.close()
    assert answer["records"] == RECORDS and answer["callers"] == CALLERS and answer["complete"], answer
    return {
        "records": RECORDS,
        "callers": CALLERS,
        "runs": runs,
        "preview_ms_p50": round(statistics.median(times), 1),
        "preview_ms_max": round(max(times), 1),
        # On a shared machine the wall time grows with others' load; the CPU spent does not.
        "preview_cpu_ms_p50": round(statistics.median(cpu), 1),
        "redis_cpu_ms_p50": round(statistics.median(redis_cpu), 1),
        "loop_worst_stall_ms_p50": round(statistics.median(stalls), 1),
        "would_block": answer["would_block_count"],
    }


def impact_preview(runs: int = 5) -> dict[str, Any]:
    """The preview's time over ``runs`` runs on a redis-server of its own."""
    with RedisServer() as redis:
        assert redis.process is not None
        return asyncio.run(_measure(redis.url, redis.process.pid, runs))


if __name__ == "__main__":
    for key, value in impact_preview().items():
        print(f"  {key:<32} {value}")
