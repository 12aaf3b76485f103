"""The shapes of Relay's rules: the shared helpers, and the SLOs (recording rules and
burn-rate alerts). The other alerts, and the groups, are in ``relay_alerts.py``.

``alerts/generate.py`` loads the knobs from ``alerts/slo.yaml`` into a ``Config`` and asks
``relay_alerts.groups(cfg, scope)`` for the rule groups of one deployment. Only the standard
library is used here, so the generator runs wherever PyYAML is installed.

Scope: every selector carries the configured ``job``; a PrometheusRule installed next to one
deployment also carries its ``namespace``, in raw selectors and in selectors of recorded
series alike, so two deployments scraped by one Prometheus never see (or page for) each
other. Aggregations keep ``cluster`` and ``namespace`` (absent labels cost nothing), so the
same rules also work unscoped across namespaces and clusters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LEVEL = "cluster_namespace_upstream"
BY = "cluster, namespace, upstream"
BY_DEPLOYMENT = "cluster, namespace, job"
BY_POD = "cluster, namespace, pod, instance"
# relay_request_duration_seconds buckets (service/telemetry/metrics.py LATENCY_BUCKETS).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONNECT_REASONS = ("connect", "connect_timeout")
ROUTED = 'upstream!="-"'
NOT_499 = 'code!="499"'


_DURATION = re.compile(r"^([0-9]+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ConfigError(ValueError):
    pass


def seconds(duration: str) -> int:
    match = _DURATION.match(duration)
    if match is None:
        raise ConfigError(f"not a Prometheus duration like 5m or 1d: {duration!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def number(value: float) -> str:
    """A float as PromQL and people write it: 0.001, 14.4, 6."""
    return f"{round(value, 10):g}"


def percent(ratio: float) -> str:
    return f"{round(ratio * 100, 8):g}%"


def human_seconds(value: float) -> str:
    return f"{number(value * 1000)}ms" if value < 1 else f"{number(value)}s"


@dataclass(frozen=True)
class BurnRate:
    severity: str
    long: str
    short: str
    factor: float
    for_: str


@dataclass(frozen=True)
class Config:
    job: str
    runbook_base_url: str
    slo_period_days: int
    windows: tuple[str, ...]
    errors_target: float
    errors_min_bad: int
    latency_target: float
    latency_threshold: float
    latency_min_bad: int
    burn_rates: tuple[BurnRate, ...]
    alerts: dict[str, dict[str, Any]]
    container: str
    hpa: str

    def runbook(self, alert: str) -> str:
        return f"{self.runbook_base_url}#{alert.lower()}"

    @property
    def period(self) -> str:
        return f"{self.slo_period_days}d"


@dataclass(frozen=True)
class Scope:
    """Which series one set of rules is about: a job, and a namespace or every namespace."""

    job: str
    namespace: str | None = None

    def raw(self, *extra: str) -> str:
        """Matchers for Relay's own series."""
        own = [f'job="{self.job}"', *self.namespace_matcher(), *extra]
        return ", ".join(own)

    def recorded(self, *extra: str) -> str:
        """A selector body for series recorded by these rules (they carry no job)."""
        return ", ".join([*self.namespace_matcher(), *extra])

    def namespace_matcher(self) -> list[str]:
        return [f'namespace="{self.namespace}"'] if self.namespace else []


def series(name: str, matchers: str) -> str:
    return f"{name}{{{matchers}}}" if matchers else name


def record_name(sli: str, operation: str) -> str:
    """``level:metric:operations``: the level is the labels the rule keeps."""
    metric = {
        "errors": "relay_requests_errors",
        "valid": "relay_requests_valid",
        "slow": "relay_requests_slow",
        "observed": "relay_request_duration_seconds_count",
    }[sli]
    return f"{LEVEL}:{metric}:{operation}"


def le_matcher(bound: float) -> str:
    """Match the bucket as prometheus_client writes it (1.0) and as Prometheus 3 stores it (1)."""
    if bound == int(bound):
        return f'le=~"{int(bound)}|{int(bound)}\\\\.0"'
    return f'le="{number(bound)}"'


def alert(
    cfg: Config,
    name: str,
    expr: str,
    for_: str,
    severity: str,
    owner: str,
    summary: str,
    description: str,
) -> dict[str, Any]:
    """One alerting rule. ``owner`` routes it: ``relay`` (Relay itself, its config and its
    capacity) or ``upstream`` (what an upstream does; the ``upstream`` label names it)."""
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if seconds(for_):
        rule["for"] = for_
    rule["labels"] = {"severity": severity, "owner": owner}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": cfg.runbook(name),
    }
    return rule


# -- the SLIs --------------------------------------------------------------------------------


def slo_records(cfg: Config, scope: Scope, sli: str) -> list[dict[str, Any]]:
    """Bad and valid events per second and their ratio, per window, and the period's ratio.

    The period ratio sums the 5m rates over the period instead of reading 30 days of raw
    samples at every evaluation; numerator and denominator are summed alike, so it is the
    ratio of the totals.
    """
    bad, valid = ("errors", "valid") if sli == "errors" else ("slow", "observed")
    rules: list[dict[str, Any]] = []
    for window in cfg.windows:
        if sli == "errors":
            bad_expr, valid_expr = errors_rates(scope, window)
        else:
            bad_expr, valid_expr = slow_rates(scope, window, cfg.latency_threshold)
        rules += [
            {"record": record_name(bad, f"rate{window}"), "expr": bad_expr},
            {"record": record_name(valid, f"rate{window}"), "expr": valid_expr},
            {
                "record": record_name(bad, f"ratio_rate{window}"),
                "expr": f"{series(record_name(bad, f'rate{window}'), scope.recorded())}\n/\n"
                f"{series(record_name(valid, f'rate{window}'), scope.recorded())}",
            },
        ]
    first = cfg.windows[0]
    rules.append(
        {
            "record": record_name(bad, f"ratio_rate{cfg.period}"),
            "expr": f"sum_over_time({series(record_name(bad, f'rate{first}'), scope.recorded())}"
            f"[{cfg.period}])\n/\n"
            f"sum_over_time({series(record_name(valid, f'rate{first}'), scope.recorded())}"
            f"[{cfg.period}])",
        }
    )
    return rules


def errors_rates(scope: Scope, window: str) -> tuple[str, str]:
    """Availability. Bad: relay_requests_failed_total, each request once: a 5xx, or a response
    cut short after its status was sent (series start at 0 for every route, so the first
    failure of a pod counts). Valid: every routed request except 499 (the client hung up
    before the response)."""
    valid = f"relay_requests_total{{{scope.raw(ROUTED, NOT_499)}}}[{window}]"
    bad = f"sum by ({BY}) (rate(relay_requests_failed_total{{{scope.raw(ROUTED)}}}[{window}]))"
    return bad, f"sum by ({BY}) (rate({valid}))"


def slow_rates(scope: Scope, window: str, threshold: float) -> tuple[str, str]:
    """Latency. Bad: the whole exchange (streamed body included) above the threshold bucket.
    Valid: every observed request."""
    count = f"relay_request_duration_seconds_count{{{scope.raw()}}}[{window}]"
    le = le_matcher(threshold)
    fast = f"relay_request_duration_seconds_bucket{{{scope.raw(le)}}}[{window}]"
    bad = f"""\
sum by ({BY}) (rate({count}))
-
sum by ({BY}) (rate({fast}))"""
    return bad, f"sum by ({BY}) (rate({count}))"


# The page and the ticket of an SLO are two alerts, as in the SRE workbook: a fast burn
# (critical) and a slow burn (warning).
BURN_NAMES = {"critical": "FastBurn", "warning": "SlowBurn"}


def burn_rate_alerts(cfg: Config, scope: Scope, sli: str) -> list[dict[str, Any]]:
    """One alert per severity, as in the SRE workbook: the window pairs of that severity
    OR-ed, so one incident is one alert (and one page) whichever pairs it trips.

    A pair trips when both windows have stayed above factor x budget for its hold, and the
    long window holds at least ``min_bad`` bad requests. The holds differ per pair (longer
    windows, longer holds), which one rule's ``for`` cannot express: each pair's hold is a
    ``min_over_time`` over the recorded ratios instead.
    """
    if sli == "errors":
        prefix, target, min_bad, kind = (
            "RelayErrorBudget", cfg.errors_target, cfg.errors_min_bad, "availability",
        )  # fmt: skip
        what = "failed (5xx, or a response cut short after its status)"
    else:
        prefix, target, min_bad, kind = (
            "RelayLatencyBudget", cfg.latency_target, cfg.latency_min_bad, "latency",
        )  # fmt: skip
        what = f"took longer than {human_seconds(cfg.latency_threshold)}"
    budget = 1 - target
    rules = []
    for severity in ("critical", "warning"):
        pairs = [b for b in cfg.burn_rates if b.severity == severity]
        if not pairs:
            continue
        terms = []
        for b in pairs:
            threshold = f"({number(b.factor)} * {number(budget)})"
            long_ratio = series(record_name(sli, f"ratio_rate{b.long}"), scope.recorded())
            short_ratio = series(record_name(sli, f"ratio_rate{b.short}"), scope.recorded())
            bad_long = series(record_name(sli, f"rate{b.long}"), scope.recorded())
            terms.append(
                f"(\n  min_over_time({long_ratio}[{b.for_}]) > {threshold}\n  and\n"
                f"  min_over_time({short_ratio}[{b.for_}]) > {threshold}\n  and\n"
                f"  {bad_long} * {seconds(b.long)} >= {min_bad}\n)"
            )
        conditions = ", or ".join(
            f"{b.long} and {b.short} above {percent(b.factor * budget)} "
            f"({number(b.factor)}x the budget) for {b.for_}"
            for b in pairs
        )
        lasts = ", ".join(
            f"{number(round(cfg.slo_period_days / b.factor, 1))} days at {number(b.factor)}x"
            for b in pairs
        )
        rules.append(
            alert(
                cfg,
                prefix + BURN_NAMES[severity],
                "\nor\n".join(terms),
                "0s",
                severity,
                "relay",
                f"Upstream {{{{ $labels.upstream }}}} is burning its {percent(target)} {kind} "
                f"SLO error budget {' or '.join(number(b.factor) + 'x' for b in pairs)} "
                "too fast",
                f"{{{{ $value | humanizePercentage }}}} of requests to upstream "
                f"{{{{ $labels.upstream }}}} {what} over the long window of a burn-rate "
                f"pair: {conditions}; at least {min_bad} such requests in the long window. "
                f"The {cfg.slo_period_days}-day budget of the {percent(target)} SLO "
                f"({percent(budget)}) lasts {lasts}.",
            )
        )
    return rules
