"""Route matching: Host first, then the longest prefix on a segment boundary."""

from __future__ import annotations

from service.config import RouteConfig
from service.routing import Router, rewrite_path


def route(prefix: str, upstream: str, host: str | None = None, strip: bool = False) -> RouteConfig:
    return RouteConfig(prefix=prefix, upstream=upstream, host=host, strip_prefix=strip)


ROUTER = Router(
    [
        route("/", "default"),
        route("/api", "api"),
        route("/api/v2", "v2"),
        route("/", "exact-host", host="app.example.com"),
        route("/", "wild-host", host="*.example.com"),
    ]
)


def upstream_for(host: str | None, path: str) -> str | None:
    match = ROUTER.match(host, path)
    return match.upstream if match else None


def test_longest_prefix_on_segment_boundary() -> None:
    assert upstream_for("other", "/api") == "api"
    assert upstream_for("other", "/api/") == "api"
    assert upstream_for("other", "/api/v2/users") == "v2"
    assert upstream_for("other", "/apix") == "default"
    assert upstream_for(None, "/") == "default"


def test_host_routes_win_exact_over_wildcard() -> None:
    assert upstream_for("app.example.com", "/api") == "exact-host"
    assert upstream_for("APP.example.com:8080", "/x") == "exact-host"
    assert upstream_for("other.example.com", "/x") == "wild-host"
    assert upstream_for("example.com", "/x") == "default"


def test_no_route() -> None:
    assert Router([route("/api", "api")]).match(None, "/other") is None


def test_host_forms() -> None:
    router = Router([route("/", "ip", host="127.0.0.1"), route("/", "dotted", host="a.b.c")])
    assert upstream_for_in(router, "127.0.0.1:8080", "/") == "ip"
    assert upstream_for_in(router, "[::1]:8080", "/") is None
    assert upstream_for_in(router, "A.B.C", "/") == "dotted"
    assert upstream_for_in(router, "a.b.c:443", "/") == "dotted"
    assert upstream_for_in(router, None, "/") is None
    assert upstream_for_in(router, "", "/") is None


def upstream_for_in(router: Router, host: str | None, path: str) -> str | None:
    match = router.match(host, path)
    return match.upstream if match else None


def test_strip_prefix_keeps_encoding() -> None:
    r = route("/api/", "api", strip=True)
    assert rewrite_path(r, b"/api/a%2Fb") == b"/a%2Fb"
    assert rewrite_path(r, b"/api") == b"/"
    assert rewrite_path(route("/api", "api"), b"/api/x") == b"/api/x"
    assert rewrite_path(route("/", "root", strip=True), b"/x%20y") == b"/x%20y"


def test_strip_prefix_the_client_percent_encoded() -> None:
    """Routes match the decoded path; the prefix must come off the raw one all the same."""
    assert rewrite_path(route("/api", "api", strip=True), b"/%61pi/a%2Fb") == b"/a%2Fb"
    assert rewrite_path(route("/api", "api", strip=True), b"/%61%70%69") == b"/"
    cafe = route("/café/v1", "cafe", strip=True)
    assert rewrite_path(cafe, b"/caf%C3%A9/v1/x") == b"/x"
    assert rewrite_path(cafe, b"/caf%c3%a9/v1") == b"/"
    assert rewrite_path(cafe, "/café/v1/raw-utf8".encode()) == b"/raw-utf8"
