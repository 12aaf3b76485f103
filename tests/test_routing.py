"""Route matching: Host first, then the longest prefix on a segment boundary."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import RouteConfig
from service.exchange import bare_host
from service.route_index import find_conflict
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


# -- the index against the linear scan it replaced ----------------------------------------


class LinearRouter:
    """The reference: every route in precedence order, the first that matches wins."""

    def __init__(self, routes: list[RouteConfig]) -> None:
        def key(route: RouteConfig) -> tuple[int, int]:
            host_rank = 0 if route.host is None else (1 if route.host.startswith("*.") else 2)
            return (-host_rank, -len(route.prefix))

        self.routes = sorted(routes, key=key)

    def match(self, host: str | None, path: str) -> RouteConfig | None:
        bare = bare_host(host)
        for r in self.routes:
            if r.host is not None and (bare is None or not host_matches(r.host.lower(), bare)):
                continue
            if prefix_matches(r.prefix, path):
                return r
        return None


def host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    stem = prefix.rstrip("/")
    return path == stem or path.startswith(stem + "/")


# Few pieces, so that routes share segments and labels and requests hit them often.
LABELS = ["a", "B", "api", "Api", "w7", "x-1", "0"]
SEGMENTS = ["api", "API", "v1", "", "café", "ü", "a.b", "x"]
labels = st.sampled_from(LABELS)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
hosts = st.one_of(st.none(), domains, domains.map(lambda d: "*." + d))
prefixes = st.builds(
    lambda segments, slashes: "/" + "/".join(segments) + "/" * slashes,
    st.lists(st.sampled_from(SEGMENTS), max_size=3),
    st.integers(0, 2),
)
route_lists = st.lists(st.tuples(prefixes, hosts), min_size=1, max_size=10).map(
    lambda pairs: [route(p, f"u{i}", host=h) for i, (p, h) in enumerate(pairs)]
)


@st.composite
def requests(draw: st.DrawFn, routes: list[RouteConfig]) -> tuple[str | None, str]:
    """A Host and path, mostly made of the config's own hosts and prefixes."""
    configured = [r.host for r in routes if r.host is not None]
    host = draw(
        st.one_of(
            st.sampled_from([None, "", "[::1]:8080", "zz"]),
            domains,
            st.lists(labels, max_size=2).flatmap(
                lambda front: st.sampled_from(configured or ["a"]).map(
                    lambda h: ".".join([*front, h.removeprefix("*.")])
                )
            ),
            # The wildcard's suffix alone (".example.com") matches none.
            st.sampled_from(configured or ["a"]).map(lambda h: h.removeprefix("*")),
        )
    )
    if host and draw(st.booleans()):
        host = draw(st.sampled_from([host.upper(), host.title(), host + ":8443"]))
    base = draw(st.sampled_from([r.prefix for r in routes] + ["/"]))
    tail = draw(st.lists(st.sampled_from([*SEGMENTS, "zz"]), max_size=3))
    joined = "/".join([base.rstrip("/"), *tail])
    path = draw(st.sampled_from([base, base.rstrip("/"), joined, "*"]))  # "*": OPTIONS *
    return host, path


def witness(r: RouteConfig) -> tuple[str | None, str]:
    """The request most in favour of ``r``: only routes covering all of its requests (and
    its duplicates) also match it, so ``r`` can match something iff it matches this."""
    host = None if r.host is None else ("zz" + r.host[1:] if r.host.startswith("*.") else r.host)
    return host, "/zz" if r.prefix == "/" else r.prefix.rstrip("/")


PROPERTIES = settings(max_examples=400, deadline=None, database=None, derandomize=True)


@PROPERTIES
@given(st.data(), route_lists)
def test_index_agrees_with_the_linear_scan(data: st.DataObject, routes: list[RouteConfig]) -> None:
    index, reference = Router(routes), LinearRouter(routes)
    for host, path in [*map(witness, routes), *data.draw(st.lists(requests(routes), max_size=20))]:
        assert index.match(host, path) is reference.match(host, path), (host, path)


@PROPERTIES
@given(st.data(), route_lists)
def test_a_route_reported_as_never_matching_never_does(
    data: st.DataObject, routes: list[RouteConfig]
) -> None:
    reference = LinearRouter(routes)
    conflict = find_conflict(routes)
    if conflict is None:
        # Accepted: every route gets the request most in its favour.
        assert all(reference.match(*witness(r)) is r for r in routes)
        return
    loser, other = routes[conflict.route], routes[conflict.other]
    if conflict.duplicate:
        assert (loser.host or "").lower() == (other.host or "").lower()
        assert loser.prefix.rstrip("/") == other.prefix.rstrip("/")
    else:
        assert reference.match(*witness(loser)) is other
    for host, path in [witness(loser), *data.draw(st.lists(requests(routes), max_size=20))]:
        # Only origin-form targets get routed ("/" and "//" differ on "*" alone).
        if path.startswith("/"):
            assert reference.match(host, path) is not loser, (host, path)


def test_precedence_spans_every_matching_wildcard_and_prefix() -> None:
    """The longest prefix as written wins across all the wildcards a Host matches, and
    trailing slashes count in its length (as they always have)."""
    router = Router(
        [
            route("/", "short", host="*.example.com"),
            route("/a", "specific-host", host="*.b.example.com"),
            route("/a///", "slashes", host="*.example.com"),
            route("/a/b", "deeper", host="*.example.com"),
        ]
    )
    assert upstream_for_in(router, "x.b.example.com", "/a/b/c") == "slashes"
    assert upstream_for_in(router, "x.b.example.com", "/z") == "short"
    assert upstream_for_in(router, "b.example.com", "/a") == "slashes"
    assert upstream_for_in(router, ".example.com", "/a") is None
    assert upstream_for_in(router, "example.com", "/a") is None


def test_a_host_of_many_labels_is_matched_like_any_other() -> None:
    router = Router([route("/", "wild", host="*.example.com")])
    assert upstream_for_in(router, "a." * 30_000 + "example.com", "/") == "wild"
    assert upstream_for_in(router, "a." * 30_000 + "example.org", "/") is None
