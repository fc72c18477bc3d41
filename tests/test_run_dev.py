"""``make run`` (scripts/run-dev.sh): the ports it uses come from the gateway's own variables, and a
port another process holds is an error naming the port and the variable, never a false "ready"."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.redis_server import free_port

from .support.gateway_process import ROOT

SCRIPT = ROOT / "scripts" / "run-dev.sh"


def _env(tmp_path: Path, **ports: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "MOCK_"))}
    env.update({name: str(port) for name, port in ports.items()})
    # A spool of the test's own: the dev config's ./var/audit is shared with anyone running `make run` here.
    env.update({"GATEWAY_AUDIT__SPOOL_DIR": str(tmp_path / "spool"), "READY_TIMEOUT_S": "60"})
    return env


@pytest.fixture
def occupied() -> Iterator[int]:
    """A port held by a listening socket of another "process" (here, the test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("variable", ["GATEWAY_LISTEN__PORT", "GATEWAY_ADMIN__PORT", "MOCK_PORT"])
def test_a_taken_port_fails_naming_the_port_and_the_variable(tmp_path: Path, occupied: int, variable: str) -> None:
    ports = {
        "GATEWAY_LISTEN__PORT": free_port(),
        "GATEWAY_ADMIN__PORT": free_port(),
        "MOCK_PORT": free_port(),
        variable: occupied,
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=_env(tmp_path, **ports),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert f"port {occupied}" in result.stderr and "already in use" in result.stderr, result.stderr
    assert f"{variable}=" in result.stderr
    assert "is ready" not in result.stdout


def _lines(stream: object) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], pattern: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            break
        if re.search(pattern, seen[-1]):
            return seen
    raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n{''.join(seen)}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_overridden_ports_are_used_printed_and_served(tmp_path: Path) -> None:
    public, admin, mock = free_port(), free_port(), free_port()
    env = _env(tmp_path, GATEWAY_LISTEN__PORT=public, GATEWAY_ADMIN__PORT=admin, MOCK_PORT=mock)
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        lines = _lines(proc.stdout)
        try:
            seen = _wait_for(lines, r"Ctrl-C stops", timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(tmp_path / 'stderr.log').read_text()[-3000:]}") from None
        text = "".join(seen)
        assert f"public http://127.0.0.1:{public}, admin http://127.0.0.1:{admin}" in text
        assert f"upstream: http://127.0.0.1:{mock}" in text
        assert ":8080" not in text and ":9901" not in text and ":8000" not in text
        curl = next(line for line in seen if line.startswith("curl -sS http"))
        token = re.search(r"Bearer ([\w.-]+)", curl).group(1)  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{public}/v1/chat/completions" in curl
        request = urllib.request.Request(
            f"http://127.0.0.1:{public}/v1/chat/completions",
            data=b'{"model": "gpt-mock", "messages": []}',
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["model"] == "gpt-mock"  # the mock, on its port, answered
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as response:
            assert response.status == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the script and everything it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()  # a pipe left open is a ResourceWarning
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_port_open(p) for p in (public, admin, mock)):
        time.sleep(0.1)
    assert not any(_port_open(p) for p in (public, admin, mock)), "something was left running"
