"""The multiprocess merge (service/telemetry/merge.py) against prometheus-client's own, on
files written by the library's writer: the same families, samples and values, in the same
order, scrape after scrape."""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from service.telemetry.merge import FileMerge

BOUNDS = (0.005, 0.1, 1.0, 2.5, float("inf"))
KINDS = ("counter", "histogram", "gauge_livesum", "gauge_max", "gauge_min", "gauge_sum")

values = st.floats(min_value=0, max_value=1e6, allow_nan=False)
family = st.tuples(st.sampled_from(KINDS), st.integers(1, 3))  # kind, label sets


def entries(kind: str, index: int, sets: int) -> list[tuple[str, str]]:
    """``(file kind, key)`` of every series of one family, as the library writes them."""
    name = f"f{index}"
    found = []
    for labelset in range(sets):
        labels = ["u", "route"], [f"u{labelset}", "r"]
        if kind == "histogram":
            found.append((kind, mmap_key(name, f"{name}_sum", *labels, "help")))
            for bound in BOUNDS:
                le = (["u", "route", "le"], [*labels[1], floatToGoString(bound)])
                found.append((kind, mmap_key(name, f"{name}_bucket", *le, "help")))
        else:
            sample = f"{name}_total" if kind == "counter" else name
            found.append((kind, mmap_key(name, sample, *labels, "help")))
    return found


def write(directory: Path, files: dict[str, list[tuple[str, float]]]) -> list[str]:
    paths = []
    for name, items in files.items():
        path = directory / name
        written = MmapedDict(str(path))
        for key, value in items:
            written.write_value(key, value, 0.0)
        written.close()
        paths.append(str(path))
    return paths


def library(paths: list[str]) -> list[tuple[str, str, str, list[object]]]:
    merged = MultiProcessCollector.merge(paths, accumulate=True)  # type: ignore[no-untyped-call]
    return shape(merged)


def shape(metrics: object) -> list[tuple[str, str, str, list[object]]]:
    found = [(m.name, m.type, m.documentation, m.samples) for m in metrics]  # type: ignore[attr-defined]
    return sorted(found, key=lambda m: m[0])


@settings(max_examples=60, deadline=None)
@given(
    families=st.lists(family, min_size=1, max_size=5),
    workers=st.integers(1, 3),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_the_same_merge_as_the_library(
    tmp_path_factory: object,
    families: list[tuple[str, int]],
    workers: int,
    seed: int,
    data: st.DataObject,
) -> None:
    directory: Path = tmp_path_factory.mktemp("merge")  # type: ignore[attr-defined]
    rng = random.Random(seed)
    series = [e for index, (kind, sets) in enumerate(families) for e in entries(kind, index, sets)]
    merge = FileMerge()
    for scrape in range(2):  # the second with new values and keys parsed already
        files: dict[str, list[tuple[str, float]]] = {}
        for worker in range(workers):
            # Each worker wrote some of the series, in an order of its own.
            mine = [e for e in series if rng.random() < 0.8]
            rng.shuffle(mine)
            for kind, key in mine:
                name = f"{kind}_w{worker}.db"
                files.setdefault(name, []).append((key, data.draw(values)))
        for path in directory.iterdir():
            path.unlink()
        paths = write(directory, files)
        assert shape(merge.merge(paths)) == library(paths), scrape


def test_exactly_the_library_order_on_the_files_the_proxy_writes(tmp_path: Path) -> None:
    files = {
        "gauge_max_w1.db": [(entries("gauge_max", 0, 2)[0][1], 3.0)],
        "counter_w1.db": [(key, 1.0) for _, key in entries("counter", 1, 3)],
        "histogram_w1.db": [(key, 2.0) for _, key in entries("histogram", 2, 2)],
        "histogram_w0.db": [(key, 1.0) for _, key in reversed(entries("histogram", 2, 3))],
        "gauge_livesum_w0.db": [(key, 5.0) for _, key in entries("gauge_livesum", 3, 2)],
    }
    paths = write(tmp_path, files)
    merged = list(FileMerge().merge(paths))
    expected: list[Metric] = list(MultiProcessCollector.merge(paths, accumulate=True))  # type: ignore[no-untyped-call]
    assert [(m.name, m.samples) for m in merged] == [(m.name, m.samples) for m in expected]
    counts = [s for m in merged for s in m.samples if s.name == "f2_count"]
    # Five buckets per series, one count each from w0, two from w1 where it wrote them too.
    assert [s.value for s in counts] == [5 * 3.0, 5 * 3.0, 5 * 1.0]


def test_kinds_it_does_not_merge_go_to_the_library(tmp_path: Path) -> None:
    key = mmap_key("g", "g", ["u"], ["a"], "help")
    paths = write(
        tmp_path,
        {"gauge_mostrecent_w0.db": [(key, 1.0)], "gauge_all_w1.db": [(key, 2.0)]},
    )
    assert shape(FileMerge().merge(paths)) == library(paths)


def test_a_live_gauge_file_gone_since_the_listing_is_skipped(tmp_path: Path) -> None:
    paths = write(tmp_path, {"gauge_livesum_w0.db": [(entries("gauge_livesum", 0, 1)[0][1], 2.0)]})
    gone = str(tmp_path / "gauge_livesum_w1.db")
    merged = shape(FileMerge().merge([*paths, gone]))
    assert merged == library(paths)
    assert not os.path.exists(gone)
