"""The archiver's deployment: its own Kubernetes Deployment (one replica, a PersistentVolumeClaim)
and compose service, on the gateways' config with archiving on."""

from __future__ import annotations

from typing import Any

from .test_deploy import DEPLOY, compose, configmap_settings, mounts, one, settings_of

ARCHIVE_DIR = "/var/lib/gateway/archive"


def _command_dir(command: list[str]) -> str:
    assert command[:3] == ["gateway", "audit", "archive"]
    assert command[command.index("--config") + 1] == "/etc/gateway/config.yaml"
    return command[command.index("--dir") + 1]


def test_kubernetes_runs_one_archiver_on_a_persistent_volume() -> None:
    deployment = one("Deployment", "export-gateway-archiver")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", "never two writers"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    directory = _command_dir(container["command"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted: dict[str, Any] = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    claim = mounted[directory]["persistentVolumeClaim"]["claimName"]
    pvc = one("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mounted["/etc/gateway"]["configMap"]["name"] == "export-gateway-config"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"] for e in container["env"]}
    assert configmap_settings().redis.password_env in env
    # The archiver's selector never matches the gateway pods (or the Service would send it traffic).
    gateway_labels = one("Deployment", "export-gateway")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] != gateway_labels


def test_the_gateways_keep_unarchived_records_where_an_archiver_runs() -> None:
    assert configmap_settings().audit.archive is True
    service = compose()["services"]["archiver"]
    assert _command_dir(service["entrypoint"]) == ARCHIVE_DIR
    assert any(volume.endswith(":" + ARCHIVE_DIR) for volume in service["volumes"])
    config = mounts(service)["/etc/gateway/config.yaml"]
    assert settings_of((DEPLOY / config).read_text()).audit.archive is True
    assert settings_of((DEPLOY / config).read_text()).redis.url is not None
