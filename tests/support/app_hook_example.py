"""A ``server.app_hook`` as a user would write one: a route and a middleware of their own on
the proxy's FastAPI app (used by tests/test_app.py)."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class StampResponses:
    """Pure ASGI middleware (it streams, unlike ``@app.middleware("http")``): adds a header
    to every response, proxied or not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-relay-hook", b"1")]
            await send(message)

        await self.app(scope, receive, stamped if scope["type"] == "http" else send)


def customize(app: FastAPI) -> None:
    @app.get("/_relay/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "from the app hook"}

    app.add_middleware(StampResponses)


not_callable = 42
