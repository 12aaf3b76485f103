"""The soak benchmark, short: the same command as a long run, and its verdict must be green.

``bench/soak.py`` runs Relay as its own process against healthy, slow, faulty and refusing
upstreams with mixed traffic (bodies, streams, client hang-ups, faults), then checks that
memory stayed flat, fds and pools came back, healthy routes were always right, and SIGTERM
exits 0. Here it runs for 15 s instead of minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tiers import require_live
from tests.support.tools import ROOT

pytestmark = pytest.mark.live


def test_short_soak_is_flat(tmp_path: Path) -> None:
    require_live("the soak")
    report = tmp_path / "soak.json"
    soak = ROOT / "bench" / "soak.py"
    done = subprocess.run(
        [sys.executable, str(soak), "--duration", "15", "--json", str(report)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert report.exists(), done.stdout + done.stderr
    result = json.loads(report.read_text())
    failed = [check for check in result["checks"] if not check["ok"]]
    assert failed == [], done.stdout
    assert result["ok"] and done.returncode == 0, done.stdout + done.stderr
    assert "verdict: FLAT" in done.stdout
    # The run did exercise every path: each kind of request, and the faults answered as such
    # (502 refused or reset, 504 read timeout, responses cut mid-body).
    assert set(result["sent"]) == {
        "get", "post", "slow", "stream", "faulty", "refused", "hangup_body", "hangup_stream",
    }  # fmt: skip
    assert {"200", "502", "504", "cut"} <= set(result["statuses"])
    assert len(result["samples"]) >= 10
    codes = result["quiescent"]["codes"]
    assert codes.get("499", 0) > 0  # the hang-ups were seen as such by the proxy
    # Sampling saw the pools at work, then the quiescent state.
    assert max(sample["in_use"] for sample in result["samples"]) > 0
    assert result["quiescent"]["idle"] == 0
