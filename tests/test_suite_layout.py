"""The suite's own rules: the fast tier starts nothing but the test process, and test modules
share code only through ``tests/support/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.relays import demo_config, spawn_relay
from tests.support.tiers import require_live
from tests.support.tools import ROOT, require_tool

TESTS = ROOT / "tests"


def test_an_unmarked_test_cannot_start_a_relay_process(tmp_path: Path) -> None:
    with (
        pytest.raises(AssertionError, match=r"mark it @pytest\.mark\.live"),
        spawn_relay(demo_config(), tmp_path),
    ):
        pass
    assert not (tmp_path / "relay.log").exists()  # refused before anything started


def test_an_unmarked_test_cannot_run_a_tool() -> None:
    with pytest.raises(AssertionError, match=r"starts promtool: mark it @pytest\.mark\.live"):
        require_tool("promtool")


@pytest.mark.live
def test_a_live_test_may() -> None:
    require_live("anything")


def test_the_live_marker_is_registered() -> None:
    assert '"live: ' in (ROOT / "pyproject.toml").read_text()


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_test_modules_import_only_from_support() -> None:
    modules = [*sorted(TESTS.glob("test_*.py")), TESTS / "conftest.py"]
    assert len(modules) > 30
    wrong = {
        path.name: sorted(
            name
            for name in imported_modules(path)
            if name.startswith("tests") and not name.startswith("tests.support")
        )
        for path in modules
    }
    assert {name: found for name, found in wrong.items() if found} == {}
    helpers = sorted(p.name for p in TESTS.glob("*.py") if p not in modules)
    assert helpers == [], "shared helpers belong in tests/support/"
