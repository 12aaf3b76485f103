"""prometheus-client's internal names, used nowhere else (see ``service/compat.py``).

* ``values.MultiProcessValue`` and ``values.ValueClass``: the value class of multiprocess
  mode, given a worker slot's file identifier (multiproc.py).
* ``mmap_dict.MmapedDict.read_all_values_from_file``: the entries of one metric file, read
  by the merge (merge.py).
* The escaping schemes of the exposition encoders (``openmetrics.exposition.UNDERSCORES``,
  ``ALLOWUTF8``): see ``legacy_names_as_is``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.openmetrics import exposition as openmetrics

from ..compat import require

Encoder = Callable[[Any], bytes]

CLASS_NAMES: dict[object, tuple[str, ...]] = {
    values: ("MultiProcessValue", "ValueClass"),
    MmapedDict: ("read_all_values_from_file",),
    openmetrics: ("UNDERSCORES", "ALLOWUTF8"),
}

require("prometheus_client", CLASS_NAMES)


def use_value_class(identifier: str, members: dict[str, Callable[..., Any]]) -> None:
    """Back the metrics created from now on with the files named ``identifier``, their
    values having ``members`` besides the library's."""
    base = values.MultiProcessValue(lambda: identifier)  # type: ignore[no-untyped-call]
    values.ValueClass = type("ExemplarMmapedValue", (base,), members)


def read_file_values(path: str) -> Iterator[tuple[str, float, float, int]]:
    """``(key, value, timestamp, position)`` of every entry of one metric file. The file
    is read whole at once: a file removed later is no concern of the caller's."""
    entries: Iterator[tuple[str, float, float, int]]
    entries = MmapedDict.read_all_values_from_file(path)  # type: ignore[no-untyped-call]
    return entries


def legacy_names_as_is(encoder: Encoder) -> Encoder:
    """``encoder`` writing names as they are rather than through the ``underscores`` escape.

    A scraper that does not ask for an escaping scheme gets ``underscores``, which rewrites
    each character outside the legacy set. Every metric and label name Relay exposes is in
    that set, so the escape changes nothing, yet the OpenMetrics encoder tests each name
    character by character: 0.4 of a 0.8 s encoding of a thousand used upstreams.
    ``allow-utf-8`` writes a legacy name as it is, the same bytes (tests/test_metrics.py
    compares them on a full scrape)."""
    if isinstance(encoder, partial) and encoder.keywords.get("escaping") == openmetrics.UNDERSCORES:
        return partial(
            encoder.func, *encoder.args, **{**encoder.keywords, "escaping": openmetrics.ALLOWUTF8}
        )
    return encoder
