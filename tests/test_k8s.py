"""Kubernetes manifests: render, schema, policy, and agreement with the real service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import closed_port, free_port, wait_http
from tests.k8s_render import ROOT, TARGETS, one, rendered, rendered_text

OVERLAYS = ["overlays/dev", "overlays/production"]


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    assert Path(path).exists(), f"{name} not found: pip install -e '.[test]' installs it"
    return path


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(target: str) -> None:
    kinds = {d["kind"] for d in rendered(target)}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds


@pytest.mark.parametrize("target", TARGETS)
def test_schema_strict(target: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered_text(target))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.32.0", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


@pytest.mark.parametrize("target", TARGETS)
def test_operator_resources_match_their_schemas(target: str) -> None:
    from cloudcoil.models.prometheus_operator import v1

    for kind, model in (
        ("ServiceMonitor", v1.ServiceMonitor),
        ("PrometheusRule", v1.PrometheusRule),
    ):
        document = one(rendered(target), kind)
        parsed = model.model_validate(document)
        # The models ignore unknown fields: a lossy round trip means a misspelled one.
        dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        assert dumped["spec"] == document["spec"], kind


@pytest.mark.parametrize("target", OVERLAYS)
def test_checkov_finds_nothing(target: str, tmp_path: Path) -> None:
    (tmp_path / "rendered.yaml").write_text(rendered_text(target))
    result = subprocess.run(
        [
            tool("checkov"),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "--compact",
            "-o",
            "json",
            "-d",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r["results"].get("failed_checks", [])]
    skipped = [c for r in reports for c in r["results"].get("skipped_checks", [])]
    assert not failed, [(c["check_id"], c["resource"]) for c in failed]
    assert sum(r["summary"]["passed"] for r in reports) > 50, "checkov checked nothing"
    # Every skip is declared on the resource with its reason.
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_43"}
    for check in skipped:
        assert check["suppress_comment"].strip(), check["check_id"]


def test_restricted_pod_security_and_rollout() -> None:
    deployment = one(rendered("overlays/production"), "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert ":" not in container["image"].rsplit("/", 1)[-1] or not container["image"].endswith(
        ":latest"
    )
    assert container["image"].endswith(":0.1.0")
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    config = yaml.safe_load(
        one(rendered("overlays/production"), "ConfigMap", "relay-config")["data"]["config.yaml"]
    )
    drain = config["server"]["drain_delay_seconds"] + config["server"]["grace_period_seconds"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_network_policy_limits_metrics_to_monitoring() -> None:
    policy = one(rendered("base"), "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    metrics = [r for r in rules if any(p["port"] == "metrics" for p in r["ports"])]
    assert metrics and all(
        r["from"]
        == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        for r in metrics
    )


def dockerfile_command() -> list[str]:
    entry = cmd = None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            entry = json.loads(line.removeprefix("ENTRYPOINT "))
        if line.startswith("CMD "):
            cmd = json.loads(line.removeprefix("CMD "))
    assert entry is not None and cmd is not None
    return [*entry, *cmd]


@pytest.mark.parametrize("target", OVERLAYS)
def test_manifests_start_the_service_they_describe(target: str, tmp_path: Path) -> None:
    """Start the service as the Deployment would, then probe it as the kubelet would."""
    docs = rendered(target)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container.get("args", [])
    command = container.get("command") or dockerfile_command()[: -len(args) or None]
    assert command == ["python", "-m", "service"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(config_path.parent)])
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_path.name])
    assert config["server"]["port"] == ports["http"]
    assert config["server"]["admin_port"] == ports["metrics"]
    assert "/tmp" in mounts  # the multiprocess metrics directory's emptyDir
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == config["server"]["admin_port"]

    # The same start, on free loopback ports, with upstreams pointing at a local server.
    local = free_port()
    config["server"].update(
        host="127.0.0.1", admin_host="127.0.0.1", port=free_port(), admin_port=free_port()
    )
    config["demo"] = {"enabled": True, "host": "127.0.0.1", "port": local}
    for upstream in config["upstreams"].values():
        upstream["url"] = f"http://127.0.0.1:{local}"
    (tmp_path / config_path.name).write_text(yaml.safe_dump(config))
    env: dict[str, str] = {**os.environ}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    if "PROMETHEUS_MULTIPROC_DIR" in env:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    argv = [sys.executable, *command[1:], *args]
    argv[argv.index(str(config_path))] = str(tmp_path / config_path.name)
    admin = f"http://127.0.0.1:{config['server']['admin_port']}"
    with open(tmp_path / "relay.log", "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        probes = ("startupProbe", "livenessProbe", "readinessProbe")
        for probe in probes:
            wait_http(f"{admin}{container[probe]['httpGet']['path']}")
        proxied = httpx.get(f"http://127.0.0.1:{config['server']['port']}/")
        assert proxied.status_code == 200 and "demo upstream" in proxied.text
        assert "relay_requests_total" in httpx.get(f"{admin}/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0, (tmp_path / "relay.log").read_text()


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert sum(line.startswith("FROM ") for line in lines) >= 2, "multi-stage"
    assert "slim" in [line for line in lines if line.startswith("FROM ")][-1]
    user = [line for line in lines if line.startswith("USER ")][-1].split()[1]
    assert int(user.split(":")[0]) >= 10000
    assert not any(line.startswith("HEALTHCHECK") for line in lines)
    exposed = {p for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert {"8080", "9090"} <= exposed
    assert dockerfile_command() == ["python", "-m", "service", "--config", "/etc/relay/config.yaml"]
    copied = [line for line in lines if line.startswith("COPY ") and "--from" not in line]
    for line in copied:
        for source in line.split()[1:-1]:
            assert (ROOT / source).exists(), source
