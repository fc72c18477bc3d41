"""Configuration: defaults, validation errors that name the key, environment overrides, examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.settings import ConfigError, Settings, load_settings, parse_settings, read_secret

ROOT = Path(__file__).resolve().parent.parent


def test_only_upstream_url_is_required() -> None:
    settings = parse_settings({"upstream": {"url": "http://up:8000/"}}, environ={})
    assert settings.upstream.url == "http://up:8000"
    assert settings.listen.port == 8080 and settings.admin.port == 9901
    assert settings.redis.url is None and settings.redis.timeout_s == 0.1
    assert settings.tiers["partner"].stages == ["partners", "general"]
    assert settings.tiers["internal"].tokens_per_minute is None
    with pytest.raises(ConfigError, match=r"upstream: required key is missing"):
        parse_settings({}, environ={})


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"listen": {"prot": 1}}, "listen.prot: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"auth": {"algorithms": ["none"]}}, "auth.algorithms"),
        ({"network": {"trusted_proxies": ["10.0.0.0/33"]}}, "network.trusted_proxies"),
        ({"network": {"home_countries": ["usa"]}}, "network.home_countries"),
        ({"policy": {"unknown_model": "maybe"}}, "policy.unknown_model"),
        ({"policy": {"model_path_pattern": "/v1/(.*)"}}, "policy.model_path_pattern"),
        ({"redis": {"url": "http://x"}}, "redis.url"),
        ({"auth": {"default_tier": "gold"}}, "auth.default_tier"),
        ({"screening": {"block_threshold": 0.8, "review_threshold": 0.9}}, "screening"),
        ({"admin": {"approval": {"required_for": ["loosen", "widen"]}}}, "admin.approval.required_for.1"),
        ({"admin": {"approval": {"required_for": "loosen"}}}, "admin.approval.required_for"),
        ({"admin": {"approval": {"ttl_s": 0}}}, "admin.approval.ttl_s"),
        ({"admin": {"impact": {"max_callers": 0}}}, "admin.impact.max_callers"),
        ({"admin": {"impact": {"hour": 1}}}, "admin.impact.hour: unknown key"),
    ],
)
def test_bad_values_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"upstream": {"url": "http://up"}, **config}, environ={})
    assert key in str(info.value)


def test_approval_is_off_unless_configured() -> None:
    settings = parse_settings({"upstream": {"url": "http://up"}}, environ={})
    assert settings.admin.approval.required_for == [] and settings.admin.approval.ttl_s == 86400
    assert (settings.admin.impact.hours, settings.admin.impact.timeout_s) == (24, 10)
    environ = {"GATEWAY_ADMIN__APPROVAL__REQUIRED_FOR": "[loosen, loosen]", "GATEWAY_ADMIN__APPROVAL__TTL_S": "60"}
    on = parse_settings({"upstream": {"url": "http://up"}}, environ=environ)
    assert on.admin.approval.required_for == ["loosen"] and on.admin.approval.ttl_s == 60


def test_environment_overrides_any_key() -> None:
    environ = {
        "GATEWAY_UPSTREAM__URL": "http://from-env:9000",
        "GATEWAY_LISTEN__PORT": "9999",
        "GATEWAY_TIERS__PUBLIC__BURST": "3",
        "GATEWAY_NETWORK__TRUSTED_PROXIES": "[10.0.0.0/8]",
        "GATEWAY_ADMIN_TOKEN": "not-an-override",
    }
    settings = parse_settings({"upstream": {"url": "http://file"}}, environ=environ)
    assert settings.upstream.url == "http://from-env:9000"
    assert settings.listen.port == 9999
    assert settings.tiers["public"].burst == 3
    assert settings.network.trusted_proxies == ["10.0.0.0/8"]
    with pytest.raises(ConfigError, match=r"listen\.port"):
        parse_settings({"upstream": {"url": "http://file"}}, environ={"GATEWAY_LISTEN__PORT": "x"})


def test_unreadable_or_invalid_files_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string")
    with pytest.raises(ConfigError, match="top level"):
        load_settings(scalar, environ={})


def test_secrets_come_from_env_or_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    assert read_secret("S", {"S": "direct"}) == "direct"
    assert read_secret("S", {"S_FILE": str(secret_file)}) == "from-file"
    assert read_secret("S", {}) is None
    assert read_secret(None, {"S": "x"}) is None


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.add(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _keys(annotation, path + ".")
    return keys


def _present(document: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(document, dict):
        for name, value in document.items():
            path = f"{prefix}{name}"
            keys.add(path)
            keys |= _present(value, path + ".")
    return keys


def test_example_config_documents_every_key_and_validates() -> None:
    text = (ROOT / "config" / "gateway.example.yaml").read_text()
    document = yaml.safe_load(text)
    parse_settings(document, environ={})
    missing = {k for k in _keys(Settings) if not k.startswith("tiers.")} - _present(document)
    assert not missing, f"keys not documented in gateway.example.yaml: {sorted(missing)}"
    parse_settings(yaml.safe_load((ROOT / "config" / "dev.yaml").read_text()), environ={})


def test_serve_refuses_unreadable_key_and_token_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    cases = {
        "admin.tokens_file": {"admin": {"tokens_file": str(tmp_path / "missing-tokens")}},
        "auth.public_key_files": {"auth": {"algorithms": ["RS256"], "public_key_files": [str(tmp_path / "k.pem")]}},
        "network.geoip_db": {"network": {"geoip_db": str(tmp_path / "missing.mmdb")}},
    }
    for key, section in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:1"}, **section}))
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (key, result.stderr)
        assert key in result.stderr, (key, result.stderr)
        assert "Traceback" not in result.stderr


def test_modelless_paths_and_blocked_per_minute() -> None:
    settings = parse_settings({"upstream": {"url": "http://127.0.0.1:8000"}}, environ={})
    assert settings.policy.modelless_paths == ["/v1/models"]
    # Unset, a tier's refusal limit is its request rate.
    assert {name: tier.blocked_limit for name, tier in settings.tiers.items()} == {
        name: tier.requests_per_minute for name, tier in settings.tiers.items()
    }
    tiers = {"public": {"requests_per_minute": 60, "blocked_per_minute": 5}}
    custom = parse_settings(
        {
            "upstream": {"url": "http://127.0.0.1:8000"},
            "tiers": tiers,
            "policy": {"modelless_paths": ["/v1/models", "/health"]},
        },
        environ={},
    )
    assert custom.tiers["public"].blocked_limit == 5 and custom.policy.modelless_paths == ["/v1/models", "/health"]
    for bad in (["v1/models"], ["/v1/models/"], ["/v1/models?x=1"], [" /v1/models"]):
        with pytest.raises(ConfigError, match="modelless_paths"):
            parse_settings(
                {"upstream": {"url": "http://127.0.0.1:8000"}, "policy": {"modelless_paths": bad}}, environ={}
            )
    with pytest.raises(ConfigError, match="blocked_per_minute"):
        parse_settings(
            {"upstream": {"url": "http://127.0.0.1:8000"}, "tiers": {"public": {"blocked_per_minute": 0}}}, environ={}
        )
