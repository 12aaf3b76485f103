"""A bulk upstream for streaming tests, run as its own process: it generates and consumes
bodies without holding them, so memory growth can only come from the proxy.

``python tests/support/bulk_upstream.py PORT``: ``GET /bytes/N`` sends N bytes (Content-Length);
``POST /sink`` reads the whole body and answers with the byte count.
"""

from __future__ import annotations

import asyncio
import sys

CHUNK = b"\x5a" * (256 * 1024)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            if method == "GET" and path.startswith("/bytes/"):
                size = int(path.rsplit("/", 1)[1])
                writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode())
                while size > 0:
                    piece = CHUNK[: min(size, len(CHUNK))]
                    writer.write(piece)
                    size -= len(piece)
                    await writer.drain()
            elif method == "POST" and path == "/sink":
                remaining = int(headers["content-length"])
                count = 0
                while remaining:
                    data = await reader.read(min(remaining, 1 << 20))
                    if not data:
                        return
                    count += len(data)
                    remaining -= len(data)
                body = str(count).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
