"""The manager's data model (pydantic): VM definitions, their run-time state, stats and events.

Definitions are validated here once, at the API boundary, so the store and the
supervisor only ever see well-formed data.  Checks that need the file system
(the kernel exists and is a kernel, the disks are in their stated format) live
in :func:`check_files`, called before a definition is stored, so a bad
definition leaves nothing behind.  A definition without a kernel gets the guest
kit's default guest (kernel, initramfs, command line) when it is defined, as
``pyvmm run`` without ``-kernel`` boots it.
"""

from __future__ import annotations

import enum
import os
import uuid as uuidlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

#: libvirt-like names: safe in file names, URLs and shell commands.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAX_MEMORY_MIB = 1 << 20  # 1 TiB
MAX_VCPUS = 255
MAX_CMDLINE = 4096
MAX_PATH = 4096
#: ``pyvmm run``'s default RAM size.
DEFAULT_MEMORY_MIB = 512

#: What clients send is validated without coercion: ``"2"`` or ``true`` is no integer, ``1e999`` and NaN are
#: no numbers at all (422, never a 500 or a silently converted value).
STRICT_INPUT = ConfigDict(extra="forbid", allow_inf_nan=False)

PathStr = Annotated[str, Field(min_length=1, max_length=MAX_PATH, pattern=r"^/[^\x00]*$",
                               description="an absolute path on the daemon's host")]


class VmState(enum.StrEnum):
    """The states a VM is reported in, named as virsh names them."""

    SHUTOFF = "shutoff"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "in shutdown"
    CRASHED = "crashed"


def _absolute_path(v: object) -> object:
    """Say plainly what is wrong with a relative path (the schema's pattern alone gives a regex)."""
    if isinstance(v, str) and v and not v.startswith("/"):
        raise ValueError("must be an absolute path")
    return v


class DiskSpec(BaseModel):
    """A virtio block device backed by an image file."""

    model_config = STRICT_INPUT

    path: PathStr
    format: Literal["raw", "qcow2"] = "raw"
    readonly: StrictBool = False

    _abs = field_validator("path", mode="before")(_absolute_path)


class NetworkSpec(BaseModel):
    """A virtio-net NIC and its host back-end: ``user`` (user-mode networking, needs passt) or ``tap``
    (an existing tap device, or a new one the VM process may create when it has the privilege)."""

    model_config = STRICT_INPUT

    type: Literal["user", "tap"] = "user"
    model: Literal["virtio-net"] = "virtio-net"
    mac: str | None = Field(default=None, pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
    tap: str | None = Field(default=None, max_length=15, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="tap interface name (type tap)")


class VmDefinitionIn(BaseModel):
    """What a client sends to define a VM."""

    model_config = STRICT_INPUT

    name: str = Field(pattern=NAME_PATTERN, description="unique name: letters, digits, '_', '.', '-'")
    uuid: uuidlib.UUID | None = Field(default=None, description="assigned by the daemon when omitted")
    vcpus: StrictInt = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mib: StrictInt = Field(default=DEFAULT_MEMORY_MIB, ge=2, le=MAX_MEMORY_MIB,
                            description="guest RAM in MiB (default 512, as pyvmm run)")
    kernel: PathStr | None = Field(default=None, description="absolute path of the kernel image on the daemon's "
                                   "host; omitted: the guest kit's default guest (kernel, initramfs and "
                                   "command line), as pyvmm run uses without -kernel")
    initrd: PathStr | None = None
    cmdline: str = Field(default="", max_length=MAX_CMDLINE, pattern=r"^[^\x00-\x1f\x7f]*$",
                         description="kernel command line (no control characters)")
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    disks: list[DiskSpec] = Field(default_factory=list, max_length=4)
    networks: list[NetworkSpec] = Field(default_factory=list, max_length=8)
    autostart: StrictBool = False

    _abs = field_validator("kernel", "initrd", mode="before")(_absolute_path)


class VmDefinition(VmDefinitionIn):
    """A stored definition: the uuid and the kernel are always set."""

    uuid: uuidlib.UUID
    kernel: PathStr


class VmInfo(BaseModel):
    """A VM as the API reports it: its definition plus run-time facts."""

    name: str
    uuid: str
    state: VmState
    reason: str = ""
    id: int | None = Field(default=None, description="the daemon's number for a running VM (virsh's Id)")
    pid: int | None = Field(default=None, description="the VM process's host pid")
    accelerator: str | None = Field(default=None, description="the accelerator the running VM uses (kvm or tcg)")
    accelerator_reason: str = Field(default="", description="why the VM process chose it")
    definition: VmDefinition


class VmStats(BaseModel):
    """One sample of a VM process's resource use."""

    timestamp: float = Field(description="seconds since the epoch")
    cpu_time_s: float = Field(description="user + system CPU time of the VM process")
    cpu_percent: float = Field(description="CPU use since the previous sample (100 = one core)")
    rss_bytes: int = Field(description="resident set size of the VM process")
    memory_mib: int = Field(description="guest RAM as defined")


class VmStatsReport(BaseModel):
    current: VmStats | None = None
    history: list[VmStats] = Field(default_factory=list)


class Event(BaseModel):
    """A state change, as sent on /events."""

    seq: int
    timestamp: float
    name: str = Field(description="state, defined, updated, undefined, reset or key")
    vm: str = Field(description="the VM's name")
    uuid: str
    state: VmState
    reason: str = ""


class ActionResult(BaseModel):
    """The answer to a life-cycle operation: the VM as it is after the request was made."""

    ok: bool = True
    message: str = ""
    vm: VmInfo


class VmLog(BaseModel):
    text: str = Field(description="the end of the VM process's log (its stdout and stderr)")
    path: str = Field(description="the log file on the daemon's host")


class KeysIn(BaseModel):
    """Keys to press together, by QEMU's names (QMP send-key qcodes), e.g. ctrl, alt, delete."""

    model_config = STRICT_INPUT

    keys: list[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,20}$")]] = Field(min_length=1, max_length=8)


class ErrorBody(BaseModel):
    detail: str


class Scrollback(BaseModel):
    text: str = Field(description="the last 256 KiB of serial output, decoded as UTF-8 (invalid bytes replaced)")


def kernel_format(path: str) -> str:
    """The boot loaders' name for the kernel file's format (``unknown`` when no loader takes it)."""
    from pyvmm.boot.detect import detect_format
    from pyvmm.x86.layout import BOOT_SECTOR_MAX

    with open(path, "rb") as f:
        head = f.read(BOOT_SECTOR_MAX + 1)  # every loader's header is in here; longer is no boot sector
    return detect_format(head)


def disk_format_problem(path: str, declared: str) -> str | None:
    """Why the image at ``path`` is not in the ``declared`` format (None if it is)."""
    from pyvmm.block.base import PROBE_BYTES, probe_buffer

    with open(path, "rb") as f:
        probed = probe_buffer(f.read(PROBE_BYTES)) or "raw"
    if probed == declared:
        return None
    if probed not in ("raw", "qcow2"):
        return f"is a {probed} image, which pyvmm cannot open (raw or qcow2)"
    return f"is a {probed} image, not {declared} (give format={probed})"


def check_files(d: VmDefinitionIn) -> None:
    """Refuse a definition whose files are missing, unreadable or of the wrong kind (raises ValueError
    naming the file)."""
    for what, path in (("kernel", d.kernel), ("initrd", d.initrd)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ValueError(f"{what} {path}: not readable")
    if d.kernel is not None and kernel_format(d.kernel) == "unknown":
        raise ValueError(f"kernel {d.kernel}: unrecognised image format (not a Linux bzImage, ELF, multiboot "
                         "kernel or boot sector)")
    for i, disk in enumerate(d.disks):
        if not os.path.isfile(disk.path):
            raise ValueError(f"disks[{i}] {disk.path}: no such file")
        if not os.access(disk.path, os.R_OK):
            raise ValueError(f"disks[{i}] {disk.path}: not readable")
        problem = disk_format_problem(disk.path, disk.format)
        if problem:
            raise ValueError(f"disks[{i}] {disk.path}: {problem}")
