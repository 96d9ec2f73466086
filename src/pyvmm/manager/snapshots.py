"""Snapshots, restores, clones and migration of managed VMs, over the VM process's migration stream.

A snapshot directory holds

* ``vm.state``: the VM's state written with QMP ``migrate fd:…`` (a file the daemon creates and passes
  with ``getfd``, since a sandboxed VM process may not create it: manager/statefd.py) and the ``mapped-ram``
  capability: the device and CPU state, then the guest's memory at page-aligned offsets (the
  memory file part, which a restore maps ``MAP_PRIVATE``: pages fault in lazily, and any number of
  restores share the file copy-on-write; see pyvmm.vmstate.mapped);
* ``snapshot.json``: what this module wrote (format, version, the VM's definition, its disks);
* one copy of each writable disk as it was at the snapshot (read-only disks are referred to).

The VM is paused while its state and disks are written, then continues if it was running.
A restored or cloned VM gets its own qcow2 overlay over each snapshot disk (in the daemon's
``disks/UUID/`` directory), so the snapshot itself is never written.

Migration goes from this daemon to another one (``to``: its ``http(s)://`` URL and token, or
``unix:SOCKET``): the destination defines the VM (same uuid, MACs and disks: the storage is
shared, as libvirt's default) and starts it with ``-incoming tcp:ADDRESS:PORT``; the source daemon
connects to HOST:PORT, passes the socket to its VM process (``getfd``), which runs QMP ``migrate fd:…``
and, once the stream completes, its process is ended and
its definition is marked (reason ``migrated to …``) or undefined.  A failed migration destroys
the destination VM again; the source keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, StrictBool, StrictInt

from pyvmm.manager import statefd
from pyvmm.manager.models import NAME_PATTERN, STRICT_INPUT, PathStr, VmDefinition, VmDefinitionIn, VmInfo, VmState
from pyvmm.manager.supervisor import ManagerError, Supervisor, VmHandle, random_mac

log = logging.getLogger(__name__)

FORMAT = "pyvmm-snapshot"
VERSION = 1
META = "snapshot.json"
STATE = "vm.state"
#: The names the daemon gives the descriptors it passes (QMP getfd).
STATE_FD = "pyvmm-state"
MIGRATE_FD = "pyvmm-migrate"
#: How long a snapshot's or an incoming stream's migration may take.
SAVE_TIMEOUT = 300.0
MIGRATE_TIMEOUT = 600.0
MAX_CLONES = 16


class SnapshotIn(BaseModel):
    model_config = STRICT_INPUT

    dir: PathStr = Field(description="a new (or empty) directory on the daemon's host")


class SnapshotInfo(BaseModel):
    dir: str
    state_file: str = Field(description="the VM's state and memory (mapped-ram file)")
    disks: list[str] = Field(default_factory=list, description="the disk images saved with it")
    seconds: float = Field(description="how long the VM was paused")
    vm: VmInfo


class RestoreIn(BaseModel):
    model_config = STRICT_INPUT

    dir: PathStr = Field(description="a snapshot directory (pyvmm vm snapshot)")
    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="the restored VM's name "
                             "(default: the snapshot's VM's name)")


class CloneIn(BaseModel):
    model_config = STRICT_INPUT

    count: StrictInt = Field(default=1, ge=1, le=MAX_CLONES)


class CloneResult(BaseModel):
    snapshot: SnapshotInfo
    clones: list[VmInfo]


class MigrateIn(BaseModel):
    model_config = STRICT_INPUT

    to: str = Field(min_length=1, max_length=1000, pattern=r"^(https?://|unix:/)[^\s]*$",
                    description="the destination pyvmmd: http(s)://HOST:PORT or unix:/path/pyvmmd.sock")
    token: str | None = Field(default=None, max_length=200, pattern=r"^[^\s]*$",
                              description="the destination's token (for http(s) URLs)")
    address: str | None = Field(default=None, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$",
                                description="the destination's address for the migration stream (default: "
                                "the URL's host, 127.0.0.1 for unix:)")
    undefine_source: StrictBool = Field(default=False, description="undefine the VM here once it runs there "
                                        "(default: keep it, shut off, with the reason 'migrated to …')")


class IncomingIn(BaseModel):
    """What a source daemon sends to the destination daemon to receive a VM."""

    model_config = STRICT_INPUT

    definition: VmDefinitionIn
    address: str = Field(default="0.0.0.0", max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$",
                         description="the address the VM process listens on for the stream")


class IncomingInfo(BaseModel):
    port: int
    vm: VmInfo


class MigrateResult(BaseModel):
    ok: bool = True
    message: str
    seconds: float
    downtime_ms: int | None = None
    vm: VmInfo
    destination_vm: dict[str, Any]


def _sandboxed(pid: int | None) -> bool:
    """Whether the process runs under a seccomp filter (``Seccomp: 2`` in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return False
    return any(line.split()[1:2] == ["2"] for line in status.splitlines() if line.startswith("Seccomp:"))


def _require_unsandboxed(h: VmHandle, op: str) -> None:
    """For a VM process without QMP ``getfd`` (an older pyvmm): it must open the state file or connect to
    the destination itself, which under the seccomp sandbox it cannot (a new socket would kill it)."""
    if _sandboxed(h.pid):
        raise ManagerError(409, f"cannot {op} VM {h.name}: its process runs under the seccomp sandbox and has "
                                "no QMP getfd to take the state file or socket from the daemon; restart it "
                                "with this pyvmm, or start pyvmmd with --no-sandbox")


def _free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _copy_disk(src: str, dst: Path) -> None:
    """A sparse copy of a disk image: only its data extents (SEEK_DATA/SEEK_HOLE), with copy_file_range,
    which file systems that can share extents (btrfs, XFS) do without copying."""
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            size = os.fstat(fin.fileno()).st_size
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                off = data
                while off < hole:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), hole - off, off, off)
                    if n == 0:
                        break
                    off += n
                pos = hole
            os.ftruncate(fout.fileno(), size)
    except OSError as e:
        raise ManagerError(409, f"cannot copy disk {src} to {dst}: {e.strerror}") from None


def _new_overlay(path: Path, backing: str, backing_fmt: str) -> None:
    from pyvmm.block.qcow2_create import create_qcow2

    size = _image_size(backing, backing_fmt)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        create_qcow2(fd, size, backing=backing, backing_fmt=backing_fmt)
    finally:
        os.close(fd)


def _image_size(path: str, fmt: str) -> int:
    if fmt == "qcow2":
        with open(path, "rb") as f:
            head = f.read(32)
        return int.from_bytes(head[24:32], "big")
    return os.path.getsize(path)


class SnapshotOps:
    """The operations; every coroutine is one API call."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    @property
    def disks_dir(self) -> Path:
        return self.sup.config.state_dir / "disks"

    # -- helpers ---------------------------------------------------------------------------
    async def _wait_migration(self, h: VmHandle, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = await self.sup._qmp(h, "query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status in ("completed", "failed", "cancelled"):
                return dict(info)
            if time.monotonic() > deadline:
                with contextlib.suppress(ManagerError):
                    await self.sup._qmp(h, "migrate_cancel")
                raise ManagerError(409, f"VM {h.name}: migration still {status} after {timeout:.0f}s; cancelled")
            if not h.active:
                raise ManagerError(409, f"VM {h.name}: its process ended during the migration")
            await asyncio.sleep(0.02)

    @staticmethod
    def _migrate_error(info: dict[str, Any]) -> str:
        return str(info.get("error-desc") or info.get("status"))

    # -- snapshot ----------------------------------------------------------------------------
    async def snapshot(self, name: str, body: SnapshotIn) -> SnapshotInfo:
        h = self.sup.get(name)
        target = Path(body.dir)
        async with h.lock:
            self.sup._require(h, "snapshot")
            created = False
            try:
                if target.exists():
                    if not target.is_dir() or any(target.iterdir()):
                        raise ManagerError(409, f"snapshot directory {target} exists and is not empty")
                else:
                    if not target.parent.is_dir():
                        raise ManagerError(400, f"snapshot directory {target}: {target.parent} does not exist")
                    target.mkdir(mode=0o700)
                    created = True
            except OSError as e:
                raise ManagerError(400, f"snapshot directory {target}: {e.strerror}") from None
            try:
                info, seconds = await self._save(h, target)
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        target.rmdir()
                raise
        return info.model_copy(update={"seconds": seconds, "vm": h.info()})

    async def _save(self, h: VmHandle, target: Path) -> tuple[SnapshotInfo, float]:
        """Pause ``h``, write its state and disks to ``target``, continue it (h.lock held)."""
        was_running = h.state == VmState.RUNNING
        state = target / STATE
        # The daemon creates the state file and passes it (getfd): a sandboxed VM process cannot open it.
        passed = await statefd.has_getfd(self.sup, h)
        if passed:
            fd = statefd.create_state_file(state, self.sup._run_as)
            try:
                await statefd.pass_fd(self.sup, h, fd, STATE_FD)
            except BaseException:
                state.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
        else:
            _require_unsandboxed(h, "snapshot")
        uri = f"fd:{STATE_FD}" if passed else f"file:{state}"
        t0 = time.monotonic()
        try:
            await self.sup._qmp(h, "stop")
            await self.sup._qmp(h, "migrate-set-capabilities",
                                {"capabilities": [{"capability": "mapped-ram", "state": True}]})
            try:
                await self.sup._qmp(h, "migrate", {"uri": uri})
                passed = False  # the migration owns the descriptor now
                info = await self._wait_migration(h, SAVE_TIMEOUT)
            finally:
                if passed:
                    await statefd.drop_fd(self.sup, h, STATE_FD)
                with contextlib.suppress(ManagerError):
                    await self.sup._qmp(h, "migrate-set-capabilities",
                                        {"capabilities": [{"capability": "mapped-ram", "state": False}]})
            if info.get("status") != "completed":
                raise ManagerError(409, f"VM {h.name}: saving its state failed: {self._migrate_error(info)}")
            disks: list[dict[str, Any]] = []
            for i, disk in enumerate(h.definition.disks):
                if disk.readonly:
                    disks.append({"path": disk.path, "format": disk.format, "copied": False})
                    continue
                copy = target / f"disk{i}.{disk.format}"
                await asyncio.to_thread(_copy_disk, disk.path, copy)
                disks.append({"path": copy.name, "format": disk.format, "copied": True})
            meta = {"format": FORMAT, "version": VERSION, "created": time.time(), "vm": h.name,
                    "running": was_running, "state": STATE, "disks": disks,
                    "definition": h.definition.model_dump(mode="json")}
            (target / META).write_text(json.dumps(meta, indent=2) + "\n")
        except BaseException:
            # Only what this snapshot wrote goes: DIR may have been an empty directory of the caller's.
            for p in [state, target / META, *(target / f"disk{i}.{d.format}" for i, d in
                                                enumerate(h.definition.disks))]:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        finally:
            if was_running and h.active:
                with contextlib.suppress(ManagerError):
                    await self.sup._qmp(h, "cont")  # from postmigrate, as QEMU allows
                self.sup._set_state(h, VmState.RUNNING, "snapshot taken")
            elif h.active:
                self.sup._set_state(h, VmState.PAUSED, "snapshot taken")
        seconds = time.monotonic() - t0
        self.sup._publish(h, "snapshot")
        log.info("VM %s: snapshot in %s (paused %.3fs)", h.name, target, seconds)
        return SnapshotInfo(dir=str(target), state_file=str(state), seconds=seconds, vm=h.info(),
                            disks=[d["path"] for d in disks]), seconds

    # -- restore -----------------------------------------------------------------------------
    @staticmethod
    def read_meta(target: Path) -> dict[str, Any]:
        try:
            meta = json.loads((target / META).read_text())
        except FileNotFoundError:
            raise ManagerError(400, f"{target}: no {META} (not a pyvmm snapshot directory)") from None
        except (OSError, ValueError) as e:
            raise ManagerError(400, f"{target / META}: unreadable: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ManagerError(400, f"{target / META}: not a pyvmm snapshot")
        if meta.get("version") != VERSION:
            raise ManagerError(400, f"{target / META}: snapshot version {meta.get('version')!r}, this daemon "
                                    f"reads version {VERSION}")
        if not (target / STATE).is_file():
            raise ManagerError(400, f"{target}: no {STATE}")
        return meta

    async def restore(self, body: RestoreIn) -> VmInfo:
        target = Path(body.dir)
        meta = self.read_meta(target)
        return await self._restore_one(target, meta, body.name or str(meta.get("vm", "")), fresh_identity=None)

    async def _restore_one(self, target: Path, meta: dict[str, Any], name: str,
                           fresh_identity: bool | None) -> VmInfo:
        """Define a VM from the snapshot in ``target`` and start it from its state (mapped, copy-on-write).
        ``fresh_identity``: a new uuid and MACs (None: only when the snapshot's uuid is taken here)."""
        try:
            d = VmDefinition.model_validate(meta["definition"])
        except Exception as e:
            raise ManagerError(400, f"{target / META}: bad definition: {e}") from None
        # Restoring a VM that is defined here, shut off, under its own name (virsh restore after destroy)
        # replaces its definition; a restore beside a live original gets a new uuid and MACs.
        same = self.sup.vms.get(str(d.uuid))
        reuse = (fresh_identity is None and same is not None and same.name == name
                 and same.state in (VmState.SHUTOFF, VmState.CRASHED))
        if fresh_identity is None:
            fresh_identity = same is not None and not reuse
        new_uuid = uuidlib.uuid4() if fresh_identity else d.uuid
        disks = []
        made: list[Path] = []
        try:
            for i, (spec, saved) in enumerate(zip(d.disks, meta.get("disks", []), strict=True)):
                if not saved.get("copied"):
                    disks.append(spec.model_dump())
                    continue
                backing = (target / str(saved["path"])).resolve()
                if backing.parent != target.resolve() or not backing.is_file():
                    raise ManagerError(400, f"{target / META}: disk {i}: {saved['path']!r} is not a file of the "
                                            "snapshot")
                overlay = self.disks_dir / str(new_uuid) / f"disk{i}-{int(time.time() * 1000)}.qcow2"
                await asyncio.to_thread(_new_overlay, overlay, str(backing), str(saved["format"]))
                made.append(overlay)
                disks.append({"path": str(overlay), "format": "qcow2", "readonly": False})
        except ValueError:
            raise ManagerError(400, f"{target / META}: the disks do not match the definition") from None
        nets = [{**n.model_dump(), "mac": random_mac() if fresh_identity else n.mac} for n in d.networks]
        din = VmDefinitionIn.model_validate({**d.model_dump(), "name": name, "uuid": new_uuid, "disks": disks,
                                             "networks": nets, "autostart": False})
        old = same.definition if reuse and same is not None else None
        try:
            h = self.sup.update(name, din) if old is not None else self.sup.define(din)
        except ManagerError:
            for p in made:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        try:
            await self.sup.start(h.name, incoming=f"file:{(target / STATE).resolve()}")
            await self._settle_incoming(h, bool(meta.get("running", True)))
        except BaseException as e:
            with contextlib.suppress(ManagerError):
                if h.active:
                    await self.sup.destroy(h.name)
            with contextlib.suppress(ManagerError):
                if old is not None:
                    self.sup.update(h.name, VmDefinitionIn.model_validate(old.model_dump()))
                else:
                    self.sup.undefine(h.name)
            for p in made:
                with contextlib.suppress(OSError):
                    p.unlink()
            if isinstance(e, ManagerError):
                raise ManagerError(e.status, f"restore of {target} failed: {e.message}") from None
            raise
        self.sup._publish(h, "restored")
        return h.info()

    async def _settle_incoming(self, h: VmHandle, run: bool, timeout: float = SAVE_TIMEOUT) -> None:
        """Wait until the VM process has loaded its incoming state; ``cont`` it if ``run`` and it is paused."""
        deadline = time.monotonic() + timeout
        while True:
            if not h.active:
                raise ManagerError(409, f"VM {h.name}: its process ended while loading the state: "
                                        f"{h.reason or 'see its log'}")
            status = await self.sup._qmp(h, "query-status")
            if status.get("status") not in ("inmigrate", "prelaunch"):
                break
            if time.monotonic() > deadline:
                raise ManagerError(409, f"VM {h.name}: state not loaded after {timeout:.0f}s")
            await asyncio.sleep(0.02)
        if status.get("running"):
            self.sup._set_state(h, VmState.RUNNING, "restored")
        elif run:
            async with h.lock:
                await self.sup._qmp(h, "cont")
                self.sup._set_state(h, VmState.RUNNING, "restored")
        else:
            self.sup._set_state(h, VmState.PAUSED, "restored (paused, as it was saved)")

    # -- clone -------------------------------------------------------------------------------
    async def clone(self, name: str, body: CloneIn) -> CloneResult:
        h = self.sup.get(name)
        names: list[str] = []
        i = 1
        while len(names) < body.count:
            candidate = f"{h.name}-clone{i}"
            if not any(o.name == candidate for o in self.sup.vms.values()):
                names.append(candidate)
            i += 1
        target = self.sup.config.state_dir / "snapshots" / f"{h.uuid}-{int(time.time() * 1000)}"
        async with h.lock:
            self.sup._require(h, "snapshot")
            try:
                target.mkdir(parents=True, mode=0o700)
            except OSError as e:
                raise ManagerError(500, f"cannot create {target}: {e.strerror}") from None
            snap, _ = await self._save(h, target)
        meta = self.read_meta(target)
        clones = []
        for n in names:
            clones.append(await self._restore_one(target, meta, n, fresh_identity=True))
        return CloneResult(snapshot=snap.model_copy(update={"vm": h.info()}), clones=clones)

    # -- migration ---------------------------------------------------------------------------
    async def incoming(self, body: IncomingIn) -> IncomingInfo:
        """The destination's half: define the VM and start it waiting for the stream on a TCP port."""
        din = body.definition.model_copy(update={"autostart": False})
        if din.uuid is not None and str(din.uuid) in self.sup.vms:
            other = self.sup.vms[str(din.uuid)]
            if other.active:
                raise ManagerError(409, f"VM {other.name} (uuid {din.uuid}) is already running here")
            self.sup.undefine(other.name)  # a VM that once migrated away and now comes back
        if din.kernel is None:
            din = await asyncio.to_thread(self.sup.with_default_guest, din)
        h = self.sup.define(din)
        try:
            port = _free_port(body.address)
        except OSError as e:
            self.sup.undefine(h.name)
            raise ManagerError(400, f"cannot listen on {body.address}: {e.strerror}") from None
        host = f"[{body.address}]" if ":" in body.address else body.address
        try:
            await self.sup.start(h.name, incoming=f"tcp:{host}:{port}", shared_disks=True)
        except ManagerError:
            with contextlib.suppress(ManagerError):
                self.sup.undefine(h.name)
            raise
        self.sup._set_state(h, VmState.PAUSED, "inmigrate")
        task = asyncio.create_task(self._expire_incoming(h, h.pid))
        self.sup._timers.add(task)  # a strong reference until it is done
        task.add_done_callback(self.sup._timers.discard)
        return IncomingInfo(port=port, vm=h.info())

    async def _expire_incoming(self, h: VmHandle, pid: int | None, timeout: float = MIGRATE_TIMEOUT + 60) -> None:
        """A destination whose source never sent (or finished) the stream is not left waiting forever."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if h.pid != pid or not h.active:
                return
            with contextlib.suppress(ManagerError):
                status = await self.sup._qmp(h, "query-status")
                if status.get("status") != "inmigrate":
                    if h.reason == "inmigrate" and not status.get("running"):
                        self.sup._set_state(h, VmState.PAUSED, "migrated here (paused, as it was)")
                    return
            await asyncio.sleep(1.0)
        log.warning("VM %s: no migration stream arrived within %.0fs: destroying it", h.name, timeout)
        with contextlib.suppress(ManagerError):
            await self.sup.destroy(h.name)
            self.sup.undefine(h.name)

    async def migrate(self, name: str, body: MigrateIn) -> MigrateResult:
        from pyvmm.manager.client import Client, ClientError

        h = self.sup.get(name)
        self.sup._require(h, "migrate")
        if body.to.startswith("unix:"):
            client_kw: dict[str, Any] = {"socket_path": Path(body.to[5:])}
            host = body.address or "127.0.0.1"
        else:
            client_kw = {"url": body.to, "token": body.token}
            host = body.address or urlsplit(body.to).hostname or "127.0.0.1"
        dest = Client(timeout=60, **client_kw)
        t0 = time.monotonic()
        try:
            definition = h.definition.model_dump(mode="json")
            try:
                answer = await asyncio.to_thread(dest.request, "POST", "/incoming",
                                                 json={"definition": definition})
            except ClientError as e:
                raise ManagerError(409, f"destination {body.to}: {e}") from None
            port = int(answer["port"])
            dest_name = str(answer["vm"]["name"])
            try:
                async with h.lock:
                    self.sup._require(h, "migrate")
                    uri = await self._migration_channel(h, host, port)
                    try:
                        await self.sup._qmp(h, "migrate", {"uri": uri})
                    except BaseException:
                        if uri.startswith("fd:"):
                            await statefd.drop_fd(self.sup, h, MIGRATE_FD)
                        raise
                    info = await self._wait_migration(h, MIGRATE_TIMEOUT)
                    if info.get("status") != "completed":
                        raise ManagerError(409, f"VM {h.name}: migration to {body.to} failed: "
                                                f"{self._migrate_error(info)}; it keeps running here")
            except BaseException:
                with contextlib.suppress(ClientError):
                    await asyncio.to_thread(dest.action, dest_name, "destroy")
                with contextlib.suppress(ClientError):
                    await asyncio.to_thread(dest.undefine, dest_name)
                if h.active and h.state == VmState.PAUSED:
                    with contextlib.suppress(ManagerError):
                        status = await self.sup._qmp(h, "query-status")
                        if status.get("status") == "postmigrate":
                            await self.sup._qmp(h, "cont")
                raise
            dest_vm = await self._wait_dest_running(dest, dest_name)
            reason = f"migrated to {body.to}"
            await self.sup.destroy(h.name)
            await self.sup._wait_exit(h, 5.0)
            self.sup._set_state(h, VmState.SHUTOFF, reason)
            if body.undefine_source:
                self.sup.undefine(h.name)
            seconds = time.monotonic() - t0
            log.info("VM %s: %s in %.2fs (downtime %s ms)", h.name, reason, seconds, info.get("downtime"))
            downtime = info.get("downtime")
            return MigrateResult(message=reason, seconds=seconds,
                                 downtime_ms=int(downtime) if isinstance(downtime, int | float) else None,
                                 vm=h.info(), destination_vm=dest_vm)
        finally:
            dest.close()

    async def _migration_channel(self, h: VmHandle, host: str, port: int) -> str:
        """The URI for QMP ``migrate``: the daemon connects to the destination and passes the socket
        (``fd:NAME``), so a sandboxed VM process needs no socket of its own; ``tcp:`` for a VM process
        without ``getfd`` that may connect itself."""
        if not await statefd.has_getfd(self.sup, h):
            _require_unsandboxed(h, "migrate")
            return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        sock = await statefd.connect(host, port)
        try:
            await statefd.pass_fd(self.sup, h, sock.fileno(), MIGRATE_FD)
        finally:
            sock.close()  # the VM process holds its own copy; the destination sees the end when that closes
        return f"fd:{MIGRATE_FD}"

    @staticmethod
    async def _wait_dest_running(dest: Any, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The destination's view of the VM once it has left ``inmigrate``."""
        from pyvmm.manager.client import ClientError

        deadline = time.monotonic() + timeout
        vm: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(ClientError):
                vm = await asyncio.to_thread(dest.get, name)
                if vm.get("state") in ("running", "shutoff", "crashed") or (
                        vm.get("state") == "paused" and vm.get("reason") != "inmigrate"):
                    return vm
            await asyncio.sleep(0.05)
        return vm

