"""Real nginx and Caddy processes for tests: the shipped deploy/ configurations, with loopback ports of the test's own.

A missing binary fails the test in CI (where .ci/run installs both) and skips it, saying why, elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "gateway.conf"
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"
# The addresses the shipped files name, replaced by the test's own.
MODEL_SERVER = "127.0.0.1:8000"
AUTHZ = "127.0.0.1:9902"
LISTEN_PORT = "8080"


def binary(name: str) -> str:
    """The path of ``name``; without it a test fails in CI and skips elsewhere, saying why."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)
    if found is None:
        message = f"{name} is not installed (Debian package {name}; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def nginx_main_config(directory: Path, site: str) -> str:
    """An nginx.conf of a test's own (paths it may write, no daemon) including ``site``."""
    temp = directory / "tmp"
    temp.mkdir(exist_ok=True)
    return f"""
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {directory}/gateway.conf;
}}
"""


def render(text: str, *, upstream_port: int, authz_port: int, port: int) -> str:
    for shipped, own in ((MODEL_SERVER, f"127.0.0.1:{upstream_port}"), (AUTHZ, f"127.0.0.1:{authz_port}")):
        assert shipped in text, f"the shipped configuration no longer names {shipped}"
        text = text.replace(shipped, own)
    return text


def nginx_test(directory: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` over a directory :func:`write_nginx` filled."""
    return subprocess.run(
        [binary("nginx"), "-t", "-p", str(directory), "-c", str(directory / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )


def write_nginx(directory: Path, *, upstream_port: int, authz_port: int, port: int) -> None:
    site = render(NGINX_CONF.read_text(), upstream_port=upstream_port, authz_port=authz_port, port=port)
    assert f"listen {LISTEN_PORT};" in site
    (directory / "gateway.conf").write_text(site.replace(f"listen {LISTEN_PORT};", f"listen 127.0.0.1:{port};"))
    (directory / "nginx.conf").write_text(nginx_main_config(directory, "gateway.conf"))


def write_caddyfile(directory: Path, *, upstream_port: int, authz_port: int, port: int) -> Path:
    site = render(CADDYFILE.read_text(), upstream_port=upstream_port, authz_port=authz_port, port=port)
    assert f"http://:{LISTEN_PORT}" in site
    site = site.replace(f"http://:{LISTEN_PORT}", f"http://127.0.0.1:{port}")
    path = directory / "Caddyfile"
    # A test's own Caddy: no admin endpoint (its port would be shared), no certificates.
    path.write_text("{\n\tadmin off\n\tauto_https off\n}\n\n" + site)
    return path


def caddy_env(directory: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory), "XDG_CONFIG_HOME": str(directory)}


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            # A connection, not a request: a request would be a decision, counted and audited.
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def _process(args: list[str], port: int, directory: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    log = directory / "process.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_listening(port, proc, log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_nginx(*, upstream_port: int, authz_port: int) -> Iterator[int]:
    """deploy/nginx/gateway.conf served by a real nginx; yields its port."""
    directory = Path(tempfile.mkdtemp(prefix="gw-nginx-"))
    port = free_port()
    write_nginx(directory, upstream_port=upstream_port, authz_port=authz_port, port=port)
    args = [binary("nginx"), "-p", str(directory), "-c", str(directory / "nginx.conf")]
    try:
        with _process(args, port, directory) as served:
            yield served
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def running_nginx_site(site: str) -> Iterator[tuple[int, Path]]:
    """A real nginx serving ``site`` (an ``http`` block's contents; ``{port}`` and ``{dir}`` filled in);
    yields its port and its directory (for files to serve)."""
    directory = Path(tempfile.mkdtemp(prefix="gw-nginx-site-"))
    directory.chmod(0o755)  # nginx's workers run as an unprivileged user when it starts as root
    port = free_port()
    (directory / "gateway.conf").write_text(site.replace("{port}", str(port)).replace("{dir}", str(directory)))
    (directory / "nginx.conf").write_text(nginx_main_config(directory, "gateway.conf"))
    args = [binary("nginx"), "-p", str(directory), "-c", str(directory / "nginx.conf")]
    try:
        with _process(args, port, directory) as served:
            yield served, directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def running_caddy(*, upstream_port: int, authz_port: int) -> Iterator[int]:
    """deploy/caddy/Caddyfile served by a real Caddy; yields its port."""
    directory = Path(tempfile.mkdtemp(prefix="gw-caddy-"))
    port = free_port()
    path = write_caddyfile(directory, upstream_port=upstream_port, authz_port=authz_port, port=port)
    args = [binary("caddy"), "run", "--config", str(path), "--adapter", "caddyfile"]
    try:
        with _process(args, port, directory, env=caddy_env(directory)) as served:
            yield served
    finally:
        shutil.rmtree(directory, ignore_errors=True)
