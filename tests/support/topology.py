"""Real Redis topologies on loopback for tests: a Sentinel-watched primary/replica and a Cluster.

Every process is the same ``redis-server`` binary the rest of the suite uses
(Sentinel is ``redis-server <conf> --sentinel``). Timings are tuned for tests:
Sentinels judge a primary down after one second and fail over within a few, so a
whole failover fits in a test of a few seconds. Also: throwaway TLS files and a
redis-server that requires client certificates, for the ``rediss://`` form.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import redis as redis_sync

from gateway.redis_server import RedisServer, RedisServerError, find_redis_binary, free_port

SERVICE = "gwprimary"


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis_sync.RedisError, OSError):
            pass  # not up yet
        time.sleep(0.05)
    raise RedisServerError(f"{what} not reached within {timeout_s}s")


def server_version() -> tuple[int, ...]:
    """The version of the redis-server binary the tests use, e.g. (7, 0, 15)."""
    out = subprocess.run([find_redis_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else (0,)


def _client(port: int) -> redis_sync.Redis:
    return redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


class SentinelServer(RedisServer):
    """One Sentinel process. It needs a writable config file (it records what it learns there)."""

    def __init__(self, *, primary_port: int, quorum: int, down_after_ms: int, failover_timeout_ms: int) -> None:
        super().__init__()
        self.conf = Path(self._dir) / "sentinel.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode no",
                    f"dir {self._dir}",
                    f"logfile {os.path.join(self._dir, 'redis.log')}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}",
                    f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
                    f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}",
                    f"sentinel parallel-syncs {SERVICE} 1",
                    "",
                ]
            )
        )

    def _args(self) -> list[str]:
        return [self.binary, str(self.conf), "--sentinel"]


class _Topology:
    """Servers started together and cleaned up together, also when starting them fails half-way."""

    def start(self) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class SentinelTopology(_Topology):
    """A primary, one replica and three Sentinels (quorum 2), all on loopback."""

    def __init__(self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 2000) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels = [
            SentinelServer(
                primary_port=self.primary.port,
                quorum=2,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for _ in range(3)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> SentinelTopology:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_settled()
        return self

    def primary_port(self) -> int:
        """The primary's port as the Sentinels' majority sees it now."""
        with _client(self.sentinels[0].port) as client:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def wait_settled(self, timeout_s: float = 20.0) -> None:
        """Replica in sync, and every Sentinel knows the replica and the other two Sentinels.

        A failover needs all of that: a Sentinel that has not discovered the replica or
        its peers yet could neither reach a quorum nor pick a new primary.
        """

        def replica_synced() -> bool:
            with _client(self.replica.port) as client:
                return bool(client.info("replication").get("master_link_status") == "up")

        def sentinels_know_everyone() -> bool:
            for sentinel in self.sentinels:
                with _client(sentinel.port) as client:
                    replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
                    peers = client.execute_command("SENTINEL", "SENTINELS", SERVICE)
                if len(replicas) < 1 or len(peers) < len(self.sentinels) - 1:
                    return False
            return True

        _wait(replica_synced, timeout_s, "replica in sync")
        _wait(sentinels_know_everyone, timeout_s, "sentinels discovered the replica and each other")

    def wait_failover(self, old_port: int, timeout_s: float = 20.0) -> int:
        """Wait until the Sentinels name a primary other than ``old_port`` and it accepts writes."""

        def promoted() -> bool:
            port = self.primary_port()
            if port == old_port:
                return False
            with _client(port) as client:
                return bool(client.info("replication").get("role") == "master")

        _wait(promoted, timeout_s, "failover to a new primary")
        return self.primary_port()

    def wait_replicated(self, timeout_s: float = 5.0) -> None:
        """Block until the replica has acknowledged every write made so far (``WAIT``): replication
        is asynchronous, so a primary killed right after a write may take it with it."""
        with _client(self.primary_port()) as client:
            acknowledged = client.execute_command("WAIT", 1, int(timeout_s * 1000))
        assert acknowledged >= 1, "the replica did not acknowledge the writes"

    def server_on(self, port: int) -> RedisServer:
        return self.primary if self.primary.port == port else self.replica

    def cleanup(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            server.cleanup()


class ClusterTopology(_Topology):
    """A Redis Cluster of ``size`` primaries (no replicas), slots split evenly, on loopback."""

    SLOTS = 16384

    def __init__(self, size: int = 3, *, node_timeout_ms: int = 2000) -> None:
        if server_version() < (7, 0):
            raise RedisServerError("a test Cluster needs redis-server 7 (cluster-port, CLUSTER ADDSLOTSRANGE)")
        # An explicit bus port: the default (port + 10000) overflows for free ports above 55535.
        self.bus_ports = [free_port() for _ in range(size)]
        self.nodes = [
            RedisServer(
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    str(bus_port),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                ]
            )
            for bus_port in self.bus_ports
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> ClusterTopology:
        for node in self.nodes:
            node.start()
        self._form()
        return self

    def _form(self) -> None:
        # What `redis-cli --cluster create` does, without its interactive steps:
        # distinct config epochs, an even slot split, and one MEET per node.
        size = len(self.nodes)
        first = _client(self.nodes[0].port)
        try:
            for index, node in enumerate(self.nodes):
                with _client(node.port) as client:
                    client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                    start = index * self.SLOTS // size
                    end = (index + 1) * self.SLOTS // size - 1
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
                if index:
                    first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, self.bus_ports[index])
        finally:
            first.close()

        def formed() -> bool:
            for node in self.nodes:
                with _client(node.port) as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info or f"cluster_known_nodes:{size}" not in info:
                        return False
            return True

        _wait(formed, 20.0, "cluster_state:ok on every node")

    def node_for_key(self, key: str) -> int:
        """The port of the node that owns ``key``'s slot."""
        with _client(self.nodes[0].port) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, (_host, port, *_rest), *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(port)
        raise LookupError(key)

    def keys_by_node(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for node in self.nodes:
            with _client(node.port) as client:
                out[node.port] = sorted(k.decode() for k in client.scan_iter(count=1000))
        return out

    def flushall(self) -> None:
        for node in self.nodes:
            with _client(node.port) as client:
                client.flushall()
                client.script_flush()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it must fail


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def authority(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(
        common: str,
        usage: x509.ObjectIdentifier,
        ca: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        san: list[x509.GeneralName] | None = None,
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    ca, ca_key = authority("gateway test CA")
    other, _ = authority("some other CA")
    server_cert, server_key = leaf(
        "redis",
        ExtendedKeyUsageOID.SERVER_AUTH,
        ca,
        ca_key,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cert, client_key = leaf("gateway", ExtendedKeyUsageOID.CLIENT_AUTH, ca, ca_key)
    return TlsFiles(
        ca=write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        server_cert=write(directory / "server.pem", server_cert),
        server_key=write(directory / "server.key", server_key),
        client_cert=write(directory / "client.pem", client_cert),
        client_key=write(directory / "client.key", client_key),
        other_ca=write(directory / "other-ca.pem", other.public_bytes(serialization.Encoding.PEM)),
    )


class TlsRedisServer(RedisServer):
    """A redis-server that also listens with TLS and requires client certificates there.

    The plain port stays open on loopback only for the start-up PING; tests use ``tls_url``.
    """

    def __init__(self, tls: TlsFiles) -> None:
        self.tls_port = free_port()
        super().__init__(
            extra_args=[
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                str(tls.server_cert),
                "--tls-key-file",
                str(tls.server_key),
                "--tls-ca-cert-file",
                str(tls.ca),
                "--tls-auth-clients",
                "yes",
            ]
        )

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"
