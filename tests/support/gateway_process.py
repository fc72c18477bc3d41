"""Gateway processes for black-box tests: their config, start and stop, and the policy seeded into their Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from gateway.redis_server import free_port

from .tokens import HS_SECRET, auth

ROOT = Path(__file__).resolve().parent.parent.parent
ADMIN_TOKEN = "test-admin-token"


BASE_POLICY: dict[str, Any] = {
    "lists": {
        "deny-countries": {"IR": {"reason": "test embargo", "source": "test"}},
        "deny-entities": {},
        "partners": {"acme": {"reason": "test partner", "source": "test"}},
        "ip-ranges": {},
    },
    "models": {
        "gpt-mock": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False},
    },
}


# --- gateway processes -------------------------------------------------------------------------


def gateway_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token_env": "GATEWAY_ADMIN_TOKEN"},
        "upstream": {"url": upstream_url, "read_timeout_s": 2, "connect_timeout_s": 1},
        "auth": {"algorithms": ["HS256"], "hs256_secret_env": "TEST_HS256_SECRET", "leeway_s": 0},
        "policy": {"max_staleness_s": 3, "poll_interval_s": 0.1},
        "logging": {"level": "warning", "format": "json"},
        # Well inside stop()'s timeout, so a connection still open at SIGTERM on a busy machine
        # cannot turn a clean stop into a SIGKILL.
        "limits": {"shutdown_grace_s": 5},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


class GatewayProcess:
    """``python -m gateway serve`` as a child process with a config file of the test's own."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        redis_url: str | None,
        workers: int = 1,
        env: dict[str, str] | None = None,
        bootstrap: Path | None = None,
    ) -> None:
        self.config = config
        if redis_url is not None:
            self.config.setdefault("redis", {})["url"] = redis_url
        self.workers = workers
        self.dir = Path(tempfile.mkdtemp(prefix="gw-test-"))
        self.config.setdefault("audit", {}).setdefault("spool_dir", str(self.dir / "spool"))
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.env = {**os.environ, "TEST_HS256_SECRET": HS_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
        self.bootstrap = bootstrap
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['listen']['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config['admin']['port']}"

    def start(self, *, wait_ready: bool = True, timeout: float = 20) -> GatewayProcess:
        args = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config_path),
            "--workers",
            str(self.workers),
        ]
        if self.bootstrap is not None:
            args += ["--bootstrap-policy", str(self.bootstrap)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_http(self.admin_url + "/healthz", timeout)
        if wait_ready:
            self.wait_http(self.admin_url + "/readyz", timeout)
        return self

    def wait_http(self, url: str, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{url} not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, sig)  # workers too, as a crash would take them
            else:
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._log.close()
        return proc.returncode


@contextmanager
def running_gateway(config: dict[str, Any], *, wait_ready: bool = True, **kwargs: Any) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(config, **kwargs)
    try:
        yield gateway.start(wait_ready=wait_ready)
    finally:
        gateway.stop()


@contextmanager
def seeded_gateway(
    config: dict[str, Any], document: dict[str, Any] | None = None, **kwargs: Any
) -> Iterator[GatewayProcess]:
    """A gateway on a redis-server of its own, seeded with ``document`` (BASE_POLICY by default)."""
    from gateway.redis_server import RedisServer

    with RedisServer() as redis:
        seed_policy(redis.url, document)
        with running_gateway(config, redis_url=redis.url, **kwargs) as gateway:
            yield gateway


def seed_policy(redis_url: str, document: dict[str, Any] | None = None) -> int:
    """Import a whole policy straight into Redis (as an operator's restore would)."""
    from gateway.bootstrap import import_policy
    from gateway.storage.store import Store

    async def run() -> int:
        store = Store.from_url(redis_url, timeout_s=2)
        try:
            return await import_policy(
                store, document or BASE_POLICY, actor="test", tiers=("public", "partner", "internal")
            )
        finally:
            await store.close()

    return run_sync(run())


# Tiers for multi-process and topology tests: a partner tier too generous to limit anything, a tight one
# whose limit a test can reach, and the public one.
SCALE_TIERS: dict[str, Any] = {
    "partner": {"requests_per_minute": 600000, "burst": 100000, "stages": ["partners", "general"]},
    "tight": {"requests_per_minute": 1, "burst": 5, "stages": ["general"]},
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
}

# A valid stored list entry, for writes made straight through the store.
ENTRY: dict[str, Any] = {
    "reason": "test",
    "source": "test",
    "added_by": "test",
    "added_at": "2026-01-01T00:00:00Z",
    "expires_at": None,
}


async def write_entry(redis_url: str, key: str, field: str, value: dict[str, Any] | None = None) -> int:
    """One list entry written through the store's write path (version bump, change record); the new version."""
    from gateway.storage.ops import HashSet

    return await _write_one(redis_url, HashSet(key, field, ENTRY if value is None else value), f"{key}#{field}")


async def delete_entry(redis_url: str, key: str, field: str) -> int:
    from gateway.storage.ops import HashDelete

    return await _write_one(redis_url, HashDelete(key, field), f"{key}#{field}")


async def _write_one(redis_url: str, op: Any, target: str) -> int:
    from gateway.storage.store import Store

    store = Store.from_url(redis_url, timeout_s=2)
    try:
        version, _ = await store.write([op], actor="test", now_iso="2026-01-01T00:00:00Z", target=target)
        return int(version)
    finally:
        await store.close()


def run_sync(coroutine: Any) -> Any:
    """Run a coroutine to completion from sync or async test code (in a thread of its own)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


CHAT = {"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]}


async def post_chat(client: Any, gateway: GatewayProcess, token: str) -> int:
    """POST a small chat completion through ``gateway``; the status it got."""
    async with client.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(token)) as response:
        await response.read()
        return int(response.status)


async def first_status(client: Any, gateway: GatewayProcess, token: str, status: int, within: float) -> float:
    """Seconds until ``gateway`` answers ``status`` to ``token``; fails after ``within`` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await post_chat(client, gateway, token) == status:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gateway.url} did not answer {status} within {within}s")


def example_policy() -> dict[str, Any]:
    """config/policy.example.yaml with config/country-groups.yaml as its country-groups list, as
    ``make run`` loads them (the example names EAR Country Groups the second file defines)."""
    import yaml

    root = Path(__file__).resolve().parents[2] / "config"
    policy: dict[str, Any] = yaml.safe_load((root / "policy.example.yaml").read_text(encoding="utf-8"))
    policy["lists"]["country-groups"] = yaml.safe_load((root / "country-groups.yaml").read_text(encoding="utf-8"))
    return policy


def example_policy_file(directory: Path) -> Path:
    """:func:`example_policy` written as YAML in ``directory``."""
    import yaml

    path = directory / "dev-policy.yaml"
    path.write_text(yaml.safe_dump(example_policy(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
