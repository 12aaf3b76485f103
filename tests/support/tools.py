"""The system tools the suite runs (promtool, prometheus, amtool, kubectl), looked up once.

``.ci/tools`` lists them with the Debian package that provides each; ``.ci/test`` (the
README's test command) installs what is missing. A test that needs one fails, never skips,
naming the package.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.support.tiers import require_live

ROOT = Path(__file__).resolve().parents[2]
TOOLS_FILE = ROOT / ".ci" / "tools"


def apt_packages() -> dict[str, str]:
    """Command -> the Debian package that provides it, as listed in ``.ci/tools``."""
    packages: dict[str, str] = {}
    for line in TOOLS_FILE.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "apt":
            for command in fields[2:]:
                packages[command] = fields[1]
    return packages


def require_tool(command: str) -> str:
    """The path of ``command``; fails the test naming what provides it."""
    require_live(command)
    path = shutil.which(command)
    if path is None:
        package = apt_packages().get(command)
        assert package is not None, f"{command} is not listed in .ci/tools"
        raise AssertionError(
            f"{command} not found on PATH: it comes with the Debian package {package}, "
            "which .ci/test (the README's test command) installs"
        )
    return path


def python_tool(command: str) -> str:
    """The path of a command the test extra installs (checkov, kubernetes-validate)."""
    require_live(command)
    path = shutil.which(command) or str(Path(sys.executable).with_name(command))
    assert Path(path).exists(), f"{command} not found: pip install -e '.[test]' installs it"
    return path
