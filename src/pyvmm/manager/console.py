"""Streaming endpoints: the serial console over a WebSocket, and state-change events.

The daemon is the single client of each VM's serial socket (the chardev
serves one at a time); it keeps a scrollback buffer and fans the output out to
any number of WebSocket clients.  A new client first gets the scrollback, then
live output; what it sends is written to the guest's serial port.  Console
subscriptions belong to the VM, not to its process, so a console stays open
across a reboot, a shutdown and the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.websockets import WebSocket, WebSocketDisconnect

from pyvmm.manager.supervisor import Supervisor, VmHandle

MAX_INPUT = 64 * 1024


async def serve_console(ws: WebSocket, sup: Supervisor, h: VmHandle) -> None:
    await ws.accept()
    q = h.console.subscribe()
    try:
        if h.scrollback:
            await ws.send_bytes(bytes(h.scrollback))
        pump = asyncio.create_task(_pump(ws, q))
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                if data is None and msg.get("text") is not None:
                    data = msg["text"].encode()
                if data:
                    sup.console_write(h, data[:MAX_INPUT])
        finally:
            pump.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        h.console.unsubscribe(q)


async def _pump(ws: WebSocket, q: asyncio.Queue) -> None:
    with contextlib.suppress(Exception):
        while True:
            data = await q.get()
            while not q.empty() and len(data) < 65536:
                data += q.get_nowait()
            await ws.send_bytes(data)


async def serve_events_ws(ws: WebSocket, sup: Supervisor) -> None:
    await ws.accept()
    q = sup.events.subscribe()
    try:
        for info in sup.list():  # the current state first, so a client needs no separate list call
            await ws.send_text(json.dumps({"name": "snapshot", "uuid": info.uuid, "vm": info.name,
                                           "state": info.state.value, "reason": info.reason}))
        recv = asyncio.create_task(ws.receive())
        get = asyncio.create_task(q.get())
        try:
            while True:
                done, _ = await asyncio.wait({get, recv}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    await ws.send_text(get.result().model_dump_json())
                    get = asyncio.create_task(q.get())
                if recv in done:
                    if recv.result()["type"] == "websocket.disconnect":
                        return
                    recv = asyncio.create_task(ws.receive())
        finally:
            get.cancel()
            recv.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        sup.events.unsubscribe(q)


async def sse_events(sup: Supervisor):
    """Server-sent events: one ``data:`` line of JSON per state change, a comment every 15 s."""
    q = sup.events.subscribe()
    try:
        yield b": pyvmmd events\n\n"
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), 15.0)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            yield f"id: {ev.seq}\nevent: {ev.name}\ndata: {ev.model_dump_json()}\n\n".encode()
    finally:
        sup.events.unsubscribe(q)
