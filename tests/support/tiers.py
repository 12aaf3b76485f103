"""The two test tiers. ``python -m pytest -m "not live"`` is the fast tier: the proxy in the
test process, over loopback sockets. A ``live`` test starts something else: a relay process,
Prometheus, Alertmanager, promtool, kubectl, checkov, tsc, the soak.

The helpers that start such things call ``require_live``: in a test without the ``live``
mark they fail, naming the mark, so the fast tier cannot silently grow slow again.
"""

from __future__ import annotations

import pytest

_current: pytest.Item | None = None


def entering(item: pytest.Item | None) -> None:
    """Called by conftest.py as each test's setup begins (None once it is torn down)."""
    global _current
    _current = item


def require_live(what: str) -> None:
    item = _current
    if item is not None and item.get_closest_marker("live") is None:
        raise AssertionError(
            f"{item.nodeid} starts {what}: mark it @pytest.mark.live (the fast tier, "
            '-m "not live", starts nothing but the test process)'
        )
