"""Upstream TLS over real sockets: a local CA and certificates made here, an HTTPS upstream on
127.0.0.1, the proxy in front of it with each transport. Trust through ``ca_file``, mTLS,
``server_name`` for an IP URL, the minimum version, rotation of the files on disk, TLS
failures as their own reason, and bad files refused at start."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from service.app import check_tls_files
from service.config import ConfigError, Settings, deprecations, load_settings
from service.config_upstreams import UpstreamConfig
from service.errors import Reason
from tests.support.http import http_client
from tests.support.metrics import metric, scrape_async
from tests.support.net import eventually
from tests.support.relays import RunningRelay, one_upstream, run_relay, spawn_relay
from tests.support.tls import SecretVolume, TlsUpstream, pem, server_context

RELOAD = 0.05  # seconds between checks of the files, instead of 5


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def clients() -> trustme.CA:
    """The CA the upstream trusts for client certificates (mTLS)."""
    return trustme.CA()


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


async def start(stack: AsyncExitStack, url: str, transport: str, **tls: Any) -> RunningRelay:
    config = one_upstream(url, transport, tls={"reload_interval_seconds": RELOAD, **tls})
    return await stack.enter_async_context(run_relay(config))


async def get(relay: RunningRelay, path: str = "/x") -> tuple[int, str, str | None]:
    async with http_client(timeout=10) as client:
        response = await client.get(relay.url + path)
    return response.status_code, response.text, response.headers.get("proxy-status")


async def tls_errors(relay: RunningRelay) -> float:
    return await metric(relay, "relay_upstream_errors_total", upstream="up", reason="tls")


async def test_upstream_verified_through_ca_file(
    transport: str, ca: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    upstream = TlsUpstream(server_context(ca.issue_cert("127.0.0.1")))
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport, ca_file=ca_file)
        assert await get(relay, "/hello") == (200, "/hello", None)
        assert await tls_errors(relay) == 0


async def test_unknown_ca_is_a_tls_certificate_error(
    transport: str, ca: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    """Without ca_file the private CA is unknown: 502, reason tls, counted."""
    upstream = TlsUpstream(server_context(ca.issue_cert("127.0.0.1")))
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport)
        status, body, proxy_status = await get(relay)
        assert status == 502
        assert "TLS" in body
        assert proxy_status == 'relay; error=tls_certificate_error; next-hop="up"'
        assert await tls_errors(relay) == 1
        assert await metric(relay, "relay_upstream_errors_total", reason="connect") == 0


async def test_tls_failures_start_at_zero(transport: str, ca: trustme.CA) -> None:
    upstream = TlsUpstream(server_context(ca.issue_cert("127.0.0.1")))
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport)
        got = await scrape_async(relay.admin_url)
        labels = frozenset({("upstream", "up"), ("reason", Reason.TLS.value)})
        assert got[("relay_upstream_errors_total", labels)] == 0.0


async def test_mtls_client_certificate_presented(
    transport: str, ca: trustme.CA, clients: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    upstream = TlsUpstream(server_context(ca.issue_cert("127.0.0.1"), clients=clients))
    client = clients.issue_cert("relay.test", common_name="relay-client")
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    cert_file = write(tmp_path / "client.pem", pem(*client.cert_chain_pems))
    key_file = write(tmp_path / "client.key", client.private_key_pem.bytes())
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(
            stack, upstream.url, transport, ca_file=ca_file, cert_file=cert_file, key_file=key_file
        )
        assert (await get(relay))[0] == 200
        assert upstream.peers == ["relay-client"]


async def test_mtls_without_client_certificate_is_refused(
    transport: str, ca: trustme.CA, clients: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    """The upstream requires a client certificate: without one, its refusal is a TLS
    failure, not a reset. TLS 1.2, where the refusal is part of the handshake (with 1.3 it
    comes after, and can lose the race to a reset: README, *Upstream TLS*); OpenSSL's alert
    for a missing certificate there is handshake_failure, which names no certificate."""
    upstream = TlsUpstream(
        server_context(
            ca.issue_cert("127.0.0.1"), clients=clients, max_version=ssl.TLSVersion.TLSv1_2
        )
    )
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport, ca_file=ca_file)
        status, _, proxy_status = await get(relay)
        assert status == 502
        assert proxy_status == 'relay; error=tls_protocol_error; next-hop="up"'
        assert await tls_errors(relay) == 1
        assert upstream.peers == []


async def test_server_name_for_an_ip_url(
    transport: str, ca: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    """The certificate names billing.internal only; the URL holds 127.0.0.1. Without
    server_name the name check fails; with it, SNI and the check use that name."""
    upstream = TlsUpstream(server_context(ca.issue_cert("billing.internal")))
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    async with upstream.running(), AsyncExitStack() as stack:
        without = await start(stack, upstream.url, transport, ca_file=ca_file)
        status, _, proxy_status = await get(without)
        assert status == 502
        assert proxy_status is not None and "error=tls_certificate_error" in proxy_status
        assert "billing.internal" not in upstream.sni
        named = await start(
            stack, upstream.url, transport, ca_file=ca_file, server_name="billing.internal"
        )
        assert (await get(named))[:2] == (200, "/x")
        assert upstream.sni[-1] == "billing.internal"


async def test_min_version_refusal_is_a_tls_protocol_error(
    transport: str, ca: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    context = server_context(ca.issue_cert("127.0.0.1"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    upstream = TlsUpstream(context)
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport, ca_file=ca_file, min_version="1.3")
        status, _, proxy_status = await get(relay)
        assert status == 502
        assert proxy_status == 'relay; error=tls_protocol_error; next-hop="up"'
        assert await tls_errors(relay) == 1
        relaxed = await start(stack, upstream.url, transport, ca_file=ca_file)
        assert (await get(relaxed))[0] == 200


class Traffic:
    """Requests sent one after another until stopped: every status is kept."""

    def __init__(self, relay: RunningRelay) -> None:
        self.relay = relay
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with http_client(timeout=10) as client:
            while not self._stop.is_set():
                self.statuses.append((await client.get(self.relay.url + "/t")).status_code)

    def __enter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def settle(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)

    async def more(self, count: int) -> None:
        """Until ``count`` more requests have been answered."""
        target = len(self.statuses) + count
        await eventually(lambda: len(self.statuses) >= target, within=10)


async def test_rotated_ca_and_client_certificate_used_for_new_connections(
    transport: str, ca: trustme.CA, clients: trustme.CA, tmp_path: Path, no_error_logs: None
) -> None:
    """A Secret rotation, as Kubernetes writes it (one atomic swap of the volume's ..data
    link): first the new CA joins the bundle and the client certificate changes, then the
    upstream moves to a certificate of the new CA. Every request succeeds throughout, and
    new connections present the new client certificate and trust the new CA."""
    new_ca = trustme.CA()
    upstream_context = server_context(ca.issue_cert("127.0.0.1"), clients=clients)
    upstream = TlsUpstream(upstream_context)
    old_client = clients.issue_cert("relay.test", common_name="client-old")
    new_client = clients.issue_cert("relay.test", common_name="client-new")
    volume = SecretVolume(tmp_path / "secret")
    volume.write(
        {
            "ca.pem": ca.cert_pem.bytes(),
            "client.pem": pem(*old_client.cert_chain_pems),
            "client.key": old_client.private_key_pem.bytes(),
        }
    )
    files = {
        "ca_file": str(volume.path("ca.pem")),
        "cert_file": str(volume.path("client.pem")),
        "key_file": str(volume.path("client.key")),
    }
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport, **files)
        reloads = "relay_tls_reloads_total"
        got = await scrape_async(relay.admin_url)
        for result in ("success", "failure"):  # at 0 from the start
            assert got[(reloads, frozenset({("upstream", "up"), ("result", result)}))] == 0.0
        with Traffic(relay) as traffic:
            await traffic.more(3)
            volume.write(
                {
                    "ca.pem": pem(ca.cert_pem, new_ca.cert_pem),
                    "client.pem": pem(*new_client.cert_chain_pems),
                    "client.key": new_client.private_key_pem.bytes(),
                }
            )

            async def reloaded() -> bool:
                return await metric(relay, reloads, upstream="up", result="success") == 1

            for _ in range(200):
                if await reloaded():
                    break
                await asyncio.sleep(RELOAD)
            assert await reloaded()
            await traffic.more(3)
            assert upstream.peers[-1] == "client-new"
            new_ca.issue_cert("127.0.0.1").configure_cert(upstream_context)
            await traffic.more(3)
            await traffic.settle()
        assert set(traffic.statuses) == {200}
        assert upstream.peers[0] == "client-old"
        assert await metric(relay, reloads, upstream="up", result="failure") == 0
        assert await tls_errors(relay) == 0


async def test_broken_new_files_keep_the_previous_ones(
    transport: str, ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = TlsUpstream(server_context(ca.issue_cert("127.0.0.1")))
    volume = SecretVolume(tmp_path / "secret")
    volume.write({"ca.pem": ca.cert_pem.bytes()})
    async with upstream.running(), AsyncExitStack() as stack:
        relay = await start(stack, upstream.url, transport, ca_file=str(volume.path("ca.pem")))
        volume.write({"ca.pem": b"not a certificate\n"})
        reloads = "relay_tls_reloads_total"
        for _ in range(200):
            if await metric(relay, reloads, upstream="up", result="failure") == 1:
                break
            await asyncio.sleep(RELOAD)
        assert await metric(relay, reloads, upstream="up", result="failure") == 1
        assert (await get(relay))[0] == 200  # a new connection, with the previous CA
        assert any(
            "keeping the previous ones" in r.getMessage() and "ca_file" in r.getMessage()
            for r in caplog.records
        )
        assert await metric(relay, reloads, upstream="up", result="success") == 0


# -- bad files stop the start ----------------------------------------------------------------


def https(tmp_path: Path, **tls: Any) -> dict[str, Any]:
    return {
        "upstreams": {"billing": {"url": "https://billing.internal:8443", "tls": tls}},
        "routes": [{"prefix": "/", "upstream": "billing"}],
    }


def bad_configs(tmp_path: Path, ca: trustme.CA, clients: trustme.CA) -> dict[str, Any]:
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem.bytes())
    one, other = clients.issue_cert("a.test"), clients.issue_cert("b.test")
    cert = write(tmp_path / "client.pem", one.cert_chain_pems[0].bytes())
    wrong_key = write(tmp_path / "other.key", other.private_key_pem.bytes())
    garbage = write(tmp_path / "garbage.pem", b"hello\n")
    missing = str(tmp_path / "missing.pem")
    return {
        "missing ca": (
            {"ca_file": missing},
            f"upstreams.billing.tls.ca_file: cannot read {missing}: No such file or directory",
        ),
        "unreadable ca": ({"ca_file": str(tmp_path)}, "upstreams.billing.tls.ca_file: cannot read"),
        "not a certificate": (
            {"ca_file": garbage},
            f"upstreams.billing.tls.ca_file: {garbage} holds no PEM certificate",
        ),
        "key of another certificate": (
            {"ca_file": ca_file, "cert_file": cert, "key_file": wrong_key},
            f"upstreams.billing.tls.key_file: {wrong_key} does not match cert_file",
        ),
        "missing key": (
            {"cert_file": cert, "key_file": missing},
            f"upstreams.billing.tls.key_file: cannot read {missing}",
        ),
        "certificate without its key": (
            {"cert_file": cert},
            f"upstreams.billing.tls.cert_file: {cert} holds no PEM private key",
        ),
        "key without certificate": (
            {"key_file": wrong_key},
            "upstreams.billing.tls: key_file: needs cert_file",
        ),
        "trusts nothing": ({"system_ca": False}, "upstreams.billing.tls: system_ca: false"),
    }


def test_bad_files_are_config_errors_naming_the_field(
    tmp_path: Path, ca: trustme.CA, clients: trustme.CA
) -> None:
    for name, (tls, expected) in bad_configs(tmp_path, ca, clients).items():
        config = tmp_path / "relay.yaml"
        config.write_text(yaml.safe_dump(https(tmp_path, **tls)))
        with pytest.raises(ConfigError) as raised:
            check_tls_files(load_settings(config))
        message = str(raised.value)
        assert message.startswith("invalid config: " + expected), (name, message)
        assert "\n" not in message


@pytest.mark.live
def test_bad_file_stops_the_process_with_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(https(tmp_path, ca_file=str(missing))))
    result = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"relay: invalid config: upstreams.billing.tls.ca_file: cannot read {missing}: "
        "No such file or directory\n"
    )


# -- the deprecated verify_tls ---------------------------------------------------------------


def test_verify_tls_is_a_deprecated_alias_of_tls_verify() -> None:
    url = "https://billing.internal"
    assert UpstreamConfig(url=url, verify_tls=False).tls.verify is False
    assert UpstreamConfig(url=url, verify_tls=False, tls={"verify": False}).tls.verify is False
    assert UpstreamConfig(url=url).tls.verify is True
    with pytest.raises(ValueError, match=r"verify_tls .* contradicts tls\.verify"):
        UpstreamConfig(url=url, verify_tls=False, tls={"verify": True})
    settings = Settings(
        upstreams={"old": {"url": url, "verify_tls": True}, "new": {"url": url}},
        routes=[{"prefix": "/", "upstream": "old"}],
    )
    assert deprecations(settings) == [
        "upstreams.old.verify_tls is deprecated: use upstreams.old.tls.verify"
    ]


@pytest.mark.live
def test_verify_tls_warning_is_logged_once_at_start(tmp_path: Path) -> None:
    """Once per process start, by the supervisor: not once per worker."""
    config = {
        "server": {"workers": 2},
        "upstreams": {"old": {"url": "https://127.0.0.1:9", "verify_tls": False}},
        "routes": [{"prefix": "/", "upstream": "old"}],
    }
    with spawn_relay(config, tmp_path) as relay:
        pass
    warnings = [
        line
        for line in relay.lines()
        if line["message"] == "upstreams.old.verify_tls is deprecated: use upstreams.old.tls.verify"
    ]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "WARNING"


# -- which failures are TLS ones -------------------------------------------------------------


def raised_from(outer: Exception, cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise outer from exc
    except Exception as caught:
        return caught


def test_a_connection_ending_inside_tls_is_a_reset_not_a_tls_failure() -> None:
    """Only a handshake or certificate failure is reason tls: an EOF or close_notify while
    reading is the upstream hanging up, as on a plain connection."""
    import httpx

    from service.errors import StaleConnectionError, classify, tls_error_type

    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert classify(raised_from(httpx.ReadError("eof"), eof)) is Reason.RESET
    closed = ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed")
    assert classify(raised_from(httpx.ReadError("closed"), closed)) is Reason.RESET
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failed = raised_from(httpx.ConnectError("verify"), verify)
    assert classify(failed) is Reason.TLS
    assert tls_error_type(failed) == "tls_certificate_error"
    stale = raised_from(StaleConnectionError("stale"), ssl.SSLError(1, "bad record mac"))
    assert classify(stale) is Reason.RESET
