"""Process management for ``gateway serve``: embedded Redis, worker processes, signals, listeners."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from .app import create_admin_app, create_public_server
from .authz import create_authz_server
from .listener import JsonErrorAppRunner
from .logs import setup_logging
from .redis_server import RedisServer
from .runtime import Runtime, create_runtime
from .settings import ConfigError, Settings, read_secret

log = logging.getLogger("gateway.server")


async def run_gateway(
    settings: Settings,
    *,
    redis_url: str,
    reuse_port: bool,
    bootstrap_policy: Path | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one gateway process until SIGTERM/SIGINT (or ``stop``), then shut down gracefully."""
    async with create_runtime(settings, redis_url=redis_url) as runtime:
        if bootstrap_policy is not None:
            from .bootstrap import import_policy_file_if_missing

            await import_policy_file_if_missing(runtime, bootstrap_policy)
        await _serve(runtime, reuse_port=reuse_port, stop=stop or asyncio.Event())
    log.info("gateway stopped")


async def _serve(runtime: Runtime, *, reuse_port: bool, stop: asyncio.Event) -> None:
    """Both listeners over ``runtime`` until ``stop``; in-flight requests drain before the runtime closes."""
    settings = runtime.settings
    limits = settings.limits
    public_runner = web.ServerRunner(create_public_server(runtime), shutdown_timeout=limits.shutdown_grace_s)
    admin_runner = JsonErrorAppRunner(
        create_admin_app(runtime),
        access_log=None,
        shutdown_timeout=5.0,
        keepalive_timeout=limits.header_read_timeout_s,
        policy_version=runtime.policy_version,
    )
    authz_runner: web.ServerRunner | None = None
    if settings.authz is not None:
        authz_runner = web.ServerRunner(create_authz_server(runtime), shutdown_timeout=limits.shutdown_grace_s)
        await authz_runner.setup()
    await public_runner.setup()
    await admin_runner.setup()
    try:
        await _listen(
            public_runner, settings.listen.host, settings.listen.port, "listen", reuse_port=reuse_port, backlog=2048
        )
        await _listen(admin_runner, settings.admin.host, settings.admin.port, "admin", reuse_port=reuse_port)
        if authz_runner is not None and settings.authz is not None:
            await _listen(
                authz_runner, settings.authz.host, settings.authz.port, "authz", reuse_port=reuse_port, backlog=2048
            )
        log.info(
            "gateway listening",
            extra={
                "public": f"{settings.listen.host}:{settings.listen.port}",
                "admin": f"{settings.admin.host}:{settings.admin.port}",
                "pid": os.getpid(),
            },
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        log.info("gateway stopping: draining in-flight requests")
        await public_runner.cleanup()
        if authz_runner is not None:
            await authz_runner.cleanup()
        await admin_runner.cleanup()


class ListenError(Exception):
    """A listener could not bind its address (most often: another process holds the port)."""


async def _listen(
    runner: web.BaseRunner, host: str, port: int, section: str, *, reuse_port: bool, backlog: int = 128
) -> None:
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=backlog).start()
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ListenError(
            f"{section}.port: cannot listen on {host}:{port}: {why}; if another process holds "
            f"the port, stop it or choose a free one ({section}.port or "
            f"GATEWAY_{section.upper()}__PORT)"
        ) from None


# Young-generation collections start once this many more container objects are alive than freed. The
# default (700) is less than what 32 requests in flight hold, so under load the collector ran every few
# requests (about 4% of the CPU in `make bench`); objects that die young are freed by reference counting.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Keep the collector off the request path: the modules and objects alive at start are frozen (a
    full collection no longer walks them: it had stalled the event loop 45-50 ms every few seconds
    under load), and young collections run less often."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _run_worker(settings: Settings, redis_url: str, reuse_port: bool, bootstrap: Path | None) -> None:
    setup_logging(settings.logging)
    tune_gc()
    main = run_gateway(settings, redis_url=redis_url, reuse_port=reuse_port, bootstrap_policy=bootstrap)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
            asyncio.run(main)
        else:
            uvloop.run(main)
    except ListenError as exc:
        # Status 2, as for any other start-up problem the operator fixes in the config.
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(2)


def preflight(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Load what the config points at (key files, secrets, token files) once, before any process
    starts, so a bad path, key or missing secret exits with status 2 and a message naming the key.
    ``gateway check-config`` runs exactly this too, so a file it calls ok is one ``serve`` starts with."""
    from .admin.auth import parse_tokens_file
    from .geo import GeoResolver
    from .jwks import KeyRing

    env = os.environ if environ is None else environ
    KeyRing.from_settings(settings.auth, env)
    if settings.admin.tokens_file is not None:
        parse_tokens_file(settings.admin.tokens_file)
    if settings.network.geoip_db is not None:
        try:
            GeoResolver(settings.network.geoip_db).close()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"network.geoip_db: cannot open {settings.network.geoip_db}: {exc}") from None
    # A secret the config names must be there: without it the admin API would refuse everyone, the
    # upstream would get no credentials, or Redis would refuse the gateway, each found only later.
    if settings.admin.tokens_file is None:
        _require_secret(
            "admin.token_env",
            settings.admin.token_env,
            env,
            "export it, name tokens in admin.tokens_file instead, or set admin.token_env: null to run "
            "with the admin API closed",
        )
    _require_secret("upstream.api_key_env", settings.upstream.api_key_env, env)
    if settings.redis.url is not None:
        _require_secret("redis.password_env", settings.redis.password_env, env)


def _require_secret(key: str, env_name: str | None, environ: Mapping[str, str], hint: str = "") -> None:
    if env_name and not read_secret(env_name, environ):
        raise ConfigError(
            f"{key}: environment variable {env_name} (or {env_name}_FILE) is not set{'; ' + hint if hint else ''}"
        )


def serve(settings: Settings, *, workers: int, bootstrap_policy: Path | None) -> int:
    """Start the embedded Redis when configured so, then one or ``workers`` gateway processes."""
    setup_logging(settings.logging)
    embedded: RedisServer | None = None
    redis_url = settings.redis.url
    if redis_url is None:
        embedded = RedisServer(unix_socket=True).start()
        redis_url = embedded.url
        log.info("embedded redis started", extra={"redis": redis_url})
    try:
        if workers <= 1:
            _run_worker(settings, redis_url, False, bootstrap_policy)
            return 0
        return _supervise(settings, redis_url, workers, bootstrap_policy)
    finally:
        if embedded is not None:
            embedded.cleanup()


def _supervise(settings: Settings, redis_url: str, workers: int, bootstrap: Path | None) -> int:
    """N workers share both ports (SO_REUSEPORT); metrics are summed through a shared directory."""
    metrics_dir = tempfile.mkdtemp(prefix="gw-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    procs = []
    for index in range(workers):
        proc = context.Process(
            target=_run_worker,
            name=f"gateway-worker-{index}",
            args=(settings, redis_url, True, bootstrap if index == 0 else None),
        )
        proc.start()
        procs.append(proc)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    try:
        for proc in procs:
            while proc.is_alive():
                proc.join(timeout=0.5)
                if not stopping and any(not p.is_alive() for p in procs):
                    # One worker died: stop the rest rather than serve on half capacity silently.
                    log.error("a worker exited; stopping all workers")
                    forward(signal.SIGTERM, None)
                    status = 1
            if proc.exitcode == 2:
                status = 2  # a start-up problem (a port taken): the same status one process gives
            elif proc.exitcode not in (0, -signal.SIGTERM):
                status = max(status, 1)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: gateway serve --config PATH")
