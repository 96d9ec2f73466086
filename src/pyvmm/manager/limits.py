"""A cap on request bodies, applied before the application reads them (ASGI middleware).

Every body the API takes is a small JSON document, yet a client may send any
amount.  :class:`BodyLimit` answers ``413`` with a JSON error, without calling
the application, when ``Content-Length`` exceeds the limit; a body without a
length (chunked transfer) is counted as the application receives it, and the
moment it passes the limit the client gets the ``413`` and the application
sees a disconnect, so at most one limit's worth of a body is ever held.  The
server (uvicorn) reads a body only as the application asks for it, and throws
away what arrives after the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

#: The largest request body the daemon takes (definitions are a few KiB).
MAX_BODY_BYTES = 1 << 20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _too_large(limit: int) -> tuple[Message, Message]:
    body = json.dumps({"detail": f"request body too large (the limit is {limit} bytes)"}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length (None when absent; -1 when it is not a number)."""
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class BodyLimit:
    """ASGI middleware: refuse HTTP request bodies longer than ``limit`` bytes with 413."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.limit:
            log.info("refused a %d-byte request body for %s %s", length, scope.get("method"), scope.get("path"))
            for message in _too_large(self.limit):
                await send(message)
            return
        received = 0
        answered = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    answered = True
                    log.info("refused a request body past %d bytes for %s %s", self.limit, scope.get("method"),
                             scope.get("path"))
                    if not started:
                        for m in _too_large(self.limit):
                            await send(m)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the client has its 413; whatever the application says after that is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
