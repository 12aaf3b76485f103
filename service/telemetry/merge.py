"""The merge of the workers' metric files a multiprocess scrape answers with.

prometheus-client's ``MultiProcessCollector.merge`` parses every key of every file (a JSON
document per series) on every scrape, builds a sample per entry and then a second one per
merged series. With a thousand used upstreams that is about 110,000 entries for two workers
and took 1.1 to 1.6 s of a scrape on its own (README, *At platform size*). The keys never
change meaning once written, so ``FileMerge`` parses each once for the life of the process
and adds the values straight into the merged series; the result is the library's, sample
for sample (tests/test_merge.py checks it against ``MultiProcessCollector.merge`` on random
files).

Only the kinds Relay writes are merged here: counters, histograms and gauges in the
``livesum`` and ``max`` modes (plus their ``sum``/``min``/``livemax``/``livemin`` kin). A
directory holding anything else (a summary, a ``mostrecent`` or ``all`` gauge) is handed to
the library's merge whole, so an unknown kind is merged correctly, just not faster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .prometheus_compat import read_file_values

Labels = tuple[tuple[str, str], ...]

_SUM = "sum"
_MAX = "max"
_MIN = "min"
# Gauge modes whose merged value has no pid label, by how values combine.
_GAUGE_MODES = {
    "sum": _SUM,
    "livesum": _SUM,
    "max": _MAX,
    "livemax": _MAX,
    "min": _MIN,
    "livemin": _MIN,
}


@dataclass(frozen=True, slots=True)
class _Key:
    """One file key, parsed once: its family and, ready for the merged sample, its name and
    labels (a bucket's bound apart, as the bucket's merged value depends on the others)."""

    family: str
    documentation: str
    sample: str
    labels: dict[str, str]  # shared by the merged samples of every scrape; never changed
    le: float | None  # a bucket's upper bound; None for any other sample
    group: Labels  # sorted labels without le: the series this entry belongs to


def _parse(raw: str) -> _Key:
    family, sample, labels, documentation = json.loads(raw)
    bound = labels.get("le")
    if bound is None or not sample.endswith("_bucket"):
        ordered: Labels = tuple(sorted(labels.items()))
        return _Key(family, documentation, sample, dict(ordered), None, ordered)
    group = tuple(sorted(item for item in labels.items() if item[0] != "le"))
    le = float(bound)
    # The library writes the merged bucket's bound as it formats it, last among the labels.
    merged = {**dict(group), "le": floatToGoString(le)}  # type: ignore[no-untyped-call]
    return _Key(family, documentation, sample, merged, le, group)


def _file_kind(path: str) -> tuple[str, str | None]:
    """``(kind, gauge mode)`` from a file name such as ``gauge_livesum_w0.db``."""
    parts = os.path.basename(path).split("_")
    return parts[0], parts[1] if parts[0] == "gauge" else None


class _Family:
    """One merged family: its series in the order the library gives them."""

    __slots__ = ("buckets", "metric", "series")

    def __init__(self, key: _Key, kind: str) -> None:
        self.metric = Metric(key.family, key.documentation, kind)
        # group -> samples other than buckets (a histogram's _sum; a counter's one sample)
        self.series: dict[Labels, list[tuple[_Key, float]]] = {}
        # group -> its buckets, each with its own (not yet cumulative) count
        self.buckets: dict[Labels, list[tuple[_Key, float]]] = {}

    def close(self, labels_of: Callable[[Labels], dict[str, str]]) -> Metric:
        metric = self.metric
        name = metric.name
        samples: list[Sample] = []
        # Buckets follow the other samples of their series; a series with buckets only
        # (never written by the library) would come last, as in its merge.
        groups = [*self.series, *(g for g in self.buckets if g not in self.series)]
        for group in groups:
            series = self.series.get(group, ())
            samples.extend(Sample(key.sample, key.labels, value) for key, value in series)
            buckets = self.buckets.get(group)
            if buckets is None:
                continue
            total = 0.0
            for key, value in sorted(buckets, key=_bound):
                total += value
                samples.append(Sample(f"{name}_bucket", key.labels, total))
            samples.append(Sample(f"{name}_count", labels_of(group), total))
        metric.samples = samples
        return metric


def _bound(entry: tuple[_Key, float]) -> float:
    return entry[0].le  # type: ignore[return-value]


class FileMerge:
    """Merges worker files as ``MultiProcessCollector.merge(files, accumulate=True)`` does,
    parsing each key once per process."""

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}
        self._groups: dict[Labels, dict[str, str]] = {}

    def merge(self, files: Sequence[str]) -> Iterable[Metric]:
        kinds = [_file_kind(path) for path in files]
        if any(not self._handled(kind, mode) for kind, mode in kinds):
            return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-any-return,no-untyped-call]
        # Each key's value over all files, by file kind and mode (a key is in files of one
        # only), in the order the keys first appear.
        totals: dict[tuple[str, str | None], dict[str, float]] = {}
        for path, (kind, mode) in zip(files, kinds, strict=True):
            try:
                entries = read_file_values(path)
            except FileNotFoundError:
                # A live gauge's file goes when its process is marked dead, maybe since
                # the directory was listed; any other file must be there.
                if kind == "gauge" and mode is not None and mode.startswith("live"):
                    continue
                raise
            into = totals.setdefault((kind, mode), {})
            combine = _GAUGE_MODES[mode] if mode is not None else _SUM
            if combine is _SUM:
                for raw, value, _, _ in entries:
                    into[raw] = into.get(raw, 0.0) + value
            else:
                pick = max if combine is _MAX else min
                for raw, value, _, _ in entries:
                    current = into.get(raw)
                    into[raw] = value if current is None else pick(current, value)
        return self._families(totals)

    def _families(self, totals: dict[tuple[str, str | None], dict[str, float]]) -> list[Metric]:
        keys = self._keys
        families: dict[str, _Family] = {}
        for (kind, _), values in totals.items():
            for raw, value in values.items():
                key = keys.get(raw)
                if key is None:
                    key = keys[raw] = _parse(raw)
                family = families.get(key.family)
                if family is None:
                    family = families[key.family] = _Family(key, kind)
                group = key.group
                if key.le is None:
                    series = family.series.get(group)
                    if series is None:
                        series = family.series[group] = []
                    series.append((key, value))
                else:
                    buckets = family.buckets.get(group)
                    if buckets is None:
                        buckets = family.buckets[group] = []
                    buckets.append((key, value))
        return [family.close(self._labels_of) for family in families.values()]

    def _labels_of(self, group: Labels) -> dict[str, str]:
        labels = self._groups.get(group)
        if labels is None:
            labels = self._groups[group] = dict(group)
        return labels

    @staticmethod
    def _handled(kind: str, mode: str | None) -> bool:
        return kind in ("counter", "histogram") or (kind == "gauge" and mode in _GAUGE_MODES)
