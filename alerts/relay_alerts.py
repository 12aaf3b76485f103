"""Relay's alerts beyond the SLOs: is it there, Relay itself, its pools, and what its
upstreams do; and the rule groups of one deployment. Shared helpers and the SLO rules are in
``relay_rules.py``.
"""

from __future__ import annotations

from typing import Any

from relay_rules import (
    BY,
    BY_DEPLOYMENT,
    BY_POD,
    CONNECT_REASONS,
    ROUTED,
    Config,
    Scope,
    alert,
    burn_rate_alerts,
    human_seconds,
    number,
    percent,
    series,
    slo_records,
)

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
            # The keep-alive race only: route policies' retries follow failures that other
            # alerts report by their own reason.
            series("relay_upstream_retries_total", scope.raw('reason="stale_connection"')),
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


def endpoint_alerts(cfg: Config, scope: Scope) -> list[dict[str, Any]]:
    """Upstreams that are many endpoints: each pod's view of them, by state."""
    none, ejected = cfg.alerts["no_healthy_endpoint"], cfg.alerts["endpoints_ejected"]
    healthy = series("relay_upstream_endpoints", scope.raw('state="healthy"'))
    out = series("relay_upstream_endpoints", scope.raw('state="ejected"'))
    active = series("relay_upstream_endpoints", scope.raw('state!="draining"'))
    return [
        alert(
            cfg,
            "RelayUpstreamNoHealthyEndpoint",
            f"max by ({BY}) ({healthy}) == 0",
            none["for"],
            "critical",
            "upstream",
            "Upstream {{ $labels.upstream }} has no healthy endpoint",
            "No relay pod has seen a healthy endpoint of upstream {{ $labels.upstream }} for "
            f"{none['for']}: every endpoint is ejected, failing its health check or draining, "
            "or discovery found none. Every request to it is answered 503 "
            "(reason no_healthy_endpoint).",
        ),
        alert(
            cfg,
            "RelayUpstreamEndpointsEjected",
            f"sum by ({BY}) ({out})\n  /\nsum by ({BY}) ({active})\n"
            f"> {number(ejected['ratio'])}",
            ejected["for"],
            "warning",
            "upstream",
            "Most endpoints of upstream {{ $labels.upstream }} are ejected",
            "{{ $value | humanizePercentage }} of the endpoints of upstream "
            "{{ $labels.upstream }} (averaged over the relay pods) have been ejected by outlier "
            f"detection, above {percent(ejected['ratio'])} for {ejected['for']}: the remaining "
            "ones carry all of its traffic, and outlier.max_ejection_percent keeps the rest in "
            "use even while they fail.",
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
        {"name": "relay-endpoints", "rules": endpoint_alerts(cfg, scope)},
    ]
