"""The one metrics scraper: the admin listener's ``/metrics``, parsed by prometheus-client's
own parser, and the sums tests take over its samples."""

from __future__ import annotations

from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import http_client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""(sample name, its label pairs) -> value."""


def samples(text: str) -> Samples:
    """Every sample of an exposition in the text format."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and wanted <= ls)


def exposition(admin_url: str) -> str:
    """The text of ``/metrics`` (blocking)."""
    response = httpx.get(f"{admin_url}/metrics", timeout=5)
    return response.raise_for_status().text


async def exposition_async(admin_url: str) -> str:
    """The text of ``/metrics``, from inside the event loop."""
    async with http_client(timeout=5) as client:
        response = await client.get(f"{admin_url}/metrics")
    return response.raise_for_status().text


def scrape(admin_url: str) -> Samples:
    """Every sample ``/metrics`` shows now (blocking)."""
    return samples(exposition(admin_url))


async def scrape_async(admin_url: str) -> Samples:
    """Every sample ``/metrics`` shows now, from inside the event loop."""
    return samples(await exposition_async(admin_url))


class Relay(Protocol):
    admin_url: str


async def metric(relay: Relay, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, scraped now."""
    return value(await scrape_async(relay.admin_url), name, **labels)
