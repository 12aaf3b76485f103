"""The check behind the ``*_compat`` modules, the only places that touch private names of
aiohttp (``upstreams/aiohttp_compat.py``), httpx and httpcore (``upstreams/httpcore_compat.py``),
uvicorn (``server/uvicorn_compat.py``) and prometheus-client
(``telemetry/prometheus_compat.py``).

Each of those libraries is bounded above in pyproject.toml, below the next release that could
rename what Relay relies on; the compat modules check every such name when they are imported,
so a release that renames one stops Relay at start, naming it, instead of silently switching a
protection off. tests/test_compat.py asserts the same names, the ones set per instance too,
on the installed versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import version


class IncompatibleLibrary(RuntimeError):
    """An installed library lacks a private name Relay relies on."""


def missing(names: Mapping[object, Iterable[str]]) -> list[str]:
    """``owner.name`` of every name its owner (a class or module) lacks."""
    return [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, attributes in names.items()
        for name in attributes
        if not hasattr(owner, name)
    ]


def require(library: str, names: Mapping[object, Iterable[str]]) -> None:
    """Raise ``IncompatibleLibrary`` unless every owner has each of its names."""
    absent = missing(names)
    if absent:
        raise incompatible(library, ", ".join(absent))


def incompatible(library: str, what: str) -> IncompatibleLibrary:
    return IncompatibleLibrary(
        f"{library} {version(library)} lacks {what}, which Relay relies on: "
        "install the version pyproject.toml allows (see constraints.txt)"
    )
