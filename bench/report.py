"""The comparison's output: a Markdown table per load, CSV, JSON and a PNG chart.

Results are flat records, one per (measurement, system): ``load`` is one of ``MEASUREMENTS``
(load 3 is two measurements, download and upload), ``row`` the system's letter. Ratios
compare the headline figure (req/s or MB/s) with rows (a) direct, (b) nginx proxy and (c)
naive FastAPI of the same measurement in the same run, and, when ``--baseline`` added its
rows, each Relay row with the same configuration run from the baseline revision.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import markdown_table

# measurement -> (headline figure, its unit)
MEASUREMENTS = {
    "small": ("rps", "req/s"),
    "mib": ("mb_per_s", "MB/s"),
    "download": ("mb_per_s", "MB/s"),
    "upload": ("mb_per_s", "MB/s"),
    "slow": ("rps", "req/s"),
}
BASELINES = {"vs_direct": "a", "vs_nginx": "b", "vs_naive": "c"}
# Relay rows and their twins run from the ``--baseline`` revision.
BASELINE_TWINS = {"f": "k", "g": "l", "j": "m"}
CSV_COLUMNS = [
    "load",
    "row",
    "system",
    "label",
    "rps",
    "mb_per_s",
    "p50_ms",
    "p99_ms",
    "requests",
    "non_2xx",
    "socket_errors",
    "timeouts",
    "seconds",
    "rss_before_mib",
    "rss_growth_mib",
    "server_cpu",
    "cpu_us_per_request",
    "vs_direct",
    "vs_nginx",
    "vs_naive",
    "vs_baseline",
    "spans_exported",
    "load_1m",
    "error",
]


def add_ratios(results: list[dict[str, Any]]) -> None:
    for load, (figure, _) in MEASUREMENTS.items():
        mine = [r for r in results if r["load"] == load]
        base = {r["row"]: r.get(figure) for r in mine if not r.get("error")}
        for record in mine:
            twin = BASELINE_TWINS.get(record["row"])
            references = {**BASELINES, "vs_baseline": twin}
            for column, row in references.items():
                value, reference = record.get(figure), base.get(row) if row else None
                if value is None or not reference or record.get("error"):
                    record[column] = None
                else:
                    record[column] = value / reference


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _ratio(value: Any) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _errors(record: dict[str, Any]) -> list[str]:
    socket_errors = _num(record.get("socket_errors"))
    if timeouts := record.get("timeouts"):
        socket_errors += f" ({timeouts:,} timeouts)"
    return [_num(record.get("non_2xx")), socket_errors]


def send_table(costs: dict[str, float]) -> str:
    """Load 0: CPU µs per request of each way of sending, and what it adds to the first."""
    if not costs:
        return "(not measured)"
    direct = next(iter(costs.values()))
    rows = [[name, f"{micros:,.1f}", f"{micros - direct:+,.1f}"] for name, micros in costs.items()]
    return markdown_table(["way of sending", "CPU µs/req", "added"], rows)


def wrk_table(results: list[dict[str, Any]], load: str) -> str:
    figure = MEASUREMENTS[load][0]
    header = [
        "system",
        "req/s",
        "p50 ms",
        "p99 ms",
        "non-2xx",
        "socket errors",
        "server CPU",
        "CPU µs/req",
    ]
    if figure == "mb_per_s":
        header.insert(1, "MB/s")
    header += ["vs direct", "vs nginx proxy", "vs naive"]
    ratio_columns = list(BASELINES)
    if any(r.get("vs_baseline") is not None for r in results if r["load"] == load):
        header.append("vs baseline")
        ratio_columns.append("vs_baseline")
    rows = []
    for r in (r for r in results if r["load"] == load):
        if r.get("error"):
            rows.append(
                [f"({r['row']}) {r['label']}", f"failed: {r['error']}"] + [""] * (len(header) - 2)
            )
            continue
        # wrk's latency figures leave out the responses slower than its timeout; when none
        # was faster it reports zeros.
        answered = bool(r["p99_ms"])
        cells = [
            f"({r['row']}) {r['label']}",
            _num(r["rps"]),
            _num(r["p50_ms"], 2) if answered else "none in time",
            _num(r["p99_ms"], 2) if answered else "-",
            *_errors(r),
            _num(r["server_cpu"], 2),
            _num(r.get("cpu_us_per_request")),
        ]
        if figure == "mb_per_s":
            cells.insert(1, _num(r["mb_per_s"]))
        rows.append(cells + [_ratio(r.get(c)) for c in ratio_columns])
    return markdown_table(header, rows)


def transfer_table(results: list[dict[str, Any]]) -> str:
    """Load 3: download and upload side by side, "download / upload" in the ratio columns."""
    header = [
        "system",
        "download MB/s",
        "upload MB/s",
        "RSS growth MiB (down / up)",
        "server CPU (down / up)",
        "vs direct",
        "vs nginx proxy",
        "vs naive",
    ]
    by_row: dict[str, dict[str, dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    for r in results:
        if r["load"] in ("download", "upload"):
            by_row.setdefault(r["row"], {})[r["load"]] = r
            labels[r["row"]] = r["label"]
    rows = []
    for row in sorted(by_row):
        down, up = by_row[row].get("download", {}), by_row[row].get("upload", {})

        def pair(key: str, fmt: Any, down: dict[str, Any] = down, up: dict[str, Any] = up) -> str:
            return f"{fmt(down.get(key))} / {fmt(up.get(key))}"

        def speed(record: dict[str, Any]) -> str:
            if record.get("error"):
                return f"failed: {record['error']}"
            return _num(record.get("mb_per_s"))

        rss = "-" if row == "a" else pair("rss_growth_mib", lambda v: _num(v, 1))
        rows.append(
            [
                f"({row}) {labels[row]}",
                speed(down),
                speed(up),
                rss,
                pair("server_cpu", lambda v: _num(v, 2)),
                *[pair(c, _ratio) for c in BASELINES],
            ]
        )
    return markdown_table(header, rows)


def write_csv(path: Path, results: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in results:
            writer.writerow({k: ("" if v is None else v) for k, v in record.items()})


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


PANELS = [
    ("1. 1 KiB GET, wrk -c64", ["small"], "req/s"),
    ("2. 1 MiB GET, wrk -c16", ["mib"], "MB/s"),
    ("3. 1 GiB streamed, curl", ["download", "upload"], "MB/s"),
    ("4. 100 ms upstream, wrk -c1000", ["slow"], "req/s"),
]


def write_chart(path: Path, results: list[dict[str, Any]], title: str) -> None:
    """Grouped bars, one panel per load (its own unit), one colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(r["load"] in p[1] for r in results)]
    if not panels:
        return
    rows = sorted({r["row"] for r in results})
    labels = {r["row"]: f"({r['row']}) {r['label']}" for r in results}
    colours = {row: plt.get_cmap("tab20")(i) for i, row in enumerate("abcdefghijklmno")}
    width_in = max(11.0, 5.0 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 6.0), squeeze=False)
    for ax, (name, loads, unit) in zip(axes[0], panels, strict=True):
        width = 0.8 / len(rows)
        values_seen: list[float] = []
        zeros: list[float] = []
        for i, row in enumerate(rows):
            xs, ys = [], []
            for g, load in enumerate(loads):
                record = next((r for r in results if r["load"] == load and r["row"] == row), None)
                if record is None or record.get("error"):
                    continue
                value = record[MEASUREMENTS[load][0]]
                x = g - 0.4 + width * (i + 0.5)
                if not value:
                    zeros.append(x)  # no bar to see, on a log scale not even a baseline
                    continue
                xs.append(x)
                ys.append(value)
                values_seen.append(value)
            bars = ax.bar(xs, ys, width, color=colours[row], label=labels[row])
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_xticks(range(len(loads)), loads if len(loads) > 1 else [""])
        positive = [v for v in values_seen if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
            ax.set_ylabel(f"{unit} (log scale)")
        ax.margins(y=0.25)
        for x in zeros:
            ax.text(x, 0.01, "0", transform=ax.get_xaxis_transform(), ha="center", fontsize=7)
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[row], label=labels[row]) for row in rows]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    # About 16 characters of 8-point text per inch.
    fig.suptitle("\n".join(textwrap.wrap(title, int(width_in * 16))), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
