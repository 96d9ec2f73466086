"""Access control for the daemon's TCP listener.

The unix socket is protected by its file mode (0600, or 0660 with a group),
so requests arriving there are trusted.  The TCP listener wraps the same ASGI
app in :class:`TokenAuth`: every API request and WebSocket must carry the
token, as ``Authorization: Bearer TOKEN`` or (for browsers' WebSockets, which
cannot set headers) a ``token`` query parameter.  The page itself and its
static files carry no secrets and are served without a token; the page asks
for the token and keeps it in the browser's session storage.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qs

#: Paths served without a token (no VM data in them).
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/", "/favicon.ico", "/openapi.json")


def load_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one is written (mode 0600) if the file does not exist."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ValueError(f"token file {path}: readable by other users; chmod 600 it")
        token = path.read_text().strip()
        if len(token) < 16:
            raise ValueError(f"token file {path}: the token must be at least 16 characters")
        return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(token + "\n")
    return token


class TokenAuth:
    """ASGI middleware: refuse requests without the right token (401, or a 1008 close for WebSockets)."""

    def __init__(self, app, token: str, hint: str = "") -> None:
        self.app = app
        self._token = token.encode()
        self._hint = hint  # where the token is, for the 401 message

    def _presented(self, scope) -> bytes | None:
        for key, value in scope.get("headers", []):
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].strip()
        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in qs:
            return qs["token"][0].encode()
        return None

    def allowed(self, scope) -> bool:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            return True
        got = self._presented(scope)
        return got is not None and hmac.compare_digest(got, self._token)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "token required"})
            return
        detail = "a valid token is required (Authorization: Bearer TOKEN)" + (f"; {self._hint}" if self._hint else "")
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
