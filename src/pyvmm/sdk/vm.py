"""``pyvmm.VM``: boot a VM from a script, run commands and move files in it, drive it over QMP.

::

    from pyvmm import VM
    with VM(memory="512M", cpus=2) as vm:          # the guest kit's kernel, accel auto
        r = vm.exec(["uname", "-r"])                 # like subprocess.run(capture_output=True)
        print(r.returncode, r.stdout, r.stderr)
        vm.write_file("/tmp/in.json", b"{}")
        data = vm.read_file("/tmp/in.json")

Each VM is one VMM process (``python -m pyvmm run``, or ``qemu-system-x86_64`` with
``vmm="qemu"``: the same guest and the same agent), as libvirt and QEMU's ``qemu.machine``
run theirs.  The VM object talks to it over three unix sockets in a private directory:

* the serial console (:attr:`VM.console`, a stream);
* QMP (:meth:`VM.qmp`, :meth:`VM.wait_event`, pause/resume);
* the guest agent's virtio-serial port ``org.qemu.guest_agent.0``, where Debian's ``qemu-ga``
  (started by the guest kit's /init) answers :mod:`pyvmm.qga` (exec, files, shutdown).

Resources (the process, sockets, the directory) are released on every path: ``with``, an
exception during boot, :meth:`VM.close`, garbage collection or interpreter exit.
Errors are :class:`~pyvmm.sdk.errors.VMError` and its subclasses.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.qga import ExecResult, QgaClient, QgaError, QgaTimeout
from pyvmm.sdk.console import Console
from pyvmm.sdk.errors import VMError, VMTimeout
from pyvmm.sdk.qmp import QmpConnection

log = logging.getLogger(__name__)

AGENT_PORT = "org.qemu.guest_agent.0"
_SIZE_SUFFIX = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_bytes(text: str) -> int:
    """``-m``'s spelling (``512M``, ``2G``; a plain number is MiB) in bytes."""
    t = text.strip().upper().removeprefix("SIZE=")
    suffix = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        return int(float(t[:len(t) - len(suffix)]) * _SIZE_SUFFIX[suffix])
    except ValueError:
        raise VMError(f"memory={text!r}: a size such as 512M or 2G") from None


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk: ``path``, its ``format`` (raw or qcow2; probed when None), read-only or not."""

    path: str | os.PathLike[str]
    format: str | None = None
    readonly: bool = False

    def args(self) -> list[str]:
        opts = f"file={os.fspath(self.path).replace(',', ',,')},if=virtio"
        if self.format:
            opts += f",format={self.format}"
        if self.readonly:
            opts += ",readonly=on"
        return ["-drive", opts]


@dataclass(frozen=True)
class Share:
    """A host directory shared with the guest (virtio-fs), mounted at ``/mnt/TAG`` in the guest."""

    host_dir: str | os.PathLike[str]
    tag: str

    @classmethod
    def parse(cls, text: str) -> Share:
        """``HOST_DIR:TAG``, the command line's spelling (checked as ``pyvmm run --share`` checks it)."""
        from pyvmm.vhost_user.virtiofsd import parse_share

        share = parse_share(text)
        return cls(share.host_dir, share.tag)


def _kill_process(proc: subprocess.Popen[bytes], directory: str) -> None:
    """Finalizer: the VMM process and the runtime directory never outlive the VM object."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


class VM:
    """One virtual machine.  ``start()`` (or ``with``) boots it and waits for its agent."""

    def __init__(self, memory: str | int = "512M", cpus: int = 1, accel: str = "auto", *,
                 kernel: str | os.PathLike[str] | None = None, initrd: str | os.PathLike[str] | None = None,
                 append: str = "", disks: Sequence[Disk | str | os.PathLike[str]] = (),
                 net: str | Sequence[str] | None = None, shares: Sequence[Share | str] = (),
                 devices: Sequence[str] = (), extra_args: Sequence[str] = (), agent: bool = True,
                 plugins: Sequence[str | os.PathLike[str]] = (), snapshot: str | os.PathLike[str] | None = None,
                 boot_timeout: float = 300.0, vmm: str = "pyvmm") -> None:
        if vmm not in ("pyvmm", "qemu"):
            raise VMError(f"vmm={vmm!r}: use 'pyvmm' or 'qemu'")
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise VMError(f"cpus={cpus!r}: a positive number of vCPUs")
        self.memory = f"{memory}M" if isinstance(memory, int) else str(memory)
        self.cpus = cpus
        self.accel = accel
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.disks = [d if isinstance(d, Disk) else Disk(d) for d in disks]
        self.net = net
        self.shares = [s if isinstance(s, Share) else Share.parse(s) for s in shares]
        self.devices = list(devices)
        self.extra_args = list(extra_args)
        self.with_agent = agent
        self.snapshot_file = os.path.abspath(os.fspath(snapshot)) if snapshot is not None else None
        self.plugins = [os.path.abspath(os.fspath(p)) for p in plugins]
        if self.plugins and vmm != "pyvmm":
            raise VMError("plugins (Python devices, tracers) run inside pyvmm only")
        self.boot_timeout = boot_timeout
        self.vmm = vmm
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._console: Console | None = None
        self._qmp: QmpConnection | None = None
        self._qga: QgaClient | None = None
        self._daemons: list[Any] = []  # virtiofsd processes, one per share
        self.boot_seconds: float | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None and self.running:
                self.stop()
        finally:
            self.close()

    def start(self) -> VM:
        """Start the VMM and wait (``boot_timeout``) until the guest agent answers."""
        if self._proc is not None:
            raise VMError("this VM was already started")
        t0 = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="pyvmm-vm-"))
        try:
            if self.shares:
                from pyvmm.vhost_user.virtiofsd import start_virtiofsd

                for i, share in enumerate(self.shares):
                    self._daemons.append(start_virtiofsd(os.fspath(share.host_dir), str(self._path(f"vfs{i}.sock"))))
            cmd = self.command()
            log.info("starting %s", " ".join(cmd))
            env = dict(os.environ)
            if self.plugins:
                from pyvmm.plugins import ENV

                env[ENV] = ":".join(self.plugins)
            with open(self._dir / "vmm.log", "wb") as out:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True, env=env)
            self._finalizer = weakref.finalize(self, _kill_process, self._proc, str(self._dir))
            self._console = self._until_up(lambda t: Console(self._path("console.sock"), t))
            self._qmp = self._until_up(lambda t: QmpConnection(self._path("qmp.sock"), t))
            if self.with_agent:
                qga = QgaClient(timeout=60.0)
                self._qga = qga
                self._until_up(lambda t: qga.connect(self._path("qga.sock"), t))
                left = max(1.0, self.boot_timeout - (time.monotonic() - t0))
                try:
                    qga.sync(timeout=left)
                except QgaTimeout:
                    raise VMTimeout(f"the guest agent did not answer within {self.boot_timeout:g}s of start"
                                    f"{self._log_tail()}") from None
                except QgaError as e:
                    raise VMError(f"guest agent: {e}{self._log_tail()}") from None
            self.boot_seconds = time.monotonic() - t0
            for share in self.shares:
                self._mount_share(share)
            return self
        except BaseException:
            self.close()
            raise

    def _path(self, name: str) -> Path:
        assert self._dir is not None
        return self._dir / name

    def _until_up(self, connect: Callable[[float], Any]) -> Any:
        """``connect`` with retries, failing at once (with the VMM's output) if the VMM exits."""
        deadline = time.monotonic() + 60
        while True:
            self._check_alive()
            try:
                return connect(1.0)
            except VMError:
                if time.monotonic() > deadline:
                    raise
            except QgaError:
                if time.monotonic() > deadline:
                    raise VMError(f"the guest agent socket did not appear{self._log_tail()}") from None

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise VMError(f"the VMM exited with status {self._proc.returncode}{self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self._path("vmm.log").read_text(errors="replace").strip().splitlines()[-lines:]
        except (OSError, AssertionError):
            return ""
        return (":\n" + "\n".join(text)) if text else ""

    def command(self) -> list[str]:
        """The VMM's command line for this VM (sockets in the runtime directory)."""
        if self._dir is None:
            raise VMError("the VM has no runtime directory yet (start it)")
        kernel, initrd, append = self._boot_files()
        if self.vmm == "qemu":
            qemu = shutil.which("qemu-system-x86_64")
            if qemu is None:
                raise VMError("qemu-system-x86_64 is not installed")
            accel = "kvm:tcg" if self.accel == "auto" else self.accel
            cmd = [qemu, "-accel", accel, "-nodefaults", "-no-reboot", "-display", "none"]
        else:
            cmd = [sys.executable, "-m", "pyvmm", "run", "-accel", self.accel, "-nodefaults"]
        cmd += ["-m", self.memory, "-smp", str(self.cpus), "-kernel", kernel]
        if initrd:
            cmd += ["-initrd", initrd]
        if append:
            cmd += ["-append", append]
        cmd += ["-serial", f"unix:{self._path('console.sock')},server=on,wait=on",
                "-qmp", f"unix:{self._path('qmp.sock')},server=on,wait=off"]
        if self.with_agent:
            cmd += ["-chardev", f"socket,id=qga0,path={self._path('qga.sock')},server=on,wait=off",
                    "-device", "virtio-serial-pci,id=vser0",
                    "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}"]
        for disk in self.disks:
            cmd += disk.args()
        cmd += self._net_args()
        if self.shares:
            from pyvmm.vhost_user.virtiofsd import share_options

            if len(self._daemons) != len(self.shares):
                raise VMError("the shares' virtiofsd daemons are not running (start the VM)")
            cmd += share_options(list(zip(self._daemons, (s.tag for s in self.shares), strict=True)),
                                 memory=memory_bytes(self.memory))
        for dev in self.devices:
            cmd += ["-device", dev]
        if self.snapshot_file is not None:
            if not os.path.isfile(self.snapshot_file):
                raise VMError(f"snapshot {self.snapshot_file}: no such file")
            cmd += ["-incoming", f"exec:cat {shlex.quote(self.snapshot_file)}"]
        return cmd + self.extra_args

    def _boot_files(self) -> tuple[str, str | None, str]:
        if self.kernel is not None:
            return os.fspath(self.kernel), os.fspath(self.initrd) if self.initrd else None, self.append
        from pyvmm.guestkit import default_guest

        guest = default_guest()
        return str(guest.kernel), str(guest.initrd), f"{guest.cmdline} quiet {self.append}".strip()

    def _net_args(self) -> list[str]:
        if self.net is None or self.net == "none":
            return []
        if isinstance(self.net, str):
            return ["-netdev", f"{self.net},id=net0", "-device", "virtio-net-pci,netdev=net0"]
        return list(self.net)

    def _mount_share(self, share: Share) -> None:
        r = self.exec(["sh", "-c", 'mkdir -p "/mnt/$1" && mount -t virtiofs "$1" "/mnt/$1"', "sh", share.tag],
                      timeout=60)
        if r.returncode:
            raise VMError(f"mounting share {share.tag}: {r.stderr.decode(errors='replace').strip()}")

    # -- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The VMM process's exit status once it has exited (0 after a guest power-off)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def runtime_dir(self) -> Path | None:
        return self._dir

    @property
    def console(self) -> Console:
        if self._console is None:
            raise VMError("the VM is not running")
        return self._console

    def _agent(self) -> QgaClient:
        if self._qga is None:
            raise VMError("this VM has no guest agent (agent=False, or not started)")
        self._check_alive()
        return self._qga

    def _monitor(self) -> QmpConnection:
        if self._qmp is None:
            raise VMError("the VM is not running")
        return self._qmp

    # -- the guest agent -----------------------------------------------------------------------
    def exec(self, argv: Sequence[str] | str, *, timeout: float | None = None, input: bytes | str | None = None,
             env: Mapping[str, str] | None = None, check: bool = False) -> ExecResult:
        """Run a command in the guest and wait for it, like ``subprocess.run(capture_output=True)``.

        ``argv[0]`` is looked up in the guest's PATH; a string runs through ``sh -c``.  ``env``
        replaces the environment (as ``subprocess.run`` does; give ``PATH`` if the program needs
        it).  ``returncode`` is ``-N`` when signal N ended the command.  When ``timeout`` passes the
        command is killed and :class:`VMTimeout` raised; ``check`` raises :class:`VMError` on a
        non-zero status.
        """
        args = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        data = input.encode() if isinstance(input, str) else input
        qga = self._agent()
        try:
            pid = qga.exec_start(args, env=env, input=data)
            try:
                st = qga.wait_exec(pid, timeout)
            except QgaTimeout:
                try:
                    qga.run(["kill", "-KILL", str(pid)], timeout=10)
                except QgaError:
                    pass
                raise VMTimeout(f"{args[0]}: still running after {timeout:g}s; killed") from None
        except QgaError as e:
            raise VMError(f"exec {args[0]}: {e}") from None
        code = st.exitcode if st.exitcode is not None else (-st.signal if st.signal else -1)
        result = ExecResult(args, code, st.stdout, st.stderr, st.signal)
        if check and code:
            raise VMError(f"{args[0]} exited with status {code}: {st.stderr.decode(errors='replace')[-500:]}")
        return result

    def exec_stream(self, argv: Sequence[str], on_stdout: Callable[[bytes], object],
                    on_stderr: Callable[[bytes], object], *, timeout: float | None = None,
                    input: bytes | None = None, env: Mapping[str, str] | None = None, poll: float = 0.05) -> int:
        """Run ``argv``, handing its output to the callbacks as it comes; its exit status.

        ``guest-exec`` returns captured output only once the command has ended, so here the
        command writes to two files in the guest's /run and the host reads what they gained
        (``guest-file-read``) while it runs.  A signal N gives ``128 + N``, as a shell reports it.
        """
        qga = self._agent()
        tag = f"/run/pyvmm-exec-{os.getpid()}-{time.monotonic_ns()}"
        out_path, err_path = f"{tag}.out", f"{tag}.err"
        try:
            # "w+" creates the files; the host reads them through these handles while the
            # command's shell writes them through its own.
            handles = [(qga.file_open(out_path, "w+"), on_stdout), (qga.file_open(err_path, "w+"), on_stderr)]
            try:
                script = 'exec "$@" >"$PYVMM_OUT" 2>"$PYVMM_ERR"'
                wrapped = ["sh", "-c", f"PYVMM_OUT={out_path} PYVMM_ERR={err_path}; {script}", "sh", *argv]
                pid = qga.exec_start(wrapped, env=env, input=input, capture_output=False)
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    st = qga.exec_status(pid)
                    got = False
                    for handle, sink in handles:
                        while True:
                            data, _eof = qga.file_read(handle)
                            if not data:
                                break
                            got = True
                            sink(data)
                    if st.exited:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        qga.run(["kill", "-KILL", str(pid)], timeout=10)
                        raise VMTimeout(f"{argv[0]}: still running after {timeout:g}s; killed")
                    if not got:
                        time.sleep(poll)
            finally:
                for handle, _ in handles:
                    qga.file_close(handle)
                qga.exec_start(["rm", "-f", out_path, err_path], capture_output=False)  # not waited for
        except QgaError as e:
            raise VMError(f"exec {argv[0] if argv else ''}: {e}") from None
        if st.exitcode is not None:
            return st.exitcode
        return 128 + st.signal if st.signal else 255

    def write_file(self, path: str, data: bytes | str, *, mode: str = "w") -> None:
        """Write ``data`` to ``path`` in the guest (created or truncated; ``mode="a"`` appends)."""
        try:
            self._agent().write_file(path, data.encode() if isinstance(data, str) else data, mode=mode)
        except QgaError as e:
            raise VMError(f"write_file {path}: {e}") from None

    def read_file(self, path: str) -> bytes:
        try:
            return self._agent().read_file(path)
        except QgaError as e:
            raise VMError(f"read_file {path}: {e}") from None

    def guest_agent(self) -> QgaClient:
        """The QGA client itself, for commands the VM does not wrap (``vm.guest_agent().osinfo()``)."""
        return self._agent()

    # -- QMP -----------------------------------------------------------------------------------
    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """A QMP command's return value; arguments as a mapping or keywords (``vm.qmp("query-status")``)."""
        args = {**(arguments or {}), **kwargs}
        return self._monitor().command(command, args or None)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The QMP events received so far (the last 1000)."""
        return list(self._monitor().events)

    def wait_event(self, name: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """The first QMP event called ``name`` (any event if None), already received or still to come."""
        return self._monitor().wait_event(name, timeout)

    def snapshot(self, path: str | os.PathLike[str], timeout: float = 300.0) -> Path:
        """Save the whole VM (RAM, devices, vCPUs) to ``path``; ``VM(snapshot=path)`` starts from it.

        QMP ``migrate`` to ``exec:cat > PATH``, as with QEMU; the VM is left paused (``resume()``
        continues it).  The VM that starts from the snapshot must be built with the same options.
        """
        target = Path(path).absolute()
        self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(target))}")
        deadline = time.monotonic() + timeout
        while True:
            st = self.qmp("query-migrate") or {}
            status = st.get("status")
            if status == "completed":
                return target
            if status in ("failed", "cancelled"):
                raise VMError(f"snapshot to {target} {status}: {st.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise VMTimeout(f"snapshot to {target} not done after {timeout:g}s (status {status})")
            time.sleep(0.05)

    def pause(self) -> None:
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    # -- ending --------------------------------------------------------------------------------
    def stop(self, timeout: float = 60.0) -> int:
        """A clean stop: the guest powers off (through its agent), then the VMM exits.  Its status.

        A guest that does not stop in time is ended with QMP ``quit``, then killed.
        """
        if not self.running:
            return self.wait(0)
        deadline = time.monotonic() + timeout
        if self._qga is not None:
            try:
                self._qga.shutdown()
            except QgaError as e:
                log.info("guest-shutdown failed (%s); quitting through QMP", e)
        try:
            return self.wait(max(0.0, deadline - time.monotonic()))
        except VMTimeout:
            pass
        try:
            self.qmp("quit")
            return self.wait(10)
        except VMError:
            self.kill()
            return self.wait(10)

    def kill(self) -> None:
        """End the VMM at once (SIGKILL)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the VMM to exit; its exit status.  :class:`VMTimeout` if ``timeout`` passes."""
        if self._proc is None:
            raise VMError("the VM was never started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VMTimeout(f"the VM is still running after {timeout:g}s") from None

    def close(self) -> None:
        """Release everything: connections, the VMM process (killed if still running), the directory."""
        for conn in (self._qga, self._qmp, self._console):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._qga = self._qmp = self._console = None
        for daemon in self._daemons:
            daemon.stop()
        self._daemons = []
        if self._finalizer is not None:
            self._finalizer()  # kills a running VMM, removes the directory
        elif self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
