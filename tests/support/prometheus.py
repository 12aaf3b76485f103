"""A real Prometheus server for tests: started on 127.0.0.1 with temp storage, then stopped."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.support.net import free_port, stop, wait_started
from tests.support.tools import require_tool


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            payload = json.loads(response.read())
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll an instant query until it returns at least one sample."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr!r} returned nothing within {timeout}s")


@contextmanager
def prometheus(
    targets: Sequence[str],
    *,
    job: str = "relay",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
) -> Iterator[Prometheus]:
    binary = require_tool("prometheus")
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        config_path = Path(tmp, "prometheus.yml")
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
                *extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp, "prometheus.log"), "wb"),  # noqa: SIM115
        )
        server = Prometheus(f"http://127.0.0.1:{port}")
        try:
            wait_started(process, f"{server.url}/-/ready", Path(tmp, "prometheus.log"))
            yield server
        finally:
            stop(process)
