"""Kubernetes manifests: render, schema, policy, and agreement with the real service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.k8s import TARGETS, kubectl, one, rendered, rendered_text
from tests.support.net import closed_port, free_port, wait_http
from tests.support.tools import ROOT, python_tool

OVERLAYS = [target for target in TARGETS if target.startswith("overlays/")]
# Each checkov skip is declared on the Deployment with its reason; production pins its image
# by digest and pulls IfNotPresent, so only the CPU limit is skipped there.
ALLOWED_SKIPS = {
    "overlays/production": {"CKV_K8S_11"},
    "overlays/dev": {"CKV_K8S_11", "CKV_K8S_43"},
    "overlays/local": {"CKV_K8S_11", "CKV_K8S_43", "CKV_K8S_15"},
    "overlays/upstream-tls": {"CKV_K8S_11"},
}
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def settings(target: str) -> dict[str, str]:
    """An overlay's settings (its local-config ConfigMap, never deployed)."""
    overlay = ROOT / "k8s" / target
    while not (overlay / "settings.yaml").exists():  # an overlay built on another one
        bases = yaml.safe_load((overlay / "kustomization.yaml").read_text())["resources"]
        overlay = (overlay / next(b for b in bases if b.startswith("../"))).resolve()
    data: dict[str, str] = yaml.safe_load((overlay / "settings.yaml").read_text())["data"]
    return data


@pytest.mark.live
@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(target: str) -> None:
    kinds = {d["kind"] for d in rendered(target)}
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    }
    # The rules are generated per namespace: only an overlay has them.
    assert expected | ({"PrometheusRule", "Namespace"} if target != "base" else set()) <= kinds
    if target != "base":
        assert {d["metadata"]["namespace"] for d in rendered(target) if d["kind"] != "Namespace"}
        # The settings ConfigMap configures the overlay and is never deployed.
        assert not any(d["metadata"]["name"] == "relay-settings" for d in rendered(target))


def test_every_overlay_the_readme_names_is_rendered_by_these_tests() -> None:
    named = set(re.findall(r"k8s/(overlays/[a-z0-9-]+)", (ROOT / "README.md").read_text()))
    assert named, "the README names no overlay"
    assert named <= set(OVERLAYS), named - set(OVERLAYS)
    on_disk = {
        f"overlays/{p.parent.name}"
        for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml")
    }
    assert on_disk == set(OVERLAYS)


@pytest.mark.live
@pytest.mark.parametrize("target", TARGETS)
def test_schema_strict(target: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered_text(target))
    result = subprocess.run(
        [python_tool("kubernetes-validate"), "--strict", "-k", "1.32.0", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


@pytest.mark.live
@pytest.mark.parametrize("target", OVERLAYS)
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


@pytest.mark.live
@pytest.mark.parametrize("target", OVERLAYS)
def test_checkov_finds_nothing(target: str, tmp_path: Path) -> None:
    (tmp_path / "rendered.yaml").write_text(rendered_text(target))
    result = subprocess.run(
        [
            python_tool("checkov"),
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
    assert {c["check_id"] for c in skipped} <= ALLOWED_SKIPS[target]
    for check in skipped:
        assert check["suppress_comment"].strip(), check["check_id"]


@pytest.mark.live
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
    config = yaml.safe_load(
        one(rendered("overlays/production"), "ConfigMap", "relay-config")["data"]["config.yaml"]
    )
    drain = config["server"]["drain_delay_seconds"] + config["server"]["grace_period_seconds"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.live
def test_production_pins_its_image_by_digest() -> None:
    (container,) = one(rendered("overlays/production"), "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    assert re.fullmatch(
        r"ghcr\.io/relay-proxy/relay:[\w.]+@sha256:[0-9a-f]{64}", container["image"]
    )
    assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.live
@pytest.mark.parametrize("target", OVERLAYS)
def test_resources_probes_and_spread(target: str) -> None:
    pod = one(rendered(target), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    # A memory limit, no CPU limit: CFS quota throttling would stall a latency-sensitive proxy.
    assert set(resources["limits"]) == {"memory"}
    readiness = container["readinessProbe"]
    assert 5 <= readiness["periodSeconds"] <= 10 and readiness["failureThreshold"] >= 2
    keys = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "relay"}


@pytest.mark.live
@pytest.mark.parametrize("target", TARGETS)
def test_no_replicas_where_an_hpa_owns_the_deployment(target: str) -> None:
    documents = rendered(target)
    owned = {
        (h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
        for h in documents
        if h["kind"] == "HorizontalPodAutoscaler"
    }
    assert ("Deployment", "relay") in owned
    for document in documents:
        if (document["kind"], document["metadata"]["name"]) in owned:
            assert "replicas" not in document["spec"], f"{target}: replicas fights the HPA"


@pytest.mark.live
@pytest.mark.parametrize("target", OVERLAYS)
def test_a_stock_kube_prometheus_stack_selects_the_monitoring_objects(target: str) -> None:
    """kube-prometheus-stack's Prometheus selects ServiceMonitors and PrometheusRules by
    `release: <helm release>`: the overlay's prometheusRelease setting, set on both."""
    release = settings(target)["prometheusRelease"]
    for kind in OPERATOR_KINDS:
        document = one(rendered(target), kind)
        assert document["metadata"]["labels"]["release"] == release, kind


@pytest.mark.live
@pytest.mark.parametrize("target", OVERLAYS)
def test_network_policy_names_a_source_for_every_rule(target: str) -> None:
    policy = one(rendered(target), "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules), "a rule without `from` admits everyone"
    by_port = {port["port"]: rule["from"] for rule in rules for port in rule["ports"]}
    # The proxy port: pods of every namespace, nothing from outside the cluster.
    assert by_port["http"] == [{"namespaceSelector": {}}]
    # The metrics port: only the namespace of the Prometheus that scrapes it.
    scrape = settings(target)["scrapeNamespace"]
    assert by_port["metrics"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": scrape}}}
    ]


@pytest.mark.live
def test_overlay_settings_are_one_place_each(tmp_path: Path) -> None:
    """Changing a setting in an overlay's settings.yaml changes every place it is used."""
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    path = copy / "overlays" / "dev" / "settings.yaml"
    document = yaml.safe_load(path.read_text())
    document["data"].update(
        prometheusRelease="kps-east", scrapeNamespace="observability", pagingAlertSeverity="chat"
    )
    path.write_text(yaml.safe_dump(document))
    output = subprocess.run(
        [kubectl(), "kustomize", str(copy / "overlays" / "dev")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    documents = [d for d in yaml.safe_load_all(output) if d]
    for kind in OPERATOR_KINDS:
        assert one(documents, kind)["metadata"]["labels"]["release"] == "kps-east"
    metrics_rule = one(documents, "NetworkPolicy")["spec"]["ingress"][1]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "observability"
    }
    rules = [r for g in one(documents, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    severities = {r["labels"]["severity"] for r in rules if "alert" in r}
    assert severities == {"chat", "warning"}
    assert "monitoring" not in json.dumps(metrics_rule)


@pytest.mark.live
@pytest.mark.parametrize("target", OVERLAYS)
def test_rules_are_scoped_to_the_namespace_they_are_installed_in(target: str) -> None:
    rule = one(rendered(target), "PrometheusRule")
    namespace = rule["metadata"]["namespace"]
    assert one(rendered(target), "Deployment")["metadata"]["namespace"] == namespace
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {m for expr in exprs for m in re.findall(r'namespace="([^"]*)"', expr)} == {namespace}


@pytest.mark.live
def test_upstream_tls_overlay_mounts_the_secret_its_config_reads() -> None:
    from service.config import Settings

    documents = rendered("overlays/upstream-tls")
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o440  # the pod's fsGroup reads it, nobody writes
    config = yaml.safe_load(one(documents, "ConfigMap", "relay-config")["data"]["config.yaml"])
    tls = Settings(**config).upstreams["billing"].tls
    files = [tls.ca_file, tls.cert_file, tls.key_file]
    assert all(f is not None for f in files)
    assert {str(f.parent) for f in files if f is not None} == {mount["mountPath"]}
    assert {f.name for f in files if f is not None} == {"ca.pem", "client.pem", "client.key"}


def dashboard_uids(documents: list[dict[str, Any]]) -> list[str]:
    return [
        json.loads(text)["uid"]
        for d in documents
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")
        for text in d["data"].values()
    ]


@pytest.mark.live
def test_no_dashboard_uid_is_shipped_by_two_overlays() -> None:
    """Dashboards ship once per Grafana (``kubectl apply -k dashboards -n monitoring``), with
    cluster and namespace variables, not as copies per deployment."""
    seen: dict[str, str] = {}
    for target in OVERLAYS:
        for uid in dashboard_uids(rendered(target)):
            assert uid not in seen, f"{uid} shipped by {seen[uid]} and {target}"
            seen[uid] = target
    assert not seen, "the overlays ship no dashboards: they are applied once, from dashboards/"


@pytest.mark.live
def test_optional_hpa_on_requests_in_flight(tmp_path: Path) -> None:
    """The component adds a Pods metric to the CPU one; the result is a valid HPA."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(ROOT / "k8s/overlays/production", overlay)],
                "components": [
                    os.path.relpath(ROOT / "k8s/components/hpa-requests-in-flight", overlay)
                ],
            }
        )
    )
    output = subprocess.run(
        [kubectl(), "kustomize", str(overlay)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    hpa = one([d for d in yaml.safe_load_all(output) if d], "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "relay_requests_in_flight"
    path = tmp_path / "hpa.yaml"
    path.write_text(yaml.safe_dump(hpa))
    result = subprocess.run(
        [python_tool("kubernetes-validate"), "--strict", "-k", "1.32.0", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "ERROR" not in result.stdout, result.stdout + result.stderr


def dockerfile_command() -> list[str]:
    entry = cmd = None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            entry = json.loads(line.removeprefix("ENTRYPOINT "))
        if line.startswith("CMD "):
            cmd = json.loads(line.removeprefix("CMD "))
    assert entry is not None and cmd is not None
    return [*entry, *cmd]


@pytest.mark.live
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


def dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile() -> None:
    lines = dockerfile_lines()
    args = dict(
        line.removeprefix("ARG ").split("=", 1) for line in lines if line.startswith("ARG ")
    )
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(bases) >= 2, "multi-stage"
    bases = [args[base[2:-1]] if base.startswith("${") else base for base in bases]
    assert "slim" in bases[-1]
    # The base image is pinned: a release tag and the digest that is built.
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
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
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!constraints.txt" in ignored


def test_the_image_installs_the_locked_versions() -> None:
    """Every Python package the image installs is pinned by constraints.txt."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    install = next(line for line in dockerfile_lines() if "pip install" in line)
    assert "--constraint constraints.txt ." in install
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    assert all(re.fullmatch(r"[\w.]+", v) for v in pins.values()), "exact versions only"
    # The closure of the runtime dependencies (no extras of ours), walked from pyproject.toml.
    pending = [Requirement(r) for r in project_dependencies()]
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonical(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
        for raw in requires(name) or []:
            dependency = Requirement(raw)
            extras = ("", *requirement.extras)
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                dependency.marker = None
                pending.append(dependency)
    assert seen == set(pins), f"pinned but not needed: {set(pins) - seen}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_dependencies() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies: list[str] = project["dependencies"]
    return dependencies
