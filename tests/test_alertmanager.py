"""The example Alertmanager configuration (``alerts/alertmanager.yaml``): valid for amtool,
routes every shipped alert where its severity and owner say, and its inhibitions keep one
incident to one notification in a real Alertmanager."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port, stop, wait_started
from tests.support.rules import overlay_groups, rules_of
from tests.support.tools import ROOT, require_tool

pytestmark = pytest.mark.live

CONFIG = ROOT / "alerts" / "alertmanager.yaml"
RECEIVERS = {
    ("critical", "relay"): "relay-pager",
    ("critical", "upstream"): "relay-pager",
    ("warning", "relay"): "relay-tickets",
    ("warning", "upstream"): "upstream-tickets",
    ("info", "relay"): "relay-chat",
    ("info", "upstream"): "relay-chat",
}


def routed_to(labels: dict[str, str]) -> str:
    result = subprocess.run(
        [require_tool("amtool"), "config", "routes", "test", f"--config.file={CONFIG}",
         *(f"{key}={value}" for key, value in labels.items())],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_amtool_check_config() -> None:
    result = subprocess.run(
        [require_tool("amtool"), "check-config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "4 inhibit rules" in result.stdout


@pytest.mark.parametrize("overlay", ["production", "dev"])
def test_every_shipped_alert_is_routed_by_severity_and_owner(overlay: str) -> None:
    """Production's critical alerts page; the dev overlay's never do."""
    seen = set()
    for rule in rules_of(overlay_groups(overlay)):
        if "alert" in rule:
            key = (rule["labels"]["severity"], rule["labels"]["owner"])
            if key not in seen:
                seen.add(key)
                labels = {"alertname": rule["alert"], **rule["labels"]}
                assert routed_to(labels) == RECEIVERS[key], rule["alert"]
    pages = {receiver for key, receiver in RECEIVERS.items() if key in seen} & {"relay-pager"}
    assert pages == ({"relay-pager"} if overlay == "production" else set())


@contextmanager
def alertmanager() -> Iterator[str]:
    binary = require_tool("prometheus-alertmanager")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = open(Path(tmp, "alertmanager.log"), "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [binary, f"--config.file={CONFIG}", f"--storage.path={tmp}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_started(process, f"{url}/-/ready", Path(tmp, "alertmanager.log"))
            yield url
        finally:
            stop(process)
            log.close()


def post_alerts(url: str, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": labels} for labels in alerts]).encode()
    request = urllib.request.Request(
        f"{url}/api/v2/alerts", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def alert_states(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=10) as response:
        alerts: list[dict[str, Any]] = json.loads(response.read())
    return alerts


def test_inhibitions_keep_one_incident_to_one_notification() -> None:
    prod = {"cluster": "eu1", "namespace": "relay", "owner": "relay"}
    dev = {"cluster": "eu1", "namespace": "relay-dev", "owner": "relay"}
    alerts = {
        # api burns fast and slow: the page stands, the ticket is the same incident
        "fast api": {"alertname": "RelayErrorBudgetFastBurn", "severity": "critical",
                     "upstream": "api", **prod},
        "slow api": {"alertname": "RelayErrorBudgetSlowBurn", "severity": "warning",
                     "upstream": "api", **prod},
        # another upstream's slow burn is its own ticket
        "slow search": {"alertname": "RelayErrorBudgetSlowBurn", "severity": "warning",
                        "upstream": "search", **prod},
        # the latency fast burn does not silence the availability slow burn
        "latency fast search": {"alertname": "RelayLatencyBudgetFastBurn",
                                "severity": "critical", "upstream": "search", **prod},
        # dev is down: its targets and its upstreams' alerts are symptoms
        "down dev": {"alertname": "RelayDown", "severity": "info", "job": "relay", **dev},
        "target dev": {"alertname": "RelayTargetDown", "severity": "warning", "job": "relay",
                       "instance": "10.1.3.4:9090", "pod": "relay-5c4b2-q8w7e", **dev},
        "pool dev": {"alertname": "RelayPoolTimeouts", "severity": "warning",
                     "upstream": "api", **dev},
        "absent elsewhere": {"alertname": "RelayAbsent", "severity": "info", "job": "relay",
                            "namespace": "relay-dev", "cluster": "us1", "owner": "relay"},
        # production's own target down is not dev's business
        "target prod": {"alertname": "RelayTargetDown", "severity": "warning", "job": "relay",
                        "instance": "10.1.2.7:9090", "pod": "relay-7d9f8-x2k4q", **prod},
    }  # fmt: skip
    inhibited = {"slow api", "target dev", "pool dev"}
    with alertmanager() as url:
        post_alerts(url, list(alerts.values()))
        deadline = time.monotonic() + 30
        while True:
            states = {
                name: next((a["status"] for a in alert_states(url) if a["labels"] == labels), None)
                for name, labels in alerts.items()
            }
            if (
                all(states.values())
                and {n for n, s in states.items() if s and s["inhibitedBy"]} >= inhibited
            ):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
    assert {name for name, status in states.items() if status and status["inhibitedBy"]} == (
        inhibited
    )
    for name, status in states.items():
        assert status is not None
        assert status["state"] == ("suppressed" if name in inhibited else "active"), name
