"""Config: validated once, errors name the field, env overrides the file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from service.config import ConfigError, Settings, load_settings

VALID = """
upstreams:
  api: {url: "http://127.0.0.1:9999"}
routes:
  - {prefix: /, upstream: api}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return path


def test_builtin_default_proxies_to_the_demo_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    settings = load_settings()
    assert settings.demo.enabled
    assert str(settings.upstreams["demo"].url).startswith("http://127.0.0.1:8081")
    assert settings.routes[0].upstream == "demo"
    assert settings.server.drain_delay_seconds == 0  # Ctrl-C stops the demo at once


def test_env_overrides_merge_into_the_builtin_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_SERVER__PORT", "18080")
    settings = load_settings()
    assert (settings.server.port, settings.server.drain_delay_seconds) == (18080, 0)
    monkeypatch.setenv("RELAY_SERVER__DRAIN_DELAY_SECONDS", "3")
    assert load_settings().server.drain_delay_seconds == 3


def test_builtin_upstream_follows_the_demo_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving the demo listener (say, 8081 is taken) moves the route's upstream with it."""
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_DEMO__PORT", "28081")
    settings = load_settings()
    assert settings.demo.port == 28081
    assert str(settings.upstreams["demo"].url).startswith("http://127.0.0.1:28081")


def test_valid_file_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    api = settings.upstreams["api"]
    assert api.transport == "aiohttp"
    assert api.pool.max_connections == 100
    assert api.timeouts.pool == 5.0
    assert not settings.demo.enabled


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SERVER__PORT", "18000")
    monkeypatch.setenv("RELAY_LOG__FORMAT", "text")
    monkeypatch.setenv("RELAY_CONFIG", str(write(tmp_path, VALID)))
    settings = load_settings()
    assert settings.server.port == 18000
    assert settings.log.format == "text"
    assert "api" in settings.upstreams


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (VALID + "bogus: 1\n", "bogus"),
        (VALID.replace("routes:", "server: {port: 99999}\nroutes:"), "server.port"),
        (
            VALID.replace(
                '{url: "http://127.0.0.1:9999"}',
                '{url: "http://127.0.0.1:9999", timeouts: {connect: -1}}',
            ),
            "upstreams.api.timeouts.connect",
        ),
        (VALID.replace('"http://127.0.0.1:9999"', '"ftp://x"'), "upstreams.api.url"),
        (VALID.replace("upstream: api}", "upstream: nope}"), "routes.0.upstream"),
        (VALID.replace("prefix: /,", "prefix: nope,"), "routes.0.prefix"),
        (VALID + "  - {prefix: /, upstream: api}\n", "routes.1"),
        (
            VALID.replace(
                '{url: "http://127.0.0.1:9999"}',
                '{url: "http://127.0.0.1:9999", pool: {max_connections: 2, '
                "max_keepalive_connections: 5}}",
            ),
            "upstreams.api.pool",
        ),
        ("upstreams: {}\nroutes: []\n", "upstreams"),
        ("upstreams: [\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("", "upstreams"),
        # Wrong types.
        (
            VALID.replace('"http://127.0.0.1:9999"}', '"http://127.0.0.1:9999", pool: 3}'),
            "upstreams.api.pool",
        ),
        (
            VALID.replace(
                '"http://127.0.0.1:9999"}',
                '"http://127.0.0.1:9999", pool: {max_connections: lots}}',
            ),
            "upstreams.api.pool.max_connections",
        ),
        (
            VALID.replace('"http://127.0.0.1:9999"}', '"http://127.0.0.1:9999", transport: h3}'),
            "upstreams.api.transport",
        ),
        (VALID + "server: {trusted_proxies: [not-a-network]}\n", "server.trusted_proxies.0"),
        (VALID + "server: {drain_delay_seconds: soon}\n", "server.drain_delay_seconds"),
        (VALID.replace("routes:", "log: {level: LOUD}\nroutes:"), "log.level"),
        (VALID.replace("upstreams:\n  api:", "upstreams:\n  'bad name':"), "upstreams.bad name"),
        (
            VALID.replace("{prefix: /, upstream: api}", "{prefix: /, upstream: api, x: 1}"),
            "routes.0.x",
        ),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert field in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_settings(tmp_path / "missing.yaml")


def test_env_overrides_nested_upstream_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_UPSTREAMS__API__TIMEOUTS__READ", "7")
    monkeypatch.setenv("RELAY_SERVER__TRUSTED_PROXIES", '["10.0.0.0/8"]')
    settings = load_settings(write(tmp_path, VALID))
    api = settings.upstreams["api"]
    assert api.timeouts.read == 7.0
    assert str(api.url).startswith("http://127.0.0.1:9999")  # the rest of the file stays
    assert [str(n) for n in settings.server.trusted_proxies] == ["10.0.0.0/8"]


def test_invalid_env_value_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(write(tmp_path, VALID))


def routes_config(*routes: str) -> str:
    return VALID.split("routes:")[0] + "routes:\n" + "".join(f"  - {r}\n" for r in routes)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        # /api/ is the longer prefix: /api is the one that never matches.
        (
            ["{prefix: /api, upstream: api}", "{prefix: /api/, upstream: api}"],
            "routes.0: duplicate route: routes.1 has the same host and prefix "
            "(no host, prefix '/api/' is longer than '/api'), so this one never matches",
        ),
        (
            [
                "{prefix: /, host: App.example.com, upstream: api}",
                "{prefix: /, host: app.EXAMPLE.com, upstream: api}",
            ],
            "routes.1: duplicate route: routes.0 has the same host and prefix "
            "(host 'App.example.com', prefix '/' is as long as '/' and earlier)",
        ),
        (["{prefix: /, upstream: api}", "{prefix: //, upstream: api}"], "routes.0: duplicate"),
        # Equal prefixes on every wildcard the Host matches: the earlier route wins.
        (
            [
                "{prefix: /, host: '*.example.com', upstream: api}",
                "{prefix: /, host: '*.a.example.com', upstream: api}",
            ],
            "routes.1: shadowed route: routes.0 takes every request it would match "
            "(host '*.example.com', prefix '/' is as long as '/' and earlier), "
            "so this one never matches",
        ),
        # The longer prefix as written wins, trailing slashes and all.
        (
            ["{prefix: /api, upstream: api}", "{prefix: /a///, upstream: api}",
             "{prefix: /a/b, upstream: api}"],
            "routes.2: shadowed route: routes.1 takes every request it would match "
            "(no host, prefix '/a///' is longer than '/a/b')",
        ),
    ],
)  # fmt: skip
def test_routes_that_never_match_are_refused(
    tmp_path: Path, routes: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, routes_config(*routes)))
    assert str(info.value).startswith(f"invalid config: {message}")
    assert "\n" not in str(info.value)


def test_routes_that_can_match_are_accepted(tmp_path: Path) -> None:
    routes = [
        "{prefix: /api, upstream: api}",
        "{prefix: /api/v1, upstream: api}",
        "{prefix: /apix, upstream: api}",
        "{prefix: /, upstream: api}",
        "{prefix: /api, host: a.example.com, upstream: api}",
        "{prefix: /api, host: '*.example.com', upstream: api}",
        # Earlier than the wider wildcard with the same prefix: it wins its own hosts.
        "{prefix: /, host: '*.b.example.com', upstream: api}",
        "{prefix: /, host: '*.example.com', upstream: api}",
    ]
    assert len(load_settings(write(tmp_path, routes_config(*routes))).routes) == 8


def ten_thousand_routes() -> list[dict[str, str]]:
    """Distinct routes on shared prefixes and hosts, a third each with no, an exact and a
    wildcard Host."""
    routes = []
    for i in range(10_000):
        route = {"prefix": f"/team{i % 100}/svc{i}", "upstream": "api"}
        if i % 3:
            route["host"] = ("", f"svc{i % 50}.example.com", f"*.svc{i % 50}.example.com")[i % 3]
        routes.append(route)
    return routes


def test_ten_thousand_distinct_routes_validate(tmp_path: Path) -> None:
    routes = ten_thousand_routes()
    assert len(load_settings(write(tmp_path, VALID), routes=routes).routes) == 10_000
    # ... and every one of them was looked at: a duplicate at the end is found.
    with pytest.raises(ConfigError, match=r"routes\.10000: duplicate route: routes\.9999 "):
        load_settings(write(tmp_path, VALID), routes=[*routes, routes[-1]])


@pytest.mark.live
@pytest.mark.parametrize(
    ("text", "field"),
    [
        (VALID.replace("upstream: api}", "upstream: nope}"), "routes.0.upstream"),
        (
            VALID.replace(
                '{url: "http://127.0.0.1:9999"}',
                '{url: "http://127.0.0.1:9999", timeouts: {connect: 0}}',
            ),
            "upstreams.api.timeouts.connect",
        ),
        ("upstreams: {api: {url: 1}\n", "invalid YAML"),
    ],
)
def test_cli_exits_2_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert field in result.stderr
    assert result.stderr.startswith("relay: ")
    assert "Traceback" not in result.stderr


@pytest.mark.live
def test_cli_check_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "--config",
            str(write(tmp_path, VALID)),
            "--check-config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"api"' in result.stdout


def test_keepalive_defaults_to_max_connections(tmp_path: Path) -> None:
    pool = '"http://127.0.0.1:9999", pool: {max_connections: 10}}'
    settings = load_settings(write(tmp_path, VALID.replace('"http://127.0.0.1:9999"}', pool)))
    assert settings.upstreams["api"].pool.max_keepalive_connections == 10
    explicit = '"http://127.0.0.1:9999", pool: {max_connections: 10, max_keepalive_connections: 4}}'
    settings = load_settings(write(tmp_path, VALID.replace('"http://127.0.0.1:9999"}', explicit)))
    assert settings.upstreams["api"].pool.max_keepalive_connections == 4


def test_keepalive_defaults_to_max_connections_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_UPSTREAMS__API__POOL__MAX_CONNECTIONS", "12")
    settings = load_settings(write(tmp_path, VALID))
    assert settings.upstreams["api"].pool.max_keepalive_connections == 12


def test_a_bad_max_connections_is_reported_once(tmp_path: Path) -> None:
    bad = '"http://127.0.0.1:9999", pool: {max_connections: lots}}'
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, VALID.replace('"http://127.0.0.1:9999"}', bad)))
    assert "max_keepalive" not in str(info.value)
    assert "upstreams.api.pool.max_connections" in str(info.value)


def test_unknown_field_without_a_close_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, VALID + "server: {zzz: 1}\n"))
    assert "server.zzz: unknown field (known: host, port, admin_host," in str(info.value)


def test_error_from_a_whole_section_variable_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_SERVER", '{"port": "x"}')
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, VALID))
    assert str(info.value).startswith(
        """invalid config: RELAY_SERVER='{"port": "x"}': server.port:"""
    )


def test_file_errors_name_no_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SERVER__ADMIN_PORT", "9999")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, VALID + "server: {port: abc}\n"))
    assert str(info.value).startswith("invalid config: server.port: Input should be a valid")


# The mistakes users make, each through the real command: exit 2 and exactly one line on
# stderr saying what to change.
CONFIG_MISTAKES = [
    pytest.param(
        VALID.replace('"http://127.0.0.1:9999"', '"127.0.0.1:8081"'),
        {},
        "relay: invalid config: upstreams.api.url: '127.0.0.1:8081' has no scheme: the URL "
        "needs http:// or https://, e.g. http://127.0.0.1:8081",
        id="url-without-scheme",
    ),
    pytest.param(
        VALID.replace(
            '"http://127.0.0.1:9999"}',
            '"http://127.0.0.1:9999", pool: {max_connections: 10, max_keepalive_connections: 20}}',
        ),
        {},
        "relay: invalid config: upstreams.api.pool: max_keepalive_connections (20) must not "
        "exceed max_connections (10)",
        id="keepalive-above-max",
    ),
    pytest.param(
        VALID,
        {"RELAY_SERVER__PORT": "abc"},
        "relay: invalid config: RELAY_SERVER__PORT=abc: server.port: Input should be a valid "
        "integer, unable to parse string as an integer",
        id="env-variable",
    ),
    pytest.param(
        VALID.replace(
            "{prefix: /, upstream: api}", "{prefix: /, upstream: api, strip_prefx: true}"
        ),
        {},
        "relay: invalid config: routes.0.strip_prefx: unknown field, did you mean strip_prefix?",
        id="unknown-field-typo",
    ),
    pytest.param(
        VALID,
        {"RELAY_SERVER__DRAIN_DELAY": "1"},
        "relay: invalid config: RELAY_SERVER__DRAIN_DELAY=1: server.drain_delay: unknown "
        "field, did you mean drain_delay_seconds?",
        id="unknown-env-field",
    ),
]


@pytest.mark.live
@pytest.mark.parametrize(("text", "env", "expected"), CONFIG_MISTAKES)
def test_cli_says_what_to_change(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )
    assert result.returncode == 2
    assert result.stderr == expected + "\n"
    assert result.stdout == ""


@pytest.mark.live
def test_pool_below_the_default_keepalive_starts(tmp_path: Path) -> None:
    """Lowering max_connections alone is a valid config (it used to need a second field)."""
    text = VALID.replace(
        '"http://127.0.0.1:9999"}', '"http://127.0.0.1:9999", pool: {max_connections: 10}}'
    )
    result = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(write(tmp_path, text)), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pool = json.loads(result.stdout)["upstreams"]["api"]["pool"]
    assert (pool["max_connections"], pool["max_keepalive_connections"]) == (10, 10)


def test_start_up_summary_of_a_large_config_stays_one_short_line() -> None:
    from service.config import SUMMARY_ITEMS, Settings, summary

    count = 1000
    settings = Settings(
        upstreams={f"u{n}": {"url": f"http://127.0.0.1:{20000 + n}"} for n in range(count)},
        routes=[{"prefix": f"/svc{n}", "upstream": f"u{n}"} for n in range(count)],
    )
    line = summary(settings, Path("relay.yaml"))
    last = SUMMARY_ITEMS - 1
    more = f" and {count - SUMMARY_ITEMS} more ({count} in all)"
    assert f"/svc{last} -> u{last}{more}; upstreams: " in line
    assert line.endswith(f"u{last} http://127.0.0.1:{20000 + last}/{more}")
    assert len(line) < 2000


def test_the_readme_configuration_reference_names_every_field() -> None:
    """Every field of the settings, nested ones included, appears as ``name:`` in the
    README's *Configuration* section (its reference block, with its default)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]

    def fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
        for name, field in model.model_fields.items():
            yield prefix + name
            for kind in (*getattr(field.annotation, "__args__", ()), field.annotation):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    yield from fields(kind, f"{prefix}{name}.")
                    break

    every = list(fields(Settings))
    assert len(every) > 100
    missing = [
        path
        for path in every
        if not re.search(r"(^|[\s{(])" + re.escape(path.rsplit(".", 1)[-1]) + ":", section, re.M)
    ]
    assert missing == []
