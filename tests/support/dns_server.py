"""A DNS server on 127.0.0.1 (UDP, an ephemeral port) answering A records from a dict the
test edits, or SERVFAIL to every query while ``failing``; messages are dnspython's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass
class DnsServer(asyncio.DatagramProtocol):
    records: dict[str, list[str]] = field(default_factory=dict)  # name (no trailing dot) -> IPs
    failing: bool = False
    port: int = 0
    queries: int = 0
    _transport: Any = None  # asyncio's datagram transport

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.failing:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            for question in query.question:
                name = question.name.to_text(omit_final_dot=True)
                if name not in self.records:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                elif question.rdtype == dns.rdatatype.A and self.records[name]:
                    response.answer.append(
                        dns.rrset.from_text_list(
                            question.name, 1, dns.rdataclass.IN, dns.rdatatype.A, self.records[name]
                        )
                    )
        assert self._transport is not None
        self._transport.sendto(response.to_wire(), addr)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DnsServer]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = int(transport.get_extra_info("sockname")[1])
        try:
            yield self
        finally:
            transport.close()
