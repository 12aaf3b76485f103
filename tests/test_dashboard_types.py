"""The dashboards type-check against Grafana's own schema (``@grafana/schema``): each one,
as a TypeScript literal typed ``Dashboard``, goes through ``tsc --noEmit`` in strict mode.

The npm packages are pinned in ``.ci/tools``, which the README's test command (``.ci/test``)
installs into the checkout's ``node_modules``; the test never downloads them. They are
looked up there, or under ``$RELAY_GRAFANA_SCHEMA_DIR`` when that is set. The test fails,
naming the command that installs them, when node or the packages are missing.

What a JSON literal cannot satisfy is handled explicitly, never ignored (TypeScript stops
reporting a literal's unknown properties once one of its members fails, so an ignored error
would hide real ones):

- STRING_ENUMS: fields the schema types as TypeScript string enums; a JSON string is never
  assignable to an enum member though it is the value Grafana stores, so the value is written
  as the member (``"absolute"`` as ``ThresholdsMode.Absolute``). A test shows these are the
  only false positives of the plain JSON.
- An annotation's ``target`` is typed as the generic ``DataQuery``: the Prometheus query
  model (``expr``) is not part of @grafana/schema, so targets are declared apart and checked
  as DataQuery values (``refId`` and the common fields), not as literals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.dashboards import DASHBOARDS, load
from tests.support.tiers import require_live
from tests.support.tools import ROOT

PACKAGES = {"typescript": "7.0.2", "@grafana/schema": "13.2.3"}

# (parent field, field): (enum, {JSON value: member}).
STRING_ENUMS = {
    ("thresholds", "mode"): (
        "ThresholdsMode",
        {"absolute": "Absolute", "percentage": "Percentage"},
    ),
}


def packages_dir() -> Path:
    return Path(os.environ.get("RELAY_GRAFANA_SCHEMA_DIR") or ROOT)


def install_command(directory: Path) -> str:
    specs = " ".join(f"{name}@{version}" for name, version in PACKAGES.items())
    return f"npm install --prefix {directory} --no-save --no-audit --no-fund {specs}"


@pytest.fixture(scope="module")
def tsc() -> list[str]:
    require_live("tsc")
    directory = packages_dir()
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node not found on PATH (the dashboard type check runs tsc): install Node.js 20 "
            f"with npm (apt-get install nodejs npm), then: {install_command(directory)}"
        )
    for name, version in PACKAGES.items():
        manifest = directory / "node_modules" / name / "package.json"
        found = json.loads(manifest.read_text())["version"] if manifest.exists() else None
        if found != version:
            pytest.fail(
                f"{name}@{version} not found in {directory / 'node_modules'} (found: {found}): "
                f"{install_command(directory)}"
            )
    return [node, str(directory / "node_modules" / "typescript" / "bin" / "tsc")]


@dataclass(frozen=True)
class TsError:
    file: str
    line: int
    code: str
    message: str


def typescript(board: dict[str, Any], *, enums: bool = True) -> str:
    """The dashboard as a TypeScript module exporting it typed as ``Dashboard``."""
    targets: list[str] = []

    def emit(value: Any, path: tuple[Any, ...], indent: str) -> str:
        inner = indent + "  "
        if isinstance(value, dict):
            if path[:2] == ("annotations", "list") and path[3:] == ("target",):
                targets.append(emit(value, (), "  "))
                return f"annotationTargets[{len(targets) - 1}]"
            items = [
                f"{inner}{json.dumps(k)}: {emit(v, (*path, k), inner)}" for k, v in value.items()
            ]
            return "{\n" + ",\n".join(items) + f"\n{indent}}}" if items else "{}"
        if isinstance(value, list):
            items = [f"{inner}{emit(v, (*path, i), inner)}" for i, v in enumerate(value)]
            return "[\n" + ",\n".join(items) + f"\n{indent}]" if items else "[]"
        if enums and path[-2:] in STRING_ENUMS:
            enum, members = STRING_ENUMS[path[-2:]]
            return f"{enum}.{members[value]}"
        return json.dumps(value)

    body = emit(board, (), "")
    imports = sorted({enum for enum, _ in STRING_ENUMS.values()}) if enums else []
    return (
        f"import {{ {', '.join(['type Dashboard', *imports])} }} from '@grafana/schema';\n\n"
        f"const annotationTargets = [\n  {(',' + chr(10) + '  ').join(targets)}\n];\n\n"
        f"export const dashboard: Dashboard = {body};\n"
    )


def typecheck(
    tsc: list[str], directory: Path, boards: dict[str, dict[str, Any]], *, enums: bool = True
) -> list[TsError]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "node_modules").symlink_to(packages_dir() / "node_modules")
    files = []
    for name, board in boards.items():
        source = directory / f"{name.replace('-', '_')}.ts"
        source.write_text(typescript(board, enums=enums))
        files.append(source.name)
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "skipLibCheck": True,
        },
        "files": files,
    }
    (directory / "tsconfig.json").write_text(json.dumps(config))
    result = subprocess.run(
        [*tsc, "-p", str(directory)], capture_output=True, text=True, timeout=120
    )
    errors = []
    for line in result.stdout.splitlines():
        match = re.match(r"^(.+?)\((\d+),\d+\): error (TS\d+): (.*)$", line)
        if match:
            errors.append(TsError(match[1], int(match[2]), match[3], match[4].strip()))
        else:
            assert line.startswith(" ") or not line.strip(), f"unexpected tsc output: {line}"
    assert (result.returncode == 0) == (not errors), result.stdout + result.stderr
    return errors


@pytest.mark.live
def test_the_dashboards_type_check_against_grafana_schema(tsc: list[str], tmp_path: Path) -> None:
    errors = typecheck(tsc, tmp_path / "tsc", {path.stem: load(path) for path in DASHBOARDS})
    assert not errors, "\n".join(f"{e.file}:{e.line}: {e.code} {e.message}" for e in errors)


@pytest.mark.live
def test_string_enums_are_the_only_false_positives(tsc: list[str], tmp_path: Path) -> None:
    """As plain JSON values, the listed enum fields fail the check, and nothing else does."""
    boards = {path.stem: load(path) for path in DASHBOARDS}
    errors = typecheck(tsc, tmp_path / "tsc", boards, enums=False)
    expected = {
        f"Type '\"{value}\"' is not assignable to type '{enum}'."
        for enum, members in STRING_ENUMS.values()
        for value in members
    }
    assert errors and {e.code for e in errors} == {"TS2322"}
    assert {e.message for e in errors} <= expected, {e.message for e in errors} - expected


@pytest.mark.live
def test_the_type_check_catches_a_broken_dashboard(tsc: list[str], tmp_path: Path) -> None:
    """A misspelled field, a string where a number belongs and a number where a string
    belongs each fail the check: it is not a test that cannot fail."""

    def broken(defect: Any) -> dict[str, Any]:
        board = load(DASHBOARDS[0])
        defect(board)
        return board

    boards = {
        "misspelled": broken(lambda b: b.update(refersh="30s")),
        "string_width": broken(lambda b: b["panels"][0]["gridPos"].update(w="12")),
        "number_name": broken(lambda b: b["templating"]["list"][1].update(name=7)),
    }
    errors = typecheck(tsc, tmp_path / "tsc", boards)
    by_file = {
        name: [e.message for e in errors if Path(e.file).name == f"{name}.ts"] for name in boards
    }
    assert any("'\"refersh\"' does not exist in type" in m for m in by_file["misspelled"])
    assert "Type 'string' is not assignable to type 'number'." in by_file["string_width"]
    assert "Type 'number' is not assignable to type 'string'." in by_file["number_name"]


def test_the_test_command_installs_the_pinned_packages() -> None:
    listed = {
        line.split()[1]
        for line in (ROOT / ".ci" / "tools").read_text().splitlines()
        if line.startswith("npm ")
    }
    assert listed == {f"{name}@{version}" for name, version in PACKAGES.items()}
