"""The daemon's HTTP API (FastAPI), its OpenAPI document, and the web UI's static files.

Every operation is one route under ``/api/v1``; errors are JSON ``{"detail":
"..."}`` with a 4xx status that names the problem (404 unknown VM, 409 wrong
state or duplicate, 400 missing file, 422 invalid field).  Streams are not
REST and are left out of the OpenAPI document: the console is a WebSocket at
``/api/v1/vms/{name}/console``, events are a WebSocket at
``/api/v1/events/ws`` and server-sent events at ``/api/v1/events``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from pyvmm import __version__
from pyvmm.manager import console
from pyvmm.manager.diskfull import status_and_message
from pyvmm.manager.limits import MAX_BODY_BYTES, BodyLimit
from pyvmm.manager.models import (
    ActionResult,
    ErrorBody,
    Event,
    KeysIn,
    Scrollback,
    VmDefinition,
    VmDefinitionIn,
    VmInfo,
    VmLog,
    VmStatsReport,
)
from pyvmm.manager.snapshots import (
    CloneIn,
    CloneResult,
    IncomingIn,
    IncomingInfo,
    MigrateIn,
    MigrateResult,
    RestoreIn,
    SnapshotIn,
    SnapshotInfo,
    SnapshotOps,
)
from pyvmm.manager.supervisor import ManagerError, Supervisor
from pyvmm.manager.web import static_dir, xterm_dir

log = logging.getLogger(__name__)

API = "/api/v1"
ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such VM"},
          409: {"model": ErrorBody, "description": "the VM is in the wrong state for this operation"}}
VmName = Annotated[str, PathParam(description="the VM's name or uuid", max_length=200)]


def _printable(value: Any, depth: int = 0) -> Any:
    """A validation error's ``input`` as JSON can carry it: non-finite numbers as text, long values cut."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if depth > 4:
        return "..."
    if isinstance(value, dict):
        return {str(k)[:100]: _printable(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, list | tuple):
        return [_printable(v, depth + 1) for v in value[:50]]
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    return value


def create_app(sup: Supervisor) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and a daemon's UI must work offline.
    app = FastAPI(title="pyvmmd", version=__version__, docs_url=None, redoc_url=None,
                  description="The pyvmm manager daemon: define, run and watch many VMs. "
                              "Console: WebSocket /api/v1/vms/{name}/console (binary frames, serial bytes "
                              "both ways; the scrollback first). Events: WebSocket /api/v1/events/ws or "
                              "server-sent events at /api/v1/events (JSON objects like the Event schema).")
    app.state.sup = sup
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input, and a non-finite one (1e999, NaN) cannot be written
        # as JSON: that was a 500.
        errors = [{**e, "input": _printable(e.get("input"))} if "input" in e else e for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
        # A write the daemon could not do (full disk: 507); routes turn the ones they expect into a
        # ManagerError, and this keeps any other one a JSON answer rather than a bare 500.
        status, message = status_and_message(exc, f"{request.method} {request.url.path} failed")
        log.warning("%s", message)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(ManagerError)
    async def _manager_error(request: Request, exc: ManagerError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; list every method the path has.
            methods: set[str] = set()
            for route in app.router.routes:
                for m in getattr(route, "methods", None) or ():
                    if route.matches({**request.scope, "method": m})[0] == Match.FULL:
                        methods.add(m)
            if methods:
                headers["allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.get(f"{API}/version", tags=["daemon"])
    async def version() -> dict[str, str]:
        return {"pyvmmd": __version__}

    @app.get(f"{API}/vms", tags=["vms"])
    async def list_vms() -> list[VmInfo]:
        """All defined VMs with their current state."""
        return sup.list()

    @app.post(f"{API}/vms", status_code=201, tags=["vms"],
              responses={400: {"model": ErrorBody, "description": "a file named in the definition is missing"},
                         409: {"model": ErrorBody, "description": "the name or uuid is taken"}})
    async def define(body: VmDefinitionIn) -> VmInfo:
        """Define a VM (stored; not started).  Without a kernel it gets the guest kit's default guest."""
        if body.kernel is None:
            body = await asyncio.to_thread(sup.with_default_guest, body)
        return sup.define(body).info()

    @app.get(API + "/vms/{name}", tags=["vms"], responses={404: ERRORS[404]})
    async def get_vm(name: VmName) -> VmInfo:
        return sup.get(name).info()

    @app.put(API + "/vms/{name}", tags=["vms"],
             responses={**ERRORS, 400: {"model": ErrorBody, "description": "a file named in the definition is "
                                                                           "missing or of the wrong kind"}})
    async def update(name: VmName, body: VmDefinitionIn) -> VmInfo:
        """Replace a shut-off VM's definition (its uuid stays; the name may change)."""
        if body.kernel is None:
            body = await asyncio.to_thread(sup.with_default_guest, body)
        return sup.update(name, body).info()

    @app.get(API + "/vms/{name}/definition", tags=["vms"], responses={404: ERRORS[404]})
    async def definition(name: VmName) -> VmDefinition:
        """The stored definition, as POST /vms takes it back."""
        return sup.get(name).definition

    @app.delete(API + "/vms/{name}", status_code=204, tags=["vms"], responses=ERRORS)
    async def undefine(name: VmName) -> Response:
        """Remove a VM's definition; the VM must be shut off."""
        sup.undefine(name)
        return Response(status_code=204)

    def _result(h, message: str) -> ActionResult:
        return ActionResult(message=message, vm=h.info())

    @app.post(API + "/vms/{name}/start", tags=["life cycle"], responses=ERRORS)
    async def start(name: VmName) -> ActionResult:
        """Start the VM's process; returns once QMP and the serial port are connected."""
        return _result(await sup.start(name), "started")

    @app.post(API + "/vms/{name}/shutdown", tags=["life cycle"], responses=ERRORS)
    async def shutdown(name: VmName, timeout: Annotated[float, Query(
            ge=0, le=3600, description="destroy the VM if it has not powered off after this many seconds "
                                       "(0: wait for the guest forever)")] = 0) -> ActionResult:
        """Press the ACPI power button (QMP system_powerdown); the guest decides when to power off."""
        return _result(await sup.shutdown(name, timeout), "power button pressed")

    @app.post(API + "/vms/{name}/destroy", tags=["life cycle"], responses=ERRORS)
    async def destroy(name: VmName) -> ActionResult:
        """Stop the VM at once (QMP quit, then SIGKILL)."""
        return _result(await sup.destroy(name), "destroyed")

    @app.post(API + "/vms/{name}/suspend", tags=["life cycle"], responses=ERRORS)
    async def suspend(name: VmName) -> ActionResult:
        return _result(await sup.suspend(name), "paused")

    @app.post(API + "/vms/{name}/resume", tags=["life cycle"], responses=ERRORS)
    async def resume(name: VmName) -> ActionResult:
        return _result(await sup.resume(name), "resumed")

    @app.post(API + "/vms/{name}/reboot", tags=["life cycle"], responses=ERRORS)
    async def reboot(name: VmName) -> ActionResult:
        """Reset the machine (QMP system_reset)."""
        return _result(await sup.reboot(name), "reset")

    @app.post(API + "/vms/{name}/send-key", tags=["life cycle"],
              responses={**ERRORS, 400: {"model": ErrorBody, "description": "the body is not JSON"}})
    async def send_key(name: VmName, body: KeysIn) -> ActionResult:
        """Press keys together on the VM's PS/2 keyboard (QMP send-key), e.g. ctrl alt delete."""
        return _result(await sup.send_key(name, body.keys), "sent " + "-".join(body.keys))

    snaps = SnapshotOps(sup)
    bad_dir: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "no such directory, or not a snapshot; or the body is not JSON"}}
    bad_body: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "the body is not JSON, or a file it names is missing"}}

    @app.post(API + "/vms/{name}/snapshot", tags=["state"], responses={**ERRORS, **bad_dir})
    async def snapshot(name: VmName, body: SnapshotIn) -> SnapshotInfo:
        """Save the VM's state, memory and writable disks in a new directory; it is paused meanwhile and
        continues if it was running."""
        return await snaps.snapshot(name, body)

    @app.post(API + "/restore", status_code=201, tags=["state"], responses={**ERRORS, **bad_dir})
    async def restore(body: RestoreIn) -> VmInfo:
        """Define a VM from a snapshot directory and start it from the saved state (memory mapped
        copy-on-write, a qcow2 overlay over each saved disk)."""
        return await snaps.restore(body)

    @app.post(API + "/vms/{name}/clone", status_code=201, tags=["state"], responses={**ERRORS, **bad_body})
    async def clone(name: VmName, body: CloneIn) -> CloneResult:
        """Snapshot the VM and start ``count`` copies of it (NAME-cloneN), each with its own uuid, MACs and
        disk overlays, all sharing the snapshot's memory file copy-on-write."""
        return await snaps.clone(name, body)

    @app.post(API + "/vms/{name}/migrate", tags=["state"], responses={**ERRORS, **bad_body})
    async def migrate(name: VmName, body: MigrateIn) -> MigrateResult:
        """Move the running VM to another pyvmmd (live: pre-copy over TCP); it ends shut off here."""
        return await snaps.migrate(name, body)

    @app.post(API + "/incoming", status_code=201, tags=["state"], responses={**ERRORS, **bad_body})
    async def incoming(body: IncomingIn) -> IncomingInfo:
        """The destination's half of a migration (called by the source daemon): define the VM and start
        it waiting for its state on a TCP port."""
        return await snaps.incoming(body)

    @app.get(API + "/vms/{name}/stats", tags=["vms"], responses={404: ERRORS[404]})
    async def stats(name: VmName) -> VmStatsReport:
        """CPU time and RSS of the VM process: the latest sample and up to 300 earlier ones (1 per second)."""
        return sup.stats(name)

    @app.get(API + "/vms/{name}/log", tags=["vms"], responses={404: ERRORS[404]})
    async def vm_log(name: VmName) -> VmLog:
        """The end (64 KiB) of the VM process's log: why it failed to start, which accelerator it chose..."""
        path, text = sup.vm_log(name)
        return VmLog(text=text, path=str(path))

    @app.get(API + "/vms/{name}/events", tags=["vms"], responses={404: ERRORS[404]})
    async def vm_events(name: VmName) -> list[Event]:
        """The VM's last 200 events (state changes, resets, definition changes), oldest first."""
        return sup.events_of(name)

    @app.get(API + "/vms/{name}/console/scrollback", tags=["vms"], responses={404: ERRORS[404]})
    async def scrollback(name: VmName) -> Scrollback:
        """The last 256 KiB of serial output."""
        return Scrollback(text=bytes(sup.get(name).scrollback).decode("utf-8", errors="replace"))

    @app.websocket(API + "/vms/{name}/console")
    async def console_ws(ws: WebSocket, name: str) -> None:
        try:
            h = sup.get(name)
        except ManagerError as e:
            await ws.close(code=1008, reason=e.message[:120])
            return
        await console.serve_console(ws, sup, h)

    @app.websocket(API + "/events/ws")
    async def events_ws(ws: WebSocket) -> None:
        await console.serve_events_ws(ws, sup)

    @app.get(API + "/events", include_in_schema=False)
    async def events_sse() -> StreamingResponse:
        return StreamingResponse(console.sse_events(sup), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    # -- web UI -------------------------------------------------------------------------------
    web = static_dir()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(web / "index.html")

    xterm = xterm_dir()
    if xterm is not None:
        app.mount("/static/vendor/xterm", StaticFiles(directory=xterm), name="xterm")
    else:
        log.warning("xterm.js not found: the web console falls back to plain text "
                    "(run 'python -m pyvmm.manager.web.fetch_xterm' to fetch it from the npm registry)")
    app.mount("/static", StaticFiles(directory=web), name="static")
    return app

