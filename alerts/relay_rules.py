"""The shapes of Relay's recording and alerting rules (PromQL and alert texts).

``alerts/generate.py`` loads the knobs from ``alerts/slo.yaml`` into a ``Config`` and asks
``groups(cfg, scope)`` for the rule groups of one deployment. Only the standard library is
used here, so the generator runs wherever PyYAML is installed.

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
# relay_request_duration_seconds buckets (service/metrics.py LATENCY_BUCKETS).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONNECT_REASONS = ("connect", "connect_timeout")
ROUTED = 'upstream!="-"'
NOT_499 = 'code!="499"'
CODE_5XX = 'code=~"5.."'


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
    """Availability. Bad: a 5xx, or a response cut short after a non-5xx status was sent
    (counted once: Relay counts a truncation only when the status was not a 5xx). Valid:
    every routed request except 499 (the client hung up before the response)."""
    valid = f"relay_requests_total{{{scope.raw(ROUTED, NOT_499)}}}[{window}]"
    bad = f"""\
sum by ({BY}) (
    rate(relay_requests_total{{{scope.raw(ROUTED, CODE_5XX)}}}[{window}])
  or
    rate(relay_responses_truncated_total{{{scope.raw(ROUTED)}}}[{window}])
  or
    0 * rate({valid})
)"""
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


# -- is Relay there ------------------------------------------------------------------------


def availability_alerts(cfg: Config, scope: Scope) -> list[dict[str, Any]]:
    up = series("up", scope.raw())
    down, gone, absent = cfg.alerts["target_down"], cfg.alerts["down"], cfg.alerts["absent"]
    where = f' in namespace "{scope.namespace}"' if scope.namespace else ""
    return [
        alert(
            cfg,
            "RelayTargetDown",
            f"{up} == 0",
            down["for"],
            "warning",
            "relay",
            "Relay target {{ $labels.instance }} is down",
            "Prometheus has failed to scrape relay at {{ $labels.instance }}"
            "{{ with $labels.pod }} (pod {{ . }}){{ end }} for "
            f"{down['for']}: the process is down or its admin port does not answer /metrics. "
            "Its traffic is missing from every other relay alert.",
        ),
        alert(
            cfg,
            "RelayDown",
            f"max by ({BY_DEPLOYMENT}) ({up}) == 0",
            gone["for"],
            "critical",
            "relay",
            "No relay target is up{{ with $labels.namespace }} in namespace {{ . }}{{ end }}",
            'Every target of job="{{ $labels.job }}"'
            "{{ with $labels.namespace }} in namespace {{ . }}{{ end }} has failed its scrapes "
            f"for {gone['for']}: the pods are discovered but none answers (crash loop, failed "
            "start, or the admin port blocked). Relay is down there, and the alerts that read "
            "its metrics are blind.",
        ),
        alert(
            cfg,
            "RelayAbsent",
            f"absent({up})",
            absent["for"],
            "critical",
            "relay",
            f'No relay target is scraped (job="{cfg.job}"{where})',
            f'Prometheus has had no target with job="{{{{ $labels.job }}}}"{where} for '
            f"{absent['for']}: every relay instance is gone, or service discovery "
            "(ServiceMonitor, scrape config) no longer finds them. All other relay alerts are "
            "blind until this is fixed.",
        ),
    ]


# -- Relay itself ---------------------------------------------------------------------------


def proxy_alerts(cfg: Config, scope: Scope) -> list[dict[str, Any]]:
    a = cfg.alerts
    internal, restarts = a["internal_errors"], a["worker_restarts"]
    memory, fds, unrouted, hpa = (
        a["memory_near_limit"], a["fds_near_limit"], a["unrouted_traffic"], a["hpa_maxed_out"],
    )  # fmt: skip
    ksm_scope = scope.namespace_matcher()
    limits = series(
        "kube_pod_container_resource_limits",
        ", ".join([*ksm_scope, f'container="{cfg.container}"', 'resource="memory"']),
    )
    hpa_sel = ", ".join([*ksm_scope, f'horizontalpodautoscaler="{cfg.hpa}"'])
    all_requests = f"sum by ({BY_DEPLOYMENT}) (rate(relay_requests_total{{{scope.raw()}}}[5m]))"
    internal_errors = scope.raw('reason="internal"')
    unrouted_404 = scope.raw('upstream="-"', 'code="404"')
    return [
        alert(
            cfg,
            "RelayInternalErrors",
            f"sum by ({BY}) (increase(relay_upstream_errors_total"
            f"{{{internal_errors}}}[{internal['window']}])) > 0",
            internal["for"],
            "warning",
            "relay",
            "Relay failed requests to upstream {{ $labels.upstream }} with an internal error",
            '{{ printf "%.0f" $value }} requests to upstream {{ $labels.upstream }} failed with '
            f'reason="internal" in the last {internal["window"]}: an unexpected exception in '
            "Relay itself (answered 502), not a fault of the upstream. The log has the "
            "traceback.",
        ),
        alert(
            cfg,
            "RelayWorkerRestarts",
            f"sum by ({BY_POD}) (increase(relay_worker_restarts_total{{{scope.raw()}}}"
            f"[{restarts['window']}])) > 0",
            restarts["for"],
            "warning",
            "relay",
            "Relay worker processes are restarting on {{ $labels.instance }}",
            "{{ with $labels.pod }}Pod {{ . }}{{ else }}Relay at {{ $labels.instance }}{{ end }} "
            '{{ printf "%.0f" $value }} time(s) respawned a worker process that died in the '
            f"last {restarts['window']}. The pod stays Running while its workers crash: the "
            "requests those workers held were cut.",
        ),
        alert(
            cfg,
            "RelayMemoryNearLimit",
            f"sum by (cluster, namespace, pod) (process_resident_memory_bytes{{{scope.raw()}}})"
            f"\n/\nmax by (cluster, namespace, pod) ({limits})\n> {number(memory['ratio'])}",
            memory["for"],
            "warning",
            "relay",
            "Relay pod {{ $labels.pod }} is near its memory limit",
            "The Relay processes of pod {{ $labels.pod }} use {{ $value | humanizePercentage }} "
            f"of the container's memory limit, above {percent(memory['ratio'])} for "
            f"{memory['for']} (resident memory summed over workers, so shared pages count once "
            "per worker). Next comes an OOM kill.",
        ),
        alert(
            cfg,
            "RelayFileDescriptorsNearLimit",
            f"max by ({BY_POD}) (\n  process_open_fds{{{scope.raw()}}}\n  /\n"
            f"  process_max_fds{{{scope.raw()}}}\n)\n> {number(fds['ratio'])}",
            fds["for"],
            "warning",
            "relay",
            "Relay on {{ $labels.instance }} is running out of file descriptors",
            "A Relay process on {{ $labels.instance }}{{ with $labels.pod }} (pod {{ . }})"
            "{{ end }} holds "
            "{{ $value | humanizePercentage }} of its file descriptor limit, above "
            f"{percent(fds['ratio'])} for {fds['for']}. At the limit it can accept no client "
            "and open no upstream connection.",
        ),
        alert(
            cfg,
            "RelayUnroutedTraffic",
            f"sum by ({BY_DEPLOYMENT}) (rate(relay_requests_total"
            f"{{{unrouted_404}}}[5m]))\n/\n{all_requests}\n"
            f"> {number(unrouted['ratio'])}\nand\n{all_requests} > "
            f"{number(unrouted['min_request_rate'])}",
            unrouted["for"],
            "warning",
            "relay",
            "Most requests to relay match no route"
            "{{ with $labels.namespace }} in namespace {{ . }}{{ end }}",
            "{{ $value | humanizePercentage }} of the requests to relay"
            "{{ with $labels.namespace }} in namespace {{ . }}{{ end }} matched no route and "
            f"got 404 over the last 5m, above {percent(unrouted['ratio'])} for "
            f"{unrouted['for']} (counted above {number(unrouted['min_request_rate'])} request/s)."
            " Unrouted requests belong to no upstream's SLO: a broken route config shows only "
            "here.",
        ),
        alert(
            cfg,
            "RelayHPAMaxedOut",
            f"kube_horizontalpodautoscaler_status_current_replicas{{{hpa_sel}}}\n>=\n"
            f"kube_horizontalpodautoscaler_spec_max_replicas{{{hpa_sel}}}\nand\n"
            f"kube_horizontalpodautoscaler_spec_max_replicas{{{hpa_sel}}}\n!=\n"
            f"kube_horizontalpodautoscaler_spec_min_replicas{{{hpa_sel}}}",
            hpa["for"],
            "warning",
            "relay",
            "Relay's autoscaler is pinned at its maximum"
            "{{ with $labels.namespace }} in namespace {{ . }}{{ end }}",
            "The HorizontalPodAutoscaler {{ $labels.horizontalpodautoscaler }} has run "
            '{{ printf "%.0f" $value }} replicas, its maxReplicas, for '
            f"{hpa['for']}: it cannot add capacity, and more load will queue and fail.",
        ),
    ]


# -- pools ---------------------------------------------------------------------------------


def pool_alerts(cfg: Config, scope: Scope) -> list[dict[str, Any]]:
    sat, wait = cfg.alerts["pool_saturated"], cfg.alerts["pool_wait_high"]
    in_use = scope.raw('state="in_use"')
    utilization = (
        f"relay_pool_connections{{{in_use}}}\n"
        "    / ignoring (state)\n"
        f"  relay_pool_max_connections{{{scope.raw()}}}"
    )
    quantile = float(wait["quantile"])
    return [
        alert(
            cfg,
            "RelayPoolSaturated",
            f"(\n  {utilization}\n  > {number(sat['utilization'])}\n)\nor\n"
            f"(\n  {utilization}\n  and\n"
            f"  relay_pool_waiting_requests{{{scope.raw()}}} > 0\n)",
            sat["for"],
            "warning",
            "relay",
            "Connection pool to upstream {{ $labels.upstream }} is saturated on "
            "{{ $labels.instance }}",
            "{{ $value | humanizePercentage }} of the pool connections to upstream "
            "{{ $labels.upstream }} on {{ $labels.instance }} are in use, and for "
            f"{sat['for']} they have been above {percent(sat['utilization'])} or requests have "
            "been queueing for a free connection. More load waits for a connection and then "
            "fails with 503 after the pool timeout.",
        ),
        alert(
            cfg,
            "RelayPoolWaitHigh",
            f"histogram_quantile(\n  {number(quantile)},\n"
            f"  sum by ({BY}, le) (rate(relay_pool_wait_seconds_bucket{{{scope.raw()}}}[5m]))\n)"
            f"\n> {number(wait['seconds'])}",
            wait["for"],
            "warning",
            "relay",
            "Requests to upstream {{ $labels.upstream }} wait long for a pooled connection",
            f"The {number(quantile * 100)}th percentile of the time requests to upstream "
            "{{ $labels.upstream }} waited for a free pooled connection is "
            "{{ $value | humanizeDuration }}, above "
            f"{human_seconds(float(wait['seconds']))} for {wait['for']}.",
        ),
        ratio_alert(
            cfg,
            scope,
            "RelayPoolTimeouts",
            cfg.alerts["pool_timeouts"],
            series("relay_pool_timeouts_total", scope.raw()),
            "relay",
            "found no free pooled connection within the pool timeout (or a full wait queue) and "
            "were answered 503",
            "Requests to upstream {{ $labels.upstream }} fail with 503: no pooled connection",
        ),
    ]


# -- upstreams -----------------------------------------------------------------------------


def ratio_alert(
    cfg: Config,
    scope: Scope,
    name: str,
    knobs: dict[str, Any],
    numerator: str,
    owner: str,
    what: str,
    summary: str,
) -> dict[str, Any]:
    """A share of an upstream's requests above ``ratio``, ignored below ``min_request_rate``."""
    routed = scope.raw(ROUTED)
    total = f"sum by ({BY}) (rate(relay_requests_total{{{routed}}}[5m]))"
    expr = (
        f"(\n  sum by ({BY}) (rate({numerator}[5m]))\n  /\n  {total}\n)"
        f"\n> {number(knobs['ratio'])}\nand\n{total} > {number(knobs['min_request_rate'])}"
    )
    return alert(
        cfg,
        name,
        expr,
        knobs["for"],
        "warning",
        owner,
        summary,
        f"{{{{ $value | humanizePercentage }}}} of requests to upstream "
        f"{{{{ $labels.upstream }}}} {what} over the last 5m, above "
        f"{percent(knobs['ratio'])} for {knobs['for']} (counted above "
        f"{number(knobs['min_request_rate'])} request/s).",
    )


def upstream_alerts(cfg: Config, scope: Scope) -> list[dict[str, Any]]:
    a = cfg.alerts
    connect = "|".join(CONNECT_REASONS)
    stopped = a["traffic_stopped"]
    routed = scope.raw(ROUTED)
    return [
        ratio_alert(
            cfg,
            scope,
            "RelayUpstreamConnectFailures",
            a["connect_failures"],
            series("relay_upstream_errors_total", scope.raw(f'reason=~"{connect}"')),
            "upstream",
            "failed because Relay could not connect (refused, DNS, or connect timeout)",
            "Relay cannot connect to upstream {{ $labels.upstream }}",
        ),
        ratio_alert(
            cfg,
            scope,
            "RelayUpstreamResetSpike",
            a["upstream_reset_spike"],
            series("relay_disconnects_total", scope.raw('side="upstream"')),
            "upstream",
            "were cut by the upstream closing or resetting the connection",
            "Upstream {{ $labels.upstream }} is closing or resetting connections",
        ),
        ratio_alert(
            cfg,
            scope,
            "RelayClientDisconnectSpike",
            a["client_disconnect_spike"],
            series("relay_disconnects_total", scope.raw('side="client"')),
            "upstream",
            "ended with the client hanging up (before the response or mid-body)",
            "Clients of upstream {{ $labels.upstream }} are hanging up",
        ),
        ratio_alert(
            cfg,
            scope,
            "RelayUpstreamRetries",
            a["retries_high"],
            series("relay_upstream_retries_total", scope.raw()),
            "upstream",
            "were retried because a reused keep-alive connection had been closed by the upstream",
            "Upstream {{ $labels.upstream }} keeps closing idle keep-alive connections",
        ),
        alert(
            cfg,
            "RelayUpstreamTrafficStopped",
            f"sum by ({BY}) (rate(relay_requests_total{{{routed}}}[{stopped['window']}])) == 0"
            f"\nand\nsum by ({BY}) (rate(relay_requests_total{{{routed}}}"
            f"[{stopped['baseline']}] offset {stopped['window']})) > "
            f"{number(stopped['min_request_rate'])}",
            stopped["for"],
            "warning",
            "upstream",
            "No requests reach upstream {{ $labels.upstream }} any more",
            "Relay has proxied no request to upstream {{ $labels.upstream }} for "
            f"{stopped['window']}, after more than {number(stopped['min_request_rate'])} "
            f"request/s over the {stopped['baseline']} before. Clients stopped calling it, or "
            "a route change sends its traffic elsewhere (see RelayUnroutedTraffic). It "
            f"resolves about {stopped['baseline']} after it fired, even if no traffic came back.",
        ),
    ]


def groups(cfg: Config, scope: Scope) -> list[dict[str, Any]]:
    # Alerts sit after the series they read, in the same group: rules of a group are
    # evaluated in order, so each evaluation sees the ratios of the same instant (the
    # fast-burn holds are shorter than some evaluation intervals).
    return [
        {
            "name": "relay-slo-errors",
            "rules": slo_records(cfg, scope, "errors") + burn_rate_alerts(cfg, scope, "errors"),
        },
        {
            "name": "relay-slo-latency",
            "rules": slo_records(cfg, scope, "slow") + burn_rate_alerts(cfg, scope, "slow"),
        },
        {"name": "relay-availability", "rules": availability_alerts(cfg, scope)},
        {"name": "relay-proxy", "rules": proxy_alerts(cfg, scope)},
        {"name": "relay-pool", "rules": pool_alerts(cfg, scope)},
        {"name": "relay-upstreams", "rules": upstream_alerts(cfg, scope)},
    ]
