"""Series shown at 0 from the first scrape, before anything has touched them.

``rate()`` sees an increase only between two samples, so the first increment of a series
that appears with it is lost: the first failure of each kind on each pod would not count.
The series of closed label sets (per upstream: every failure reason, disconnect side and
phase, ...; per route: failed and truncated requests) are therefore exposed from the start.

They are added to what the registry (or the multiprocess merge) yields at scrape time rather
than created as prometheus-client children up front: a child costs about 10 µs and 0.5 KB to
create, and a config with thousands of upstreams would pay that 25 times per upstream at
every start. A series the proxy has touched is exposed by the client as usual; the ones it
has not are filled in here, so the exposition is the same either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LabelValues = tuple[str, ...]


class ZeroSeries:
    """The label sets each family shows at 0 until first used."""

    def __init__(self) -> None:
        # family name -> (the family, its sample name, label names, label value sets)
        self._families: dict[str, tuple[Metric, str, Sequence[str], list[LabelValues]]] = {}

    def add(
        self, metric: MetricWrapperBase, label_names: Sequence[str], sets: Iterable[LabelValues]
    ) -> None:
        """Show ``metric`` (a counter or gauge labelled ``label_names``) at 0 for each of
        ``sets``."""
        (family,) = metric.describe()
        sample = f"{family.name}_total" if family.type == "counter" else family.name
        entry = self._families.setdefault(family.name, (family, sample, tuple(label_names), []))
        entry[3].extend(sets)

    def fill(self, families: Iterable[Metric]) -> Iterator[Metric]:
        """``families`` as collected, each with its missing preset series added at 0, and
        the preset families none of whose series was touched yet (the multiprocess merge
        yields only families some worker wrote to)."""
        missing = set(self._families)
        for family in families:
            if family.name in missing:
                missing.discard(family.name)
                self._fill(family)
            yield family
        for name in missing:
            described = self._families[name][0]
            family = Metric(described.name, described.documentation, described.type)
            self._fill(family)
            yield family

    def _fill(self, family: Metric) -> None:
        _, sample, names, sets = self._families[family.name]
        seen = {
            tuple(s.labels.get(name, "") for name in names)
            for s in family.samples
            if s.name == sample
        }
        for values in sets:
            if values not in seen:
                family.add_sample(sample, dict(zip(names, values, strict=True)), 0.0)


class Exposition:
    """What the encoder reads: a collector's families with the zero series filled in."""

    def __init__(self, source: Collector, zeros: ZeroSeries) -> None:
        self._source = source
        self._zeros = zeros

    def collect(self) -> Iterable[Metric]:
        return self._zeros.fill(self._source.collect())
