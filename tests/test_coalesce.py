"""Response writes: one send per loop turn, nothing held longer, nothing lost at close."""

from __future__ import annotations

import asyncio

from service.server.coalesce import FLUSH_BYTES, CoalescingWriter
from tests.support.http import http_client
from tests.support.relays import one_upstream, run_relay
from tests.support.scripted import ScriptedUpstream, endless_stream, respond


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        assert not self.closed
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_turn_leave_together() -> None:
    transport = RecordingTransport()
    writer = CoalescingWriter(transport, asyncio.get_running_loop())
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    writer.write(b"hello")
    writer.write(b"")
    assert transport.writes == []
    await next_turn()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]


async def test_a_later_chunk_is_not_held_past_its_turn() -> None:
    transport = RecordingTransport()
    writer = CoalescingWriter(transport, asyncio.get_running_loop())
    writer.write(b"head")
    await next_turn()
    writer.write(b"chunk")
    await next_turn()
    assert transport.writes == [b"head", b"chunk"]


async def test_large_writes_go_out_at_once_after_what_was_held() -> None:
    transport = RecordingTransport()
    writer = CoalescingWriter(transport, asyncio.get_running_loop())
    big = b"x" * FLUSH_BYTES
    writer.write(b"head")
    writer.write(big)
    assert transport.writes == [b"head", big]
    await next_turn()
    assert transport.writes == [b"head", big]


async def test_close_sends_what_is_held_first() -> None:
    transport = RecordingTransport()
    writer = CoalescingWriter(transport, asyncio.get_running_loop())
    writer.write(b"last bytes")
    writer.close()
    assert transport.writes == [b"last bytes"]
    assert transport.closed
    await next_turn()
    assert transport.writes == [b"last bytes"]


async def test_responses_complete_through_the_proxy_with_and_without_keep_alive() -> None:
    upstream = ScriptedUpstream({"/small": respond(200, b"small body"), "/stream": endless_stream})
    async with (
        upstream.running(),
        run_relay(one_upstream(upstream.url)) as relay,
        http_client() as client,
    ):
        for _ in range(20):
            response = await client.get(f"{relay.url}/small")
            assert response.content == b"small body"
        closing = await client.get(f"{relay.url}/small", headers={"connection": "close"})
        assert closing.content == b"small body"
        async with client.stream("GET", f"{relay.url}/stream") as streamed:
            received = 0
            async for chunk in streamed.aiter_raw():
                received += len(chunk)
                if received > 10_000:
                    break
        assert received > 10_000
