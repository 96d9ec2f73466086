"""The CLI's client for pyvmmd: HTTP over the daemon's unix socket (or TCP with a token).

Every failure becomes a :class:`ClientError` carrying the daemon's own
message, so the CLI prints one clear line.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import select
import sys
import termios
import threading
import tty
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect, unix_connect

from pyvmm.errors import PyvmmError

API = "/api/v1"
DETACH = 0x1D  # Ctrl-], as in virsh console


def _seg(name: str) -> str:
    """A VM name as one URL path segment: "../x" or "a/b" must not address another resource."""
    if name in (".", ".."):
        raise PyvmmError(f"invalid VM name {name!r}")
    return quote(name, safe="")


class ClientError(PyvmmError):
    """The daemon refused a request or could not be reached."""


class Client:
    def __init__(self, socket_path: Path | None = None, url: str | None = None, token: str | None = None,
                 timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.token = token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if url:
            self.base = url.rstrip("/")
            self._http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)
        else:
            if socket_path is None:
                raise ClientError("no daemon socket given")
            self.base = "http://pyvmmd"
            self._http = httpx.Client(base_url=self.base, transport=httpx.HTTPTransport(uds=str(socket_path)),
                                      headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, API + path, **kw)
        except httpx.TransportError as e:
            where = self.socket_path if self.socket_path else self.base
            raise ClientError(f"cannot reach pyvmmd at {where}: {e}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # pydantic validation errors
                detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}"
                                   for d in detail)
            raise ClientError(f"{detail} (HTTP {r.status_code})")
        if r.status_code == 204:
            return None
        ctype = r.headers.get("content-type", "")
        return r.json() if ctype.startswith("application/json") else r.text

    # -- operations ------------------------------------------------------------------------
    def list(self) -> list[dict]:
        return self.request("GET", "/vms")

    def get(self, name: str) -> dict:
        return self.request("GET", f"/vms/{_seg(name)}")

    def define(self, definition: dict) -> dict:
        return self.request("POST", "/vms", json=definition)

    def undefine(self, name: str) -> None:
        self.request("DELETE", f"/vms/{_seg(name)}")

    def action(self, name: str, op: str, **params: Any) -> dict:
        return self.request("POST", f"/vms/{_seg(name)}/{op}", params=params)

    def stats(self, name: str) -> dict:
        return self.request("GET", f"/vms/{_seg(name)}/stats")

    def definition(self, name: str) -> dict:
        return self.request("GET", f"/vms/{_seg(name)}/definition")

    def update(self, name: str, definition: dict) -> dict:
        return self.request("PUT", f"/vms/{_seg(name)}", json=definition)

    def events(self, name: str) -> builtins.list[dict]:
        return self.request("GET", f"/vms/{_seg(name)}/events")

    def log(self, name: str) -> dict:
        return self.request("GET", f"/vms/{_seg(name)}/log")

    def send_key(self, name: str, keys: builtins.list[str]) -> dict:
        return self.request("POST", f"/vms/{_seg(name)}/send-key", json={"keys": keys})

    # -- console ---------------------------------------------------------------------------
    def open_console(self, name: str) -> ClientConnection:
        path = f"{API}/vms/{_seg(name)}/console"
        try:
            if self.socket_path is not None and self.base == "http://pyvmmd":
                return unix_connect(str(self.socket_path), f"ws://pyvmmd{path}")
            ws_base = "ws" + self.base[4:]
            suffix = f"?token={self.token}" if self.token else ""
            return connect(ws_base + path + suffix)
        except Exception as e:  # OSError, InvalidStatus (403/404), InvalidURI, ...:
            raise ClientError(f"console of {name}: {e}") from None


def attach_console(ws: ClientConnection, stdin_fd: int | None = None, stdout_fd: int | None = None) -> int:
    """Copy the console to the terminal and keystrokes back until Ctrl-] or the daemon closes it.

    On a terminal, stdin is put in raw mode and restored on every way out.
    """
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    saved = None
    if os.isatty(stdin_fd):
        saved = termios.tcgetattr(stdin_fd)
        tty.setraw(stdin_fd)
    done = threading.Event()

    def output() -> None:
        try:
            while True:
                msg = ws.recv()
                data = msg if isinstance(msg, bytes) else msg.encode()
                os.write(stdout_fd, data)
        except (ConnectionClosed, OSError):
            pass
        finally:
            done.set()

    reader = threading.Thread(target=output, name="console-output", daemon=True)
    ws.__enter__()  # websockets wants its sync connections used as context managers; closed below
    reader.start()
    try:
        while not done.is_set():
            ready, _, _ = select.select([stdin_fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(stdin_fd, 1024)
            if not data:  # stdin closed: keep showing output until the console closes
                done.wait()
                break
            cut = data.find(bytes([DETACH]))
            if cut >= 0:
                if cut:
                    ws.send(data[:cut])
                break
            ws.send(data)
    except (ConnectionClosed, OSError):
        pass
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            ws.close()
        reader.join(2.0)
    return 0
