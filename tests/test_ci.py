"""The README's test command, ``.ci/test``: where it cannot install what the suite needs (not
root), it names exactly what to install and stops before running anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tools import ROOT, apt_packages

pytestmark = pytest.mark.live

NOBODY = 65534


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of ``.ci`` in a directory another user can read (pytest's own are private)."""
    directory = Path(tempfile.mkdtemp(prefix="relay-ci-"))
    try:
        shutil.copytree(ROOT / ".ci", directory / ".ci")
        shutil.copy(ROOT / "pyproject.toml", directory)
        for path in [directory, *directory.rglob("*")]:
            path.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


def path_without(hidden: set[str], into: Path) -> str:
    """A PATH holding every command of this one but ``hidden`` (symlinks in ``into``)."""
    into.mkdir(mode=0o755)
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = into / entry.name
            if entry.name not in hidden and not target.exists():
                target.symlink_to(entry.path)
    return str(into)


def run_as_non_root(
    command: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run as another user"
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_not_root_names_what_to_install_and_runs_nothing(checkout: Path) -> None:
    tools = checkout / ".ci" / "tools"
    tools.write_text(tools.read_text() + "npm typescript@5\n")
    hidden = {"kubectl", "amtool", "npm"}
    env = {
        "PATH": path_without(hidden, checkout / "bin"),
        "HOME": str(checkout),
        "LANG": "C.UTF-8",
    }
    done = run_as_non_root(["bash", ".ci/test", "-q"], checkout, env)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    message = done.stderr
    packages = apt_packages()
    for command in ("kubectl", "amtool"):
        assert f"  {packages[command]} (" in message
    assert "  npm (npm)" in message
    install = next(line for line in message.splitlines() if "apt-get install" in line)
    assert install.strip().startswith(("sudo apt-get update && ", "apt-get update && "))
    named = install.split("--no-install-recommends", 1)[1].split()
    assert {"kubectl", "prometheus-alertmanager", "npm"} <= set(named)
    assert "prometheus" not in named  # present: not asked for
    # Stopped before anything ran: no venv, no npm packages, no pytest.
    assert not (checkout / ".venv-test").exists()
    assert not (checkout / "node_modules").exists()
