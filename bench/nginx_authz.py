"""nginx in front of the mock model server for ``make bench``: deploy/nginx/gateway.conf asking the gateway's
``authz`` listener about each request, and the same nginx without the decision, for reference.

The shipped file reads no body (auth_request sends none); the bench hands the decision service the
model in ``X-Gateway-Model`` as a fixed value, where a deployment sets it from the path or the body
(deploy/nginx/model-from-body.conf), so the row measures the data plane and the decision, not Lua.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "nginx" / "gateway.conf"
MODEL_LINE = 'proxy_set_header X-Gateway-Model "";            # with model-from-body.conf: $gateway_model'


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def ensure_nginx() -> str:
    found = nginx_binary()
    if found is None:
        print("nginx not found; installing it from the Debian packages", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=False)
        found = nginx_binary()
    if found is None:
        sys.exit("make bench needs nginx (apt-get install nginx)")
    return found


def _site(upstream_port: int, authz_port: int, port: int, model: str, *, authz: bool) -> str:
    if not authz:
        return (
            f"upstream model_server {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}\n"
            f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://model_server; "
            'proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }\n'
        )
    text = SHIPPED.read_text()
    assert MODEL_LINE in text, "deploy/nginx/gateway.conf changed: update bench/nginx_authz.py"
    text = text.replace(MODEL_LINE, f"proxy_set_header X-Gateway-Model {model};")
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    text = text.replace("127.0.0.1:9902", f"127.0.0.1:{authz_port}")
    return text.replace("listen 8080;", f"listen 127.0.0.1:{port};")


def start_nginx(
    work: Path, upstream_port: int, authz_port: int, *, authz: bool = True, model: str = "gpt-mock"
) -> tuple[subprocess.Popen[bytes], int]:
    """A running nginx (one worker, as the gateway has one process) and its port."""
    directory = work / ("nginx-authz" if authz else "nginx-bare")
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    (directory / "site.conf").write_text(_site(upstream_port, authz_port, port, model, authz=authz))
    (directory / "nginx.conf").write_text(
        f"daemon off;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log warn;\nworker_processes 1;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; client_body_temp_path {directory}/tmp/body; proxy_temp_path {directory}/tmp/proxy;\n"
        f"  fastcgi_temp_path {directory}/tmp/f; uwsgi_temp_path {directory}/tmp/u; scgi_temp_path {directory}/tmp/s;\n"
        f"  include {directory}/site.conf; }}\n"
    )
    proc = subprocess.Popen([ensure_nginx(), "-p", str(directory), "-c", str(directory / "nginx.conf")])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"nginx did not listen on {port}; see {directory}/error.log")
