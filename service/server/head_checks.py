"""The request-head checks the parse-time guard (guard.py) runs once a head is complete.

Pure functions of the head: whether its target is in origin form, its path one the upstream
cannot resolve differently from the router, its Host and framing fields unambiguous, and
its declared body within ``limits.max_body_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

from ..config import LimitsConfig
from ..errors import FAILURES, Reason
from ..headers import RawHeaders, first_value

# An authority without userinfo, path or anything that needs decoding: reg-name in LDH
# form (plus "_") or a bracketed IPv6 literal, then an optional port.
_HOST = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_SLASH_SPLIT = re.compile(rb"[/\\]")


@dataclass(frozen=True)
class Rejection:
    reason: Reason
    detail: str | None = None  # appended to the reason's text
    instead: str | None = None  # replaces it

    @property
    def text(self) -> str:
        text = self.instead or FAILURES[self.reason].text
        return f"{text} ({self.detail})" if self.detail else text


def _fully_decoded(segment: bytes) -> bytes:
    """``segment`` percent-decoded until nothing changes: what an upstream that decodes
    any number of times would end up with."""
    while b"%" in segment:
        decoded = unquote_to_bytes(segment)
        if decoded == segment:
            break
        segment = decoded  # strictly shorter, so this ends
    return segment


def path_problem(raw_path: bytes, *, allow_encoded_slashes: bool) -> str | None:
    """Why a raw origin-form path must be refused, or None.

    Routing sees the decoded path but the upstream gets the raw one, and servers differ in
    how often they decode and whether ``\\``, ``%2F`` or ``..;`` separate segments. So
    anything that could become a dot segment or a separator after any number of decodings
    is refused rather than normalised: normalising would make the proxy and the upstream
    disagree about which path was asked for.
    """
    if b"\\" in raw_path:
        return "backslash in path"
    if b"%" not in raw_path and b"/." not in raw_path:
        return None
    for segment in raw_path.split(b"/"):
        decoded = _fully_decoded(segment)
        pieces = [decoded]
        if b"/" in decoded or b"\\" in decoded:
            if not allow_encoded_slashes:
                return "encoded slash in path"
            pieces = _SLASH_SPLIT.split(decoded)
        for piece in pieces:
            # ";" starts path parameters, which some servers drop: "..;" is ".." to them.
            if piece.split(b";", 1)[0] in (b".", b".."):
                return "dot segment in path"
    return None


def routing_path(raw_path: bytes) -> str:
    """The decoded path routes match when encoded slashes are allowed: ``%2F`` and ``%5C``
    stay encoded, so they never separate segments for routing (nor, then, for rewriting)."""
    segments = (unquote(s.decode("ascii")) for s in raw_path.split(b"/"))
    return "/".join(s.replace("/", "%2F").replace("\\", "%5C") for s in segments)


def head_problem(headers: Iterable[tuple[bytes, bytes]], http_version: str) -> str | None:
    """Why a request head's Host or framing fields must be refused (400), or None.

    ``headers`` as the server parsed them (names lowercased). The proxy re-frames every body
    it forwards, so only requests whose framing is unambiguous get that far (RFC 9112 6.1,
    6.3): one Content-Length, or Transfer-Encoding exactly ``chunked`` in HTTP/1.1 and no
    Content-Length. Host must be a single plain authority (RFC 9112 3.2).
    """
    hosts = lengths = 0
    host: bytes | None = None
    codings: list[bytes] = []
    for name, value in headers:
        if name == b"host":
            hosts += 1
            host = value
        elif name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
    if hosts > 1:
        return "more than one Host"
    if host is None:
        if http_version != "1.0":
            return "no Host"
    elif not _HOST.fullmatch(host):
        return "invalid Host"
    if lengths > 1:
        return "more than one Content-Length"
    if codings:
        if http_version != "1.1":
            return "Transfer-Encoding outside HTTP/1.1"
        if codings != [b"chunked"]:
            return "Transfer-Encoding other than chunked"
        if lengths:
            return "both Transfer-Encoding and Content-Length"
    return None


def websocket_problem(method: bytes, version: str, headers: RawHeaders) -> str | None:
    """Why a WebSocket opening handshake (RFC 6455 4.1) must be refused (400), or None:
    checked here, so a broken one is the proxy's own counted answer and never goes
    upstream."""
    if method != b"GET" or version != "1.1":
        return "WebSocket handshake not a GET in HTTP/1.1"
    keys = [v for n, v in headers if n == b"sec-websocket-key"]
    versions = [v.strip() for n, v in headers if n == b"sec-websocket-version"]
    if len(keys) != 1:
        return "WebSocket handshake without one Sec-WebSocket-Key"
    try:
        nonce = base64.b64decode(keys[0].strip(), validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        return "invalid Sec-WebSocket-Key"
    if versions != [b"13"]:
        return "unsupported Sec-WebSocket-Version (13 only)"
    return None


def _asks_websocket(headers: RawHeaders) -> bool:
    return any(n == b"upgrade" and b"websocket" in v.lower() for n, v in headers)


def check_head(
    url: bytes,
    method: bytes,
    version: str,
    headers: RawHeaders,
    limits: LimitsConfig,
    *,
    upgrade: bool,
    upgrade_accepted: bool,
) -> Rejection | None:
    """Why a complete request head must be refused, or None. ``headers`` as the server
    parsed them (names lowercased); ``upgrade``: llhttp will hand the bytes after the head
    to another protocol; ``upgrade_accepted``: the server's websocket handler takes them."""
    if version not in ("1.1", "1.0"):
        return Rejection(Reason.BAD_REQUEST, "unsupported HTTP version")
    if method == b"CONNECT":
        # A tunnel, and llhttp would not read past its head; the upstream client would
        # send it on in authority form.
        return Rejection(Reason.BAD_REQUEST, "CONNECT is not proxied")
    if url[:1] != b"/" or b"#" in url:
        # Absolute, authority and asterisk forms: the upstream is the configured one,
        # never one a request names.
        return Rejection(Reason.BAD_REQUEST, "request target not in origin form")
    problem = path_problem(
        url.split(b"?", 1)[0], allow_encoded_slashes=limits.allow_encoded_slashes
    ) or head_problem(headers, version)
    if problem is None and upgrade_accepted:
        problem = websocket_problem(method, version, headers)
    elif problem is None and not upgrade and _asks_websocket(headers):
        # Without Connection: upgrade it would go on as a plain request, its Upgrade
        # dropped as hop-by-hop: a handshake the upstream would see half of.
        problem = "Upgrade: websocket without Connection: upgrade"
    if problem is not None:
        return Rejection(Reason.BAD_REQUEST, problem)
    if not upgrade and not limits.max_body_bytes:
        return None
    raw_length = first_value(headers, b"content-length")
    length = int(raw_length) if raw_length is not None else None
    declares_body = length or any(n == b"transfer-encoding" for n, _ in headers)
    if upgrade and declares_body:
        # llhttp hands the bytes after an Upgrade request's head to the new protocol,
        # so a body there would never be read, and forwarded short (or, on a WebSocket
        # handshake, read as frames).
        return Rejection(Reason.BAD_REQUEST, "request body with Upgrade")
    if limits.max_body_bytes and length is not None and length > limits.max_body_bytes:
        return Rejection(Reason.BODY_TOO_LARGE)
    return None
