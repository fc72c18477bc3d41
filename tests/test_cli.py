"""The operator CLI (docs/contract.md §8): the real ``gateway`` command against a running admin listener."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.redis_server import RedisServer, free_port

from .support.gateway_process import (
    ADMIN_TOKEN,
    BASE_POLICY,
    ROOT,
    GatewayProcess,
    example_policy_file,
    gateway_config,
    seeded_gateway,
)
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until_blocking

CSL_CSV = ROOT / "gateway" / "data" / "csl_sample.csv"
_SCRIPT = Path(sys.executable).parent / "gateway"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gateway"]


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[GatewayProcess]:
    with seeded_gateway(gateway_config(upstream.url), BASE_POLICY) as process:
        yield process


def cli(
    gateway: GatewayProcess | None, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_ADMIN")}
    if gateway is not None:
        base.update({"GATEWAY_ADMIN_URL": gateway.admin_url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})
    return subprocess.run(
        [*COMMAND, *args],
        env={**base, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def ok(gateway: GatewayProcess, *args: str, **kwargs: Any) -> str:
    result = cli(gateway, *args, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


def fails(gateway: GatewayProcess | None, *args: str, status: int = 1, **kwargs: Any) -> str:
    result = cli(gateway, *args, **kwargs)
    assert result.returncode == status, f"{args}: rc={result.returncode} {result.stdout} {result.stderr}"
    assert result.stderr.strip()
    return result.stderr


def public_status(gateway: GatewayProcess, token: str) -> int:
    request = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=b'{"model": "gpt-mock"}',
        headers={**auth(token), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def admin_get(gateway: GatewayProcess, path: str) -> Any:
    request = urllib.request.Request(gateway.admin_url + path, headers=auth(ADMIN_TOKEN))
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


# --- lists ----------------------------------------------------------------------------------


def test_lists_put_get_delete_as_table_and_json(gateway: GatewayProcess) -> None:
    out = ok(
        gateway,
        "lists",
        "put",
        "deny-countries",
        "cu",
        "--reason",
        "Cuba embargo",
        "--source",
        "OFAC",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    )
    assert "deny-countries CU written; policy version" in out
    table = ok(gateway, "lists", "get", "deny-countries")
    header, *rows = table.splitlines()[1:]
    assert header.split()[:2] == ["KEY", "REASON"]
    assert any(row.startswith("CU") and "Cuba embargo" in row and "OFAC" in row for row in rows)
    data = json.loads(ok(gateway, "lists", "get", "deny-countries", "--json"))
    assert data["entries"]["CU"]["expires_at"] == "2099-01-01T00:00:00Z"
    assert data["entries"]["CU"]["added_by"] == "admin"
    deleted = json.loads(ok(gateway, "lists", "delete", "deny-countries", "CU", "--json"))
    assert deleted["version"] == data["version"] + 1
    assert "CU" not in admin_get(gateway, "/admin/v1/lists/deny-countries")["entries"]


def test_cidr_key_travels_as_one_path_segment(gateway: GatewayProcess) -> None:
    ok(gateway, "lists", "put", "ip-ranges", "198.51.100.0/24", "--reason", "test net", "--country", "de")
    listing = ok(gateway, "lists", "get", "ip-ranges")
    assert "198.51.100.0/24" in listing and "DE" in listing
    ok(gateway, "lists", "delete", "ip-ranges", "198.51.100.0/24")
    # Other tests share this gateway and may hold ranges of their own: only this one must be gone.
    assert "198.51.100.0/24" not in admin_get(gateway, "/admin/v1/lists/ip-ranges")["entries"]


def test_lists_replace_from_a_yaml_file(gateway: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "partners.yaml"
    path.write_text("acme: {reason: partner A}\nglobex:\n  reason: partner B\n  source: contract 12\n")
    out = ok(gateway, "lists", "replace", "partners", str(path))
    assert "replaced with 2 entries" in out
    assert set(admin_get(gateway, "/admin/v1/lists/partners")["entries"]) == {"acme", "globex"}
    # The output of `lists get --json` reads back as it is.
    exported = ok(gateway, "lists", "get", "partners", "--json")
    ok(gateway, "lists", "replace", "partners", "-", stdin=exported)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert "allow_empty" in fails(gateway, "lists", "replace", "partners", str(empty))
    assert len(admin_get(gateway, "/admin/v1/lists/partners")["entries"]) == 2
    path.write_text("acme: {reason: partner A}\n")
    ok(gateway, "lists", "replace", "partners", str(path))


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (("lists", "put", "deny-countries", "XX", "--reason", "r"), 1, "key: 'XX'"),
        (("lists", "put", "ip-ranges", "10.0.0.0/8", "--reason", "r"), 1, "country: is required"),
        (("lists", "put", "deny-countries", "CU", "--reason", "r", "--expires-at", "soon"), 1, "expires_at"),
        (("lists", "delete", "deny-entities", "nobody-at-all"), 1, "404 not_found"),
        (("lists", "replace", "partners", "/nonexistent/file.yaml"), 1, "cannot read /nonexistent/file.yaml"),
        (("lists", "get", "allow-list"), 2, "invalid choice: 'allow-list'"),
        (("lists", "put", "deny-countries", "CU"), 2, "--reason"),
        (("models", "put", "m", "--stage", "beta"), 2, "--stage"),
        (("models", "put", "m", "--stage", "general", "--timeline", "[{"), 1, "--timeline: not valid JSON"),
        (("models", "put", "m", "--stage", "general", "--allowed-countries", "US,XX"), 1, "allowed_countries[1]"),
        (("models", "get", "no-such-model"), 1, "404 not_found"),
        (("keys", "create", "--subject", "s", "--org", "o", "--country", "US"), 2, "--tier"),
        (("keys", "create", "--subject", "s", "--org", "o", "--country", "US", "--tier", "gold"), 1, "tier:"),
        (("keys", "revoke", "key_missing"), 1, "404 not_found"),
        (("decide", "--subject", "s", "--tier", "public", "--ip", "nowhere"), 1, "ip: must be"),
        (("audit", "tail", "--limit", "0"), 2, "--limit"),
        (("screening", "import", "/nonexistent.csv"), 1, "cannot read /nonexistent.csv"),
    ],
)
def test_failures_exit_non_zero_naming_the_problem(
    gateway: GatewayProcess, args: tuple[str, ...], status: int, expected: str
) -> None:
    version = admin_get(gateway, "/admin/v1/policy")["version"]
    assert expected in fails(gateway, *args, status=status)
    assert admin_get(gateway, "/admin/v1/policy")["version"] == version


def test_connection_and_token_problems_are_explained(gateway: GatewayProcess) -> None:
    unreachable = {"GATEWAY_ADMIN_URL": f"http://127.0.0.1:{free_port()}"}
    message = fails(gateway, "lists", "get", "partners", env=unreachable)
    assert "cannot reach the admin API" in message and "connection refused" in message
    assert "401 unauthenticated" in fails(gateway, "changes", env={"GATEWAY_ADMIN_TOKEN": "wrong"})
    assert "401 unauthenticated" in fails(gateway, "changes", env={"GATEWAY_ADMIN_TOKEN": hs_token()})
    assert "GATEWAY_ADMIN_TOKEN is not set" in fails(None, "changes", env={"GATEWAY_ADMIN_URL": gateway.admin_url})


# --- models, keys, decide -------------------------------------------------------------------


def test_models_put_list_get_delete(gateway: GatewayProcess) -> None:
    timeline = '[{"at": "2099-06-01T00:00:00Z", "stage": "general"}]'
    ok(
        gateway,
        "models",
        "put",
        "vendor/model-z",
        "--stage",
        "partners",
        "--timeline",
        timeline,
        "--allowed-countries",
        "us,de",
        "--export-suspended",
    )
    model = json.loads(ok(gateway, "models", "get", "vendor/model-z", "--json"))["model"]
    assert model == {
        "stage": "partners",
        "timeline": [{"at": "2099-06-01T00:00:00Z", "stage": "general"}],
        "allowed_countries": ["DE", "US"],
        "export_suspended": True,
    }
    listing = ok(gateway, "models", "list")
    row = next(line for line in listing.splitlines() if line.startswith("vendor/model-z"))
    assert "partners" in row and "DE,US" in row and "yes" in row
    ok(gateway, "models", "put", "vendor/model-z", "--stage", "general", "--no-export-suspended")
    assert admin_get(gateway, "/admin/v1/models")["models"]["vendor/model-z"]["export_suspended"] is False
    ok(gateway, "models", "delete", "vendor/model-z")
    assert "vendor/model-z" not in admin_get(gateway, "/admin/v1/models")["models"]


def test_keys_create_use_list_revoke(gateway: GatewayProcess) -> None:
    created = json.loads(
        ok(
            gateway,
            "keys",
            "create",
            "--subject",
            "svc-cli",
            "--org",
            "acme",
            "--country",
            "US",
            "--tier",
            "partner",
            "--org-name",
            "Acme Corp",
            "--json",
        )
    )
    key_id, key = created["id"], created["key"]
    assert public_status(gateway, key) == 200
    listing = ok(gateway, "keys", "list")
    assert key_id in listing and "svc-cli" in listing and key not in listing
    human = ok(
        gateway, "keys", "create", "--subject", "svc-cli-2", "--org", "acme", "--country", "US", "--tier", "public"
    )
    assert "key: gk_" in human and "shown only this once" in human
    ok(gateway, "keys", "revoke", key_id)
    wait_until_blocking(lambda: public_status(gateway, key) == 401, 1.0)


def test_decide_prints_the_decision(gateway: GatewayProcess) -> None:
    out = ok(
        gateway,
        "decide",
        "--subject",
        "u1",
        "--org",
        "acme",
        "--country",
        "IR",
        "--tier",
        "partner",
        "--ip",
        "127.0.0.1",
        "--model",
        "gpt-mock",
    )
    first, message, version = out.splitlines()[:3]
    assert first == "block 451 country_denied" and "IR" in message and version.startswith("policy version")
    data = json.loads(
        ok(
            gateway,
            "decide",
            "--subject",
            "u1",
            "--org",
            "acme",
            "--country",
            "US",
            "--tier",
            "partner",
            "--ip",
            "127.0.0.1",
            "--model",
            "gpt-mock",
            "--json",
        )
    )
    assert (data["decision"], data["status"], data["code"]) == ("allow", 200, "")


# --- screening, audit, changes --------------------------------------------------------------


def test_screening_import_and_search(gateway: GatewayProcess) -> None:
    out = ok(gateway, "screening", "import", str(CSL_CSV))
    assert "screening list replaced with 25 entries" in out
    table = ok(gateway, "screening", "search", "Quilfeather Trading")
    header, best = table.splitlines()[:2]
    assert header.split()[:2] == ["SCORE", "ACTION"]
    assert "block" in best and "Quillfeather Trading LLC" in best and "fict-0003" in best
    found = json.loads(ok(gateway, "screening", "search", "Acme Corp", "--min-score", "0.9", "--json"))
    assert found["matches"] == []
    assert "no match" in ok(gateway, "screening", "search", "Acme Corp", "--min-score", "0.9")


def _audited(gateway: GatewayProcess, *subjects: str) -> None:
    """One blocked request per subject, each in the audit trail (as the admin API reads it) before the next."""
    for subject in subjects:
        public_status(gateway, hs_token(subject, country="IR"))
        wait_until_blocking(lambda s=subject: s in ok(gateway, "audit", "tail", "--limit", "1"), 5)


def _lines(stream: Any) -> queue.Queue[str]:
    """The lines a child prints, as they come, read by a thread of their own so a test can wait on them."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_audit_tail_prints_the_latest_oldest_first(gateway: GatewayProcess) -> None:
    tag = f"tail-{time.monotonic_ns()}"
    subjects = [f"{tag}-{n}" for n in range(4)]
    _audited(gateway, *subjects)
    records = [json.loads(line) for line in ok(gateway, "audit", "tail", "--limit", "3", "--json").splitlines()]
    assert [r["subject"] for r in records] == subjects[1:]  # the last three, oldest first, as a tail reads
    assert records[-1]["time"] >= records[0]["time"]
    table = ok(gateway, "audit", "tail", "--limit", "2").splitlines()
    assert table[0].split()[:2] == ["TIME", "DECISION"] and len(table) == 3
    assert subjects[2] in table[1] and subjects[3] in table[2]


def test_audit_follow_prints_limit_old_records_then_new_ones_and_stops_on_sigterm(gateway: GatewayProcess) -> None:
    tag = f"follow-{time.monotonic_ns()}"
    _audited(gateway, *(f"{tag}-old-{n}" for n in range(3)))
    # SIGINT ignored, as a shell starts a background job: SIGTERM must still stop the follower cleanly.
    follower = subprocess.Popen(
        [*COMMAND, "audit", "tail", "--follow", "--json", "--limit", "1", "--interval", "0.1"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GATEWAY_ADMIN_URL": gateway.admin_url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        lines = _lines(follower.stdout)
        assert json.loads(lines.get(timeout=20))["subject"] == f"{tag}-old-2"  # --limit 1: the latest only
        public_status(gateway, hs_token(f"{tag}-new", country="IR"))
        assert json.loads(lines.get(timeout=10))["subject"] == f"{tag}-new"
        time.sleep(0.5)  # a few more polls: nothing old may come back
        assert lines.empty(), lines.get()
    finally:
        follower.send_signal(signal.SIGTERM)
        _out, err = follower.communicate(timeout=10)
    assert follower.returncode == 0, err
    assert err == ""


def test_changes_table(gateway: GatewayProcess) -> None:
    ok(gateway, "lists", "put", "deny-entities", "changes-probe", "--reason", "probe")
    ok(gateway, "lists", "delete", "deny-entities", "changes-probe")
    table = ok(gateway, "changes", "--limit", "2")
    header, newest, older = table.splitlines()
    assert header.split() == ["TIME", "ACTOR", "VERSION", "EFFECT", "TARGET", "CHANGE"]
    assert "lists/deny-entities/changes-probe" in newest and "removed" in newest and "admin" in newest
    assert "added" in older
    # Removing a deny entry can turn a block into an allow; adding one cannot.
    assert newest.split()[3] == "loosen" and older.split()[3] == "tighten"
    data = json.loads(ok(gateway, "changes", "--limit", "1", "--json"))
    assert data["changes"][0]["actor"] == "admin"


# --- policy export and import ---------------------------------------------------------------


def test_policy_export_then_import_into_an_empty_redis_reproduces_it(
    gateway: GatewayProcess, upstream: Upstream, fresh_redis: RedisServer, tmp_path: Path
) -> None:
    # Something of every kind, so the round trip has to carry it all.
    ok(
        gateway,
        "lists",
        "put",
        "ip-ranges",
        "192.0.2.0/24",
        "--reason",
        "doc net",
        "--country",
        "UA-43",
        "--expires-at",
        "2098-01-01T12:00:00+02:00",
    )
    ok(gateway, "lists", "put", "deny-countries", "NO", "--reason", "a key YAML would read as false")
    ok(
        gateway,
        "models",
        "put",
        "exported-model",
        "--stage",
        "partners",
        "--timeline",
        '[{"at": "2098-01-01T00:00:00Z", "stage": "general"}]',
        "--allowed-countries",
        "US",
    )
    ok(
        gateway,
        "keys",
        "create",
        "--subject",
        "svc-export",
        "--org",
        "acme",
        "--country",
        "US",
        "--tier",
        "partner",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    )
    ok(gateway, "screening", "import", str(CSL_CSV))
    path = tmp_path / "policy.yaml"
    ok(gateway, "policy", "export", str(path))
    text = path.read_text()
    assert text.startswith("# Export-control policy, version")
    document = yaml.safe_load(text)
    assert "NO" in document["lists"]["deny-countries"]  # quoted on export, so it reads back as text
    assert yaml.safe_load(ok(gateway, "policy", "export", "-")) == document
    source = admin_get(gateway, "/admin/v1/policy")

    restored_gateway = GatewayProcess(gateway_config(upstream.url), redis_url=fresh_redis.url)
    restored_gateway.start(wait_ready=False)
    try:
        assert "409 policy_missing" in fails(restored_gateway, "lists", "put", "deny-countries", "CU", "--reason", "r")
        assert "policy imported" in ok(restored_gateway, "policy", "import", str(path))
        restored = admin_get(restored_gateway, "/admin/v1/policy")
        assert restored["version"] == 1  # a new generation
        assert {k: v for k, v in restored.items() if k != "version"} == {
            k: v for k, v in source.items() if k != "version"
        }
        assert public_status(restored_gateway, hs_token("after-restore")) == 200
    finally:
        restored_gateway.stop()
    ok(gateway, "lists", "delete", "deny-countries", "NO")


def test_policy_import_of_the_example_policy(
    gateway: GatewayProcess, upstream: Upstream, fresh_redis: RedisServer, tmp_path: Path
) -> None:
    restored_gateway = GatewayProcess(gateway_config(upstream.url), redis_url=fresh_redis.url)
    restored_gateway.start(wait_ready=False)
    try:
        out = ok(restored_gateway, "policy", "import", str(example_policy_file(tmp_path)), "--json")
        assert json.loads(out)["version"] == 1
        policy = admin_get(restored_gateway, "/admin/v1/policy")
        assert {"@E:2", "IR", "KP", "UA-43"} <= set(policy["lists"]["deny-countries"])
        assert policy["lists"]["deny-countries"]["@E:2"]["added_by"] == "admin"
    finally:
        restored_gateway.stop()


# --- check-config, dev-token ----------------------------------------------------------------

SECRET_VARS = {
    "GATEWAY_ADMIN_TOKEN": "an-admin-token",
    "CHECK_HS256_SECRET": "x" * 40,
    "CHECK_UPSTREAM_KEY": "an-upstream-key",
}


def _config_file(tmp_path: Path, config: Any) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def _plain_env(**extra: str) -> dict[str, str]:
    """The test's environment without any GATEWAY_ variable (overrides, secrets) unless given."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **extra}


@pytest.mark.parametrize(
    ("missing", "key"),
    [
        ("GATEWAY_ADMIN_TOKEN", "admin.token_env"),
        ("CHECK_HS256_SECRET", "auth.hs256_secret_env"),
        ("CHECK_UPSTREAM_KEY", "upstream.api_key_env"),
    ],
)
def test_check_config_fails_where_serve_fails(tmp_path: Path, missing: str, key: str) -> None:
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token_env": "GATEWAY_ADMIN_TOKEN"},
        "upstream": {"url": "http://127.0.0.1:1", "api_key_env": "CHECK_UPSTREAM_KEY"},
        "auth": {"algorithms": ["HS256"], "hs256_secret_env": "CHECK_HS256_SECRET"},
        "audit": {"spool_dir": str(tmp_path / "spool")},
    }
    path = _config_file(tmp_path, config)
    assert "ok" in ok_plain("check-config", "--config", str(path), env=_plain_env(**SECRET_VARS))
    env = _plain_env(**{k: v for k, v in SECRET_VARS.items() if k != missing})
    checked = cli(None, "check-config", "--config", str(path), env=env)
    served = cli(None, "serve", "--config", str(path), env=env)
    assert (checked.returncode, served.returncode) == (2, 2), (checked.stderr, served.stderr)
    assert checked.stderr == served.stderr
    assert f"{key}: environment variable {missing} (or {missing}_FILE) is not set" in checked.stderr
    assert "Traceback" not in checked.stderr


def ok_plain(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [*COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("upstream: null\n", "upstream: is empty (null)"),
        ("upstream:\n", "upstream: is empty (null)"),
        ("upstream: http://127.0.0.1:8000\n", "upstream: must be a mapping, not str"),
        ("upstream: {routes: {}}\n", "upstream.url: required key is missing"),
        ("listen: {port: 8080}\n", "upstream: required key is missing"),
    ],
)
def test_upstream_problems_say_what_to_write(tmp_path: Path, text: str, key: str) -> None:
    path = _config_file(tmp_path, text)
    result = cli(None, "check-config", "--config", str(path), env=_plain_env())
    assert result.returncode == 2
    assert key in result.stderr
    assert "upstream: {url: http://127.0.0.1:8000}" in result.stderr  # what to put there
    # An environment override fills the same gap, as the message says.
    assert "ok" in ok_plain(
        "check-config",
        "--config",
        str(path),
        env=_plain_env(
            GATEWAY_UPSTREAM__URL="http://127.0.0.1:8000",
            GATEWAY_ADMIN_TOKEN="t",
            GATEWAY_AUTH__ALGORITHMS="[HS256]",
            GATEWAY_AUTH__HS256_SECRET_ENV="CHECK_HS256_SECRET",
            CHECK_HS256_SECRET="x" * 40,
        ),
    )


def test_dev_token_help_describes_every_option_with_its_default() -> None:
    result = cli(None, "dev-token", "--help", env={"COLUMNS": "1000"})  # no line breaks inside a value
    assert result.returncode == 0
    options = [
        "--secret-env",
        "--subject",
        "--org",
        "--org-name",
        "--country",
        "--tier",
        "--issuer",
        "--audience",
        "--ttl",
    ]
    text = " ".join(result.stdout.split())
    for option in options:
        described = text.split(option, 1)[1].split(" --", 1)[0]
        assert len(described.split()) >= 4, f"{option} has no description: {described!r}"
    for default in (
        "GATEWAY_DEV_HS256_SECRET",
        "dev-user",
        "dev-org",
        "US",
        "partner",
        "https://idp.example",
        "model-gateway",
        "3600",
    ):  # and --org-name: not sent
        assert f"default: {default}" in text, default


def test_mock_upstream_serves_the_example_policy_models() -> None:
    from gateway.mock_upstream import MODELS

    policy = yaml.safe_load((ROOT / "config" / "policy.example.yaml").read_text())
    assert sorted(MODELS) == sorted(policy["models"])


@pytest.mark.parametrize(("section", "workers"), [("listen", "1"), ("admin", "1"), ("listen", "2")])
def test_serve_names_a_port_another_process_holds(tmp_path: Path, section: str, workers: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"listen": free_port(), "admin": free_port(), section: taken}
        config = {
            "listen": {"host": "127.0.0.1", "port": ports["listen"]},
            "admin": {"host": "127.0.0.1", "port": ports["admin"]},
            "upstream": {"url": "http://127.0.0.1:1"},
            "redis": {"url": f"redis://127.0.0.1:{free_port()}"},  # nobody there: start does not wait on it
            "auth": {"algorithms": ["HS256"], "hs256_secret_env": "CHECK_HS256_SECRET"},
            "audit": {"spool_dir": str(tmp_path / "spool")},
        }
        path = _config_file(tmp_path, config)
        result = cli(None, "serve", "--config", str(path), "--workers", workers, env=_plain_env(**SECRET_VARS))
    assert result.returncode == 2, result.stderr
    assert f"{section}.port: cannot listen on 127.0.0.1:{taken}" in result.stderr
    assert f"GATEWAY_{section.upper()}__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_shadow_entries_and_model_shadows_are_written_shown_decided_and_promoted(gateway: GatewayProcess) -> None:
    out = ok(gateway, "lists", "put", "deny-countries", "DE", "--reason", "proposed", "--shadow")
    assert "DE written as a shadow entry (not enforced)" in out
    title, header, *rows = ok(gateway, "lists", "get", "deny-countries").splitlines()
    assert "1 shadow, not enforced" in title and header.split()[-1] == "ENFORCED"
    assert next(row for row in rows if row.startswith("DE")).endswith("no (shadow)")
    assert next(row for row in rows if row.startswith("IR")).endswith("yes")
    decided = ok(gateway, "decide", "--subject", "u1", "--country", "DE", "--tier", "partner", "--ip", "127.0.0.1",
                 "--model", "gpt-mock")  # fmt: skip
    assert decided.splitlines()[0] == "allow 200"
    assert "shadow (not enforced): block 451 country_denied" in decided
    ok(gateway, "lists", "promote", "deny-countries", "DE")
    assert "enforce" not in admin_get(gateway, "/admin/v1/lists/deny-countries")["entries"]["DE"]
    ok(gateway, "lists", "delete", "deny-countries", "DE")

    ok(gateway, "models", "suspend", "gpt-mock", "--shadow")
    rows = ok(gateway, "models", "get", "gpt-mock").splitlines()
    assert any(row.startswith("gpt-mock (shadow, not enforced)") and "yes" in row for row in rows)
    model = admin_get(gateway, "/admin/v1/models/gpt-mock")["model"]
    assert model["export_suspended"] is False and model["shadow"]["export_suspended"] is True
    ok(gateway, "models", "promote", "gpt-mock")
    model = admin_get(gateway, "/admin/v1/models/gpt-mock")["model"]
    assert model["export_suspended"] is True and "shadow" not in model
    ok(gateway, "models", "lift", "gpt-mock")


def test_licence_groups_schedule_and_explain_through_the_cli(gateway: GatewayProcess) -> None:
    ok(gateway, "lists", "put", "country-groups", "A:5", "--countries", "GB,FR", "--reason", "allies", "--source", "t")
    ok(gateway, "models", "put", "ctl", "--stage", "general", "--allowed-countries", "US,@A:5")
    ask = ("decide", "--subject", "r", "--org", "lab-in", "--tier", "partner", "--country", "IN", "--ip", "127.0.0.1")
    assert "export_restricted" in ok(gateway, *ask, "--model", "ctl")
    ok(
        gateway,
        *("lists", "put", "licences", "D1", "--org", "lab-in", "--models", "ctl", "--countries", "IN"),
        *("--expires-at", "2099-01-01T00:00:00Z", "--reason", "BIS licence"),
    )
    decided = ok(gateway, *ask, "--model", "ctl")
    assert decided.startswith("allow") and "licence: D1" in decided
    ok(gateway, "models", "patch", "ctl", "--timeline", '[{"at": "2099-01-01T00:00:00Z", "export_suspended": true}]')
    shown = ok(gateway, "models", "get", "ctl")
    assert "2099-01-01T00:00:00Z->suspended" in shown
    assert "now: stage general, export not suspended, allowed countries FR,GB,US" in shown
    assert "next change: 2099-01-01T00:00:00Z->suspended" in shown
    blocked = ok(gateway, *ask[:-4], "--country", "IR", "--ip", "127.0.0.1", "--model", "ctl", "--all")
    assert "rules that block: 2" in blocked and "country_denied" in blocked and "export_restricted" in blocked
    # The module's gateway is shared: leave its policy as it was.
    ok(gateway, "lists", "delete", "licences", "D1")
    ok(gateway, "models", "delete", "ctl")
    ok(gateway, "lists", "delete", "country-groups", "A:5")
