"""Request ids and the access-log fields operators join on: the rules as small functions, then
over real sockets (a real uvicorn server, real upstreams on loopback) for ids generated, kept,
replaced and returned on every kind of answer, on the server span, and in JSON and text
access lines for a direct and a trusted-forwarded client."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from service.config import ConfigError, LogConfig, load_settings
from service.config_routes import RESERVED_HEADERS
from service.headers import CLAIMED_NAMES, FORWARDED_NAMES, HOP_BY_HOP, forwarded_client
from service.request_ids import MAX_LENGTH, acceptable, new_request_id
from service.telemetry.logs import configure
from service.telemetry.tracing import Instrumentation, Tracing
from tests.support.logs import Records
from tests.support.net import closed_port, eventually
from tests.support.recording import RecordingUpstream
from tests.support.relays import RunningRelay, run_relay
from tests.support.scripted import ScriptedUpstream, hang, reset_mid_body, respond, send_raw
from tests.support.tracing import in_memory
from tests.support.wire import connect, head, raw_exchange

GENERATED = re.compile(r"^[0-9a-f]{32}$")
LOOPBACK = "127.0.0.0/8"

# -- the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"0f8fad5b-d9cb-469f-a165-70867728950e",
        b"4bf92f3577b34da6a3ce929d0e0e4736",
        b"Root=1-67891233-abcdef012345678912345678",
        b"req_01:edge.a/b+c@d",
        b"x" * MAX_LENGTH,
    ],
)
def test_short_printable_tokens_are_acceptable(value: bytes) -> None:
    assert acceptable(value)


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * (MAX_LENGTH + 1), b"a b", b'a"b', b"a;b", b"a,b", b"a\tb", b"\xfc", b"<script>"],
    ids=["empty", "too-long", "space", "quote", "semicolon", "comma", "tab", "latin-1", "angle"],
)
def test_anything_else_is_not(value: bytes) -> None:
    assert not acceptable(value)


def test_new_ids_are_128_random_bits_in_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(GENERATED.match(value) for value in ids)


def test_every_header_the_proxy_rewrites_is_reserved() -> None:
    handled = HOP_BY_HOP | FORWARDED_NAMES | CLAIMED_NAMES | {b"host", b"content-length", b"via"}
    assert {name.decode() for name in handled} - RESERVED_HEADERS == set()


def config_file(tmp_path: Any, text: str) -> str:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "upstreams: {up: {url: 'http://127.0.0.1:1'}}\nroutes: [{prefix: /, upstream: up}]\n" + text
    )
    return str(path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("request_id: {header: 'X Request'}", "request_id.header: String should match"),
        ("request_id: {header: X-Forwarded-For}", "request_id.header: Value error"),
        ("request_id: {header: Traceparent}", "is a header the proxy sets or removes itself"),
        ("request_id: {keep_untrusted: maybe}", "request_id.keep_untrusted: Input should be"),
        ("log: {access_sample: 0}", "log.access_sample: Input should be greater than or equal"),
    ],
)
def test_bad_settings_are_named(tmp_path: Any, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file(tmp_path, text))
    assert error.replace("Value error", "") in str(caught.value).replace("Value error, ", "")


def test_settings_defaults_and_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(config_file(tmp_path, ""))
    assert (settings.request_id.header, settings.request_id.keep_untrusted) == (
        "X-Request-Id",
        False,
    )
    assert settings.log.access_sample == 1
    monkeypatch.setenv("RELAY_REQUEST_ID__HEADER", "X-Correlation-Id")
    monkeypatch.setenv("RELAY_LOG__ACCESS_SAMPLE", "10")
    settings = load_settings(config_file(tmp_path, ""))
    assert settings.request_id.header == "X-Correlation-Id"
    assert settings.log.access_sample == 10
    monkeypatch.setenv("RELAY_REQUEST_ID__HEADER", "Host")
    with pytest.raises(ConfigError, match=r"^invalid config: RELAY_REQUEST_ID__HEADER=Host: "):
        load_settings(config_file(tmp_path, ""))


NETS = [ipaddress.ip_network(LOOPBACK), ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("fields", "client"),
    [
        ([], "127.0.0.1"),
        (["198.51.100.9"], "198.51.100.9"),
        (["198.51.100.9, 10.1.2.3"], "198.51.100.9"),  # a trusted hop in between
        (["6.6.6.6, 198.51.100.9, 10.1.2.3"], "198.51.100.9"),  # left of the client: a claim
        (["6.6.6.6", "198.51.100.9"], "198.51.100.9"),  # several fields are one list
        (["10.9.9.9, 10.1.2.3"], "10.9.9.9"),  # all trusted: the farthest
        (["unknown, 10.1.2.3"], "10.1.2.3"),  # not an address: the last one reached
        (["198.51.100.9, garbage"], "127.0.0.1"),
        (["2001:DB8::1"], "2001:db8::1"),
        (["198.51.100.9:4711, 10.1.2.3:80"], "198.51.100.9"),  # ports, as some balancers add
        (["[2001:db8::7]:4711"], "2001:db8::7"),
        (["[2001:db8::7]"], "2001:db8::7"),
        (["198.51.100.9, 10.1.2.3:http"], "127.0.0.1"),  # not a port: not an address
        (["[2001:db8::7]:x"], "127.0.0.1"),
        (["[2001:db8::7"], "127.0.0.1"),
    ],
)
def test_the_forwarded_client_is_the_first_untrusted_address_from_the_right(
    fields: list[str], client: str
) -> None:
    headers = [(b"x-forwarded-for", value.encode()) for value in fields]
    assert forwarded_client(headers, "127.0.0.1", NETS) == client


# -- over real sockets ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    fields: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [value for field, value in self.fields if field == name]

    @property
    def request_id(self) -> str:
        (value,) = self.all("x-request-id")  # exactly one field
        return value


def parse(raw: bytes) -> Answer:
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.append((name.strip().lower(), value.strip()))
    return Answer(int(lines[0].split(" ", 2)[1]), fields, body)


async def get(url: str, path: str, *lines: str, version: str = "1.1") -> Answer:
    request = head(f"GET {path} HTTP/{version}", "host: edge.example", *lines, "connection: close")
    return parse(await raw_exchange(url, request))


@dataclass
class Rig:
    relay: RunningRelay
    recording: RecordingUpstream  # /api: answers 200, records every field as sent
    scripted: ScriptedUpstream  # /scripted

    def upstream_ids(self) -> list[bytes]:
        return self.recording.requests[-1].header(b"x-request-id")


async def rig(
    stack: AsyncExitStack,
    *,
    transport: str = "aiohttp",
    tracing: Tracing | None = None,
    **config: Any,
) -> Rig:
    """A relay in front of both upstreams (and a dead one), with ``config`` on top."""
    recording = await stack.enter_async_context(RecordingUpstream().running())
    scripted = await stack.enter_async_context(
        ScriptedUpstream(
            {
                "/scripted/own-id": respond(200, b"ok", {"x-request-id": "made-upstream"}),
                "/scripted/101": send_raw(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
                "/scripted/reset": reset_mid_body,
                "/scripted/hang": hang,
            }
        ).running()
    )
    settings = {
        "upstreams": {
            "api": {"url": recording.url, "transport": transport},
            "scripted": {
                "url": scripted.url,
                "transport": transport,
                "pool": {"max_connections": 1, "max_waiting": 0},
                "timeouts": {"read": 1},
            },
            "dead": {"url": f"http://127.0.0.1:{closed_port()}"},
        },
        "routes": [
            {"prefix": "/api", "upstream": "api"},
            {"prefix": "/scripted", "upstream": "scripted"},
            {"prefix": "/dead", "upstream": "dead"},
        ],
        "limits": {"max_request_target_bytes": 100},
        **config,
    }
    relay = await stack.enter_async_context(run_relay(settings, tracing=tracing))
    return Rig(relay, recording, scripted)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


def logged(record: logging.LogRecord, name: str) -> Any:
    return record.__dict__[name]


async def test_an_id_is_generated_sent_upstream_returned_and_logged(
    stack: AsyncExitStack, access: Records, transport: str
) -> None:
    rig_ = await rig(stack, transport=transport)
    first = await get(rig_.relay.url, "/api/a")
    assert first.status == 200
    assert GENERATED.match(first.request_id), first.request_id
    assert rig_.upstream_ids() == [first.request_id.encode()]
    second = await get(rig_.relay.url, "/api/b")
    assert second.request_id != first.request_id
    await eventually(lambda: len(access()) == 2)
    assert [logged(r, "request_id") for r in access()] == [first.request_id, second.request_id]


@pytest.mark.usefixtures("no_error_logs")
async def test_an_untrusted_clients_id_is_replaced(stack: AsyncExitStack) -> None:
    rig_ = await rig(stack)
    answer = await get(rig_.relay.url, "/api/a", "x-request-id: chosen-by-client")
    assert GENERATED.match(answer.request_id)
    assert rig_.upstream_ids() == [answer.request_id.encode()]


@pytest.mark.usefixtures("no_error_logs")
async def test_a_trusted_peers_id_is_kept(stack: AsyncExitStack, access: Records) -> None:
    rig_ = await rig(stack, server={"trusted_proxies": [LOOPBACK]})
    answer = await get(rig_.relay.url, "/api/a", "x-request-id: edge-42:a.b_c")
    assert answer.request_id == "edge-42:a.b_c"
    assert rig_.upstream_ids() == [b"edge-42:a.b_c"]
    await eventually(lambda: len(access()) == 1)
    assert logged(access()[0], "request_id") == "edge-42:a.b_c"


@pytest.mark.parametrize(
    "lines",
    [
        ["x-request-id: " + "x" * (MAX_LENGTH + 1)],
        ["x-request-id: has space"],
        ['x-request-id: "quoted"'],
        ["x-request-id: a;b=c"],
        ["x-request-id:"],
        ["x-request-id: one", "x-request-id: two"],
    ],
    ids=["too-long", "space", "quotes", "semicolon", "empty", "twice"],
)
@pytest.mark.usefixtures("no_error_logs")
async def test_a_malformed_id_is_replaced_even_from_a_trusted_peer(
    stack: AsyncExitStack, lines: list[str]
) -> None:
    rig_ = await rig(stack, server={"trusted_proxies": [LOOPBACK]})
    answer = await get(rig_.relay.url, "/api/a", *lines)
    assert GENERATED.match(answer.request_id), answer.request_id
    assert rig_.upstream_ids() == [answer.request_id.encode()]
    # The control: the longest acceptable id, from the same peer, is kept.
    longest = "x" * MAX_LENGTH
    assert (await get(rig_.relay.url, "/api/a", f"x-request-id: {longest}")).request_id == longest


@pytest.mark.usefixtures("no_error_logs")
async def test_keep_untrusted_keeps_any_clients_well_formed_id(stack: AsyncExitStack) -> None:
    rig_ = await rig(stack, request_id={"keep_untrusted": True})
    kept = await get(rig_.relay.url, "/api/a", "x-request-id: from-anyone")
    assert kept.request_id == "from-anyone"
    assert rig_.upstream_ids() == [b"from-anyone"]
    replaced = await get(rig_.relay.url, "/api/a", "x-request-id: not one")
    assert GENERATED.match(replaced.request_id)


@pytest.mark.usefixtures("no_error_logs")
async def test_the_header_name_is_configurable(stack: AsyncExitStack) -> None:
    rig_ = await rig(
        stack, server={"trusted_proxies": [LOOPBACK]}, request_id={"header": "X-Correlation-Id"}
    )
    answer = await get(
        rig_.relay.url, "/api/a", "x-correlation-id: corr-1", "x-request-id: other-system"
    )
    assert answer.all("x-correlation-id") == ["corr-1"]
    assert answer.all("x-request-id") == []
    seen = rig_.recording.requests[-1]
    assert seen.header(b"x-correlation-id") == [b"corr-1"]
    assert seen.header(b"x-request-id") == [b"other-system"]  # an ordinary header now


@pytest.mark.usefixtures("no_error_logs")
async def test_the_upstreams_own_id_never_reaches_the_client(stack: AsyncExitStack) -> None:
    rig_ = await rig(stack)
    answer = await get(rig_.relay.url, "/scripted/own-id")
    assert answer.status == 200
    assert GENERATED.match(answer.request_id)  # one field, the proxy's
    assert rig_.scripted.seen[-1].headers["x-request-id"] == answer.request_id


async def test_the_proxys_own_answers_carry_the_id(stack: AsyncExitStack, access: Records) -> None:
    rig_ = await rig(stack, server={"trusted_proxies": [LOOPBACK]})
    url = rig_.relay.url
    held = asyncio.create_task(get(url, "/scripted/hang", "x-request-id: held"))
    await eventually(lambda: len(rig_.scripted.seen) == 1)
    answers = {
        "no route": await get(url, "/nowhere", "x-request-id: r-404"),
        "refused upstream": await get(url, "/dead/x", "x-request-id: r-502"),
        "pool full": await get(url, "/scripted/more", "x-request-id: r-503"),
        "dot segment": await get(url, "/api/../etc", "x-request-id: r-400"),
        "read timeout": await held,
    }
    assert {what: (a.status, a.request_id) for what, a in answers.items()} == {
        "no route": (404, "r-404"),
        "refused upstream": (502, "r-502"),
        "pool full": (503, "r-503"),
        "dot segment": (400, "r-400"),
        "read timeout": (504, "held"),
    }
    # Refused before the headers were read: a new id, returned and logged all the same.
    too_long = await get(url, "/api/" + "a" * 200, "x-request-id: r-414")
    assert too_long.status == 414 and GENERATED.match(too_long.request_id)
    await eventually(lambda: len(access()) == 6)
    assert sorted((logged(r, "status"), logged(r, "request_id")) for r in access()) == sorted(
        [(a.status, a.request_id) for a in answers.values()] + [(414, too_long.request_id)]
    )


@pytest.mark.parametrize("mode", ["stock", "native"])
@pytest.mark.usefixtures("no_error_logs")
async def test_the_server_span_carries_the_id(stack: AsyncExitStack, mode: Instrumentation) -> None:
    tracing, exporter = in_memory(mode)
    rig_ = await rig(stack, tracing=tracing)
    answers = [await get(rig_.relay.url, path) for path in ("/api/a", "/dead/x", "/nowhere")]

    def servers() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]

    await eventually(lambda: len(servers()) == 3)
    assert sorted(s.attributes["relay.request_id"] for s in servers()) == sorted(
        a.request_id for a in answers
    )


# -- access-log fields, as written ------------------------------------------------------------

PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def text_fields(line: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a text access line (quoted values decoded)."""
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in PAIR.findall(line)
    }


@pytest.fixture
def written(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Configure logging as the process does and read back the access lines it wrote."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def lines(log_format: str) -> list[dict[str, Any]]:
        root.handlers[0].flush()
        out = capsys.readouterr().out.splitlines()
        if log_format == "json":
            records = [json.loads(line) for line in out if line.startswith("{")]
            return [r for r in records if r["logger"] == "relay.access"]
        return [text_fields(line) for line in out if " relay.access " in line]

    yield lines
    root.handlers[:] = handlers
    root.setLevel(level)


AGENT = "Mozilla/5.0 (X11; Linux x86_64) " + "x" * 300


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize("forwarded", [False, True], ids=["direct", "trusted-forwarded"])
async def test_access_fields_for_direct_and_forwarded_clients(
    stack: AsyncExitStack, written: Any, log_format: str, forwarded: bool
) -> None:
    configure(LogConfig(format=log_format))  # type: ignore[arg-type]
    tracing, exporter = in_memory("stock")
    trusted = [LOOPBACK, "10.0.0.0/8"] if forwarded else []
    rig_ = await rig(stack, server={"trusted_proxies": trusted}, tracing=tracing)
    xff = "x-forwarded-for: 6.6.6.6, 198.51.100.9, 10.1.2.3"
    new = await get(rig_.relay.url, "/api/a?q=1", xff, f"user-agent: {AGENT}")
    old = await get(rig_.relay.url, "/api/b", xff, version="1.0")
    assert (new.status, old.status) == (200, 200)
    await eventually(
        lambda: len([s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]) == 2
    )
    spans = {
        s.attributes["relay.request_id"]: s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.SERVER
    }
    lines = written(log_format)
    assert len(lines) == 2
    client = "198.51.100.9" if forwarded else "127.0.0.1"
    for line, answer, version in ((lines[0], new, "1.1"), (lines[1], old, "1.0")):
        assert line["request_id"] == answer.request_id
        assert line["client_addr"] == client
        assert line["peer_addr"] == "127.0.0.1"
        assert line["http_version"] == version
        span = spans[answer.request_id].context
        assert line["trace_id"] == format(span.trace_id, "032x")
        assert line["span_id"] == format(span.span_id, "016x")
        assert line.get("upstream_status") is None  # the client got what the upstream sent
    assert lines[0]["user_agent"] == AGENT[:256]
    assert lines[1].get("user_agent") is None


async def test_upstream_status_when_the_client_got_something_else(
    stack: AsyncExitStack, access: Records
) -> None:
    rig_ = await rig(stack)
    url = rig_.relay.url
    assert (await get(url, "/scripted/101")).status == 502
    reader, writer = await connect(url)
    writer.write(head("GET /scripted/reset HTTP/1.1", "host: t"))
    await writer.drain()
    async with asyncio.timeout(10):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):  # until the proxy cuts the connection
                pass
    writer.close()
    assert (await get(url, "/api/ok")).status == 200
    await eventually(lambda: len(access()) == 3)
    got = [
        (logged(r, "path"), logged(r, "status"), logged(r, "upstream_status"), logged(r, "outcome"))
        for r in access()
    ]
    assert got == [
        ("/scripted/101", 502, 101, "protocol"),
        ("/scripted/reset", 200, 200, "reset"),
        ("/api/ok", 200, None, "ok"),
    ]


async def test_access_sample_keeps_every_error_and_one_in_n_successes(
    stack: AsyncExitStack, access: Records
) -> None:
    rig_ = await rig(stack, log={"access_sample": 3})
    paths = [f"/api/{n}" for n in range(7)] + ["/nowhere", "/dead/x"]
    paths += [f"/api/{n}" for n in range(7, 14)] + ["/nowhere/last"]
    for path in paths:
        await get(rig_.relay.url, path)
    # Requests went one at a time: once the last one is logged, every earlier one was.
    await eventually(lambda: bool(access()) and logged(access()[-1], "path") == "/nowhere/last")
    assert [logged(r, "path") for r in access()] == [
        "/api/0",
        "/api/3",
        "/api/6",
        "/nowhere",
        "/dead/x",
        "/api/9",
        "/api/12",
        "/nowhere/last",
    ]
