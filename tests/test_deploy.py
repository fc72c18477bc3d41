"""Deployment files under deploy/: parsed and checked for what matters, without Docker or Kubernetes.

No container engine or cluster runs these tests. Instead: every YAML file parses;
the Dockerfile runs as a non-root user, exposes both listeners, checks /readyz and
starts ``gateway serve`` on the config path that compose and Kubernetes mount;
every gateway config shipped validates as the gateway would validate it; the
Kubernetes manifests validate offline against the API schemas (kubernetes-validate,
strict), except the Prometheus Operator's CRDs, which are checked structurally; and
the wiring between them (ports, probes, secrets, selectors, alert rules) holds.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG_PATH = "/etc/gateway/config.yaml"
ENTRYPOINT = ["gateway", "serve", "--config", CONFIG_PATH]
CRD_GROUPS = ("monitoring.coreos.com/",)  # schemas kubernetes-validate does not bundle
# The oldest Kubernetes these manifests promise to run on, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_resources() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in documents(path) if path.name != "kustomization.yaml"]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in k8s_resources() if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def settings_of(text: str, environ: dict[str, str] | None = None) -> Settings:
    return parse_settings(yaml.safe_load(text), environ=environ or {})


# --- every file ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert documents(path), f"{path} holds no document"


def test_grafana_dashboards_are_json() -> None:
    for path in (DEPLOY / "grafana").glob("*.json"):
        assert json.loads(path.read_text(encoding="utf-8"))


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
        ),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_image_is_slim_python_and_installs_the_package() -> None:
    steps = dockerfile()
    assert [args for word, args in steps if word == "FROM"][-1] == "python:3.11-slim"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert re.search(r"pip install [^&]*\.(\s|$)", runs), "the package itself is installed (pip install .)"
    for word, args in steps:
        if word == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & {"gateway", "pyproject.toml", "README.md", "deploy", "deploy/gateway.yaml"}


def test_image_runs_as_non_root_with_healthcheck_on_readyz() -> None:
    stage = final_stage()
    users = [args for word, args in stage if word == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert f"--uid {user}" in " ".join(args for word, args in stage if word == "RUN"), "the user exists"
    healthcheck = " ".join(args for word, args in stage if word == "HEALTHCHECK")
    assert "127.0.0.1:9901/readyz" in healthcheck and "CMD" in healthcheck
    exposed = {port for word, args in stage if word == "EXPOSE" for port in args.split()}
    assert {"8080", "9901"} <= exposed
    entrypoints = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    assert entrypoints == [ENTRYPOINT]


def test_image_default_config_validates() -> None:
    text = (DEPLOY / "gateway.yaml").read_text()
    with pytest.raises(Exception, match=r"upstream\.url"):  # the one key without a default
        settings_of(text)
    settings = settings_of(text, {"GATEWAY_UPSTREAM__URL": "http://model:8000"})
    assert (settings.listen.port, settings.admin.port) == (8080, 9901)
    assert settings.admin.host == "0.0.0.0"  # the HEALTHCHECK and probes reach it
    volumes = " ".join(args for word, args in final_stage() if word == "VOLUME")
    assert str(settings.audit.spool_dir) in volumes


# --- compose -----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return documents(DEPLOY / "compose.yaml")[0]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = source
    return out


def test_compose_stack_has_two_gateways_redis_upstream_and_monitoring() -> None:
    services = compose()["services"]
    gateways = [
        name
        for name, s in services.items()
        # The gateways run the image's own entrypoint (serve); the mock upstream and the archiver their own.
        if s.get("image") == "export-gateway:local" and not s.get("entrypoint")
    ]
    assert len(gateways) == 2
    assert {"redis", "upstream", "prometheus", "grafana"} <= services.keys()
    assert services["upstream"]["entrypoint"][:2] == ["gateway", "mock-upstream"]
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert (DEPLOY / source).exists(), f"{name}: {source} (for {target}) does not exist"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert mounts(services["prometheus"])["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    assert "./grafana" in mounts(services["grafana"]).values()


def test_compose_gateways_config_and_secrets() -> None:
    services = compose()["services"]
    for name in ("gateway-1", "gateway-2"):
        service = services[name]
        config_file = mounts(service)[CONFIG_PATH]
        settings = settings_of((DEPLOY / config_file).read_text())
        environment = service["environment"]
        for env_name in (settings.admin.token_env, settings.auth.hs256_secret_env):
            assert env_name in environment, f"{name}: {env_name} not set"
        host = settings.upstream.url.split("//")[1].split(":")[0]
        assert host in services
        assert settings.redis.url is not None and settings.redis.url.split("//")[1].split(":")[0] in services
        assert service["read_only"] is True and str(settings.audit.spool_dir) in " ".join(service["volumes"])
    scrape = documents(DEPLOY / "compose" / "prometheus.yml")[0]
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway-1:9901", "gateway-2:9901"}
    assert scrape["rule_files"] == ["alerts.yml"]


# --- Kubernetes --------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


# Prometheus Operator resources (CRDs) have no bundled schema; they are checked structurally below.
@pytest.mark.parametrize(
    "resource",
    [r for r in k8s_resources() if not r["apiVersion"].startswith(CRD_GROUPS)],
    ids=lambda r: f"{r['kind']}/{r['metadata']['name']}",
)
def test_manifest_validates_against_the_kubernetes_schema(resource: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(resource, version, strict=True)
    assert resource["metadata"].get("namespace", "export-gateway") == "export-gateway"


def pod_spec() -> dict[str, Any]:
    return one("Deployment", "export-gateway")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return only


def configmap_settings() -> Settings:
    return settings_of(one("ConfigMap", "export-gateway-config")["data"]["config.yaml"])


def port_number(name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name_or_number]
    return int(port)


def test_configmap_holds_a_valid_gateway_config() -> None:
    settings = configmap_settings()
    assert settings.redis.url is not None, "production names its Redis"
    assert settings.admin.host == "0.0.0.0" and settings.listen.host == "0.0.0.0"
    assert settings.redis.password_env and settings.admin.token_env


def test_deployment_probes_use_the_admin_port() -> None:
    settings, spec = configmap_settings(), container()
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_number(spec[probe]["httpGet"]["port"]) == settings.admin.port
    assert port_number("http") == settings.listen.port


def test_deployment_runs_non_root_read_only_with_resources() -> None:
    pod, spec = pod_spec(), container()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= spec["resources"][kind].keys()
    assert pod["automountServiceAccountToken"] is False
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > configmap_settings().limits.shutdown_grace_s, "in-flight requests and the audit flush fit"


def test_deployment_mounts_config_and_writable_spool() -> None:
    pod, spec = pod_spec(), container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in spec["volumeMounts"]}
    config_dir, config_name = CONFIG_PATH.rsplit("/", 1)
    config_volume = mounted[config_dir]["configMap"]
    assert config_volume["name"] == "export-gateway-config"
    assert {"key": "config.yaml", "path": config_name} in config_volume["items"]
    assert "emptyDir" in mounted[str(configmap_settings().audit.spool_dir)]
    assert "emptyDir" in mounted["/tmp"]
    assert "command" not in spec and "args" not in spec, "the image's ENTRYPOINT reads the mounted config"


def test_every_secret_the_config_names_comes_from_the_secret() -> None:
    settings = configmap_settings()
    secret = one("Secret", "export-gateway-secrets")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container()["env"] if "valueFrom" in e}
    named = [
        settings.admin.token_env,
        settings.auth.hs256_secret_env,
        settings.upstream.api_key_env,
        settings.redis.password_env,
    ]
    for env_name in filter(None, named):
        ref = env[env_name]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"], f"{env_name}: key {ref['key']} not in the Secret"
    assert not any(re.search(r"REPLACE-ME", json.dumps(e)) for e in container()["env"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_hpa_pdb_and_network_policy_select_the_pods() -> None:
    deployment = one("Deployment", "export-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    ports = {p["name"] for p in container()["ports"]}
    for name in ("export-gateway", "export-gateway-admin"):
        service = one("Service", name)
        assert selects(service["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert [p["targetPort"] for p in one("Service", "export-gateway")["spec"]["ports"]] == ["http"]
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "export-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    policy = one("NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"http", "admin"}


def test_service_monitor_scrapes_the_admin_port() -> None:
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    admin = one("Service", "export-gateway-admin")
    assert selects(monitor["spec"]["selector"]["matchLabels"], admin["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in admin["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The alert rules select job="export-gateway": the job label must come out that way.
    assert admin["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "export-gateway"


def test_prometheus_rule_embeds_the_alerts_file() -> None:
    rule = one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = documents(DEPLOY / "prometheus" / "alerts.yml")[0]
    assert rule["spec"]["groups"] == alerts["groups"], "regenerate deploy/k8s/prometheusrule.yaml"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert item["alert"] and item["expr"] and item["labels"]["severity"] in ("warning", "critical")


# --- data planes in front of the decision service (deploy/nginx, deploy/caddy, deploy/envoy, deploy/istio) ---


def test_nginx_configuration_passes_nginx_t(tmp_path: Path) -> None:
    from .support.dataplanes import nginx_test, write_nginx

    write_nginx(tmp_path, upstream_port=18000, authz_port=19902, port=18080)
    result = nginx_test(tmp_path)
    assert result.returncode == 0, result.stderr


def test_caddyfile_passes_caddy_validate(tmp_path: Path) -> None:
    import subprocess

    from .support.dataplanes import CADDYFILE, binary, caddy_env

    result = subprocess.run(
        [binary("caddy"), "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
        env=caddy_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr


def _ext_authz(config: dict[str, Any]) -> dict[str, Any]:
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = chain["http_filters"]
    assert filters[-1]["name"] == "envoy.filters.http.router"  # the router last, after the decision
    found = [f["typed_config"] for f in filters if f["name"] == "envoy.filters.http.ext_authz"]
    assert len(found) == 1
    return dict(found[0])


def test_envoy_configuration_asks_the_authz_listener_and_fails_closed() -> None:
    """Structure only: no Envoy binary or schema validator is available to the tests."""
    from gateway.authz import ENVOY_PREFIX

    config = documents(DEPLOY / "envoy" / "envoy.yaml")[0]
    authz = _ext_authz(config)
    assert authz["failure_mode_allow"] is False
    assert authz["with_request_body"]["allow_partial_message"] is False
    service = authz["http_service"]
    assert service["path_prefix"] == ENVOY_PREFIX
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert service["server_uri"]["cluster"] in clusters
    sent = {p["exact"] for p in service["authorization_request"]["allowed_headers"]["patterns"]}
    assert {"authorization", "content-type", "x-forwarded-for"} <= sent
    upstream = {p["exact"] for p in service["authorization_response"]["allowed_upstream_headers"]["patterns"]}
    assert upstream == {"x-gateway-subject", "x-gateway-org", "x-gateway-tier", "x-request-id"}


def test_istio_example_points_a_custom_policy_at_the_extension_provider() -> None:
    from gateway.authz import ENVOY_PREFIX

    mesh = yaml.safe_load(documents(DEPLOY / "istio" / "mesh-config.yaml")[0]["data"]["mesh"])
    provider = mesh["extensionProviders"][0]
    assert provider["envoyExtAuthzHttp"]["pathPrefix"] == ENVOY_PREFIX
    assert provider["envoyExtAuthzHttp"]["failOpen"] is False
    policy = documents(DEPLOY / "istio" / "authorization-policy.yaml")[0]
    assert policy["kind"] == "AuthorizationPolicy" and policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == provider["name"]
