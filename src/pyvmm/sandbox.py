"""QEMU's ``-sandbox``: a seccomp allow-list installed once the VM is set up.

The filter is built with libseccomp's Python bindings (Debian's ``python3-seccomp``) and
loaded with ``SCMP_FLTATR_CTL_TSYNC``, so it covers every thread the process already has (the
main loop, the QMP thread, virtio iothreads) and every thread started later (vCPUs) inherits
it.  A system call outside the list kills the whole process with SIGSYS, as QEMU's and
Firecracker's filters do; a handful of file-system calls that Python makes on its own
(writing a ``.pyc``, creating a cache directory) fail with EACCES instead, so that a lazy
import cannot kill the VM.  docs/sandbox.md has the table of what is allowed and why.

The allow-list is stricter than QEMU's deny-list: ``-sandbox on`` alone already denies
spawning, privilege changes, resource control and obsolete calls; each sub-option set to
``allow`` adds its group back.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.qemuopts import OptionSyntax, parse, parse_bool

log = logging.getLogger("pyvmm")

SANDBOX_SYNTAX = OptionSyntax("sandbox", implied="enable",
                              keys=("enable", "id", "obsolete", "elevateprivileges", "spawn", "resourcecontrol"))

#: The sub-options and the values QEMU accepts for each.
_CHOICES: dict[str, tuple[str, ...]] = {
    "obsolete": ("allow", "deny"),
    "elevateprivileges": ("allow", "deny", "children"),
    "spawn": ("allow", "deny"),
    "resourcecontrol": ("allow", "deny"),
}


@dataclass
class SandboxConfig:
    """What ``-sandbox`` asked for: on or off, and the groups given back with ``=allow``."""

    enabled: bool = False
    allow: set[str] = field(default_factory=set)  # names from _CHOICES


def parse_sandbox(texts: list[str]) -> SandboxConfig:
    """Every ``-sandbox`` argument, checked as QEMU checks them (sub-options only when on).

    QEMU installs one filter per enabled ``-sandbox``; filters stack, so a group is allowed
    only if every enabled ``-sandbox`` allows it.
    """
    out = SandboxConfig()
    allowed: set[str] | None = None
    for text in texts:
        opts = parse(SANDBOX_SYNTAX, text)
        opts.check_id()
        enable = opts.get("enable")
        if enable is None or not parse_bool(enable, "enable", opts):
            continue
        mine = set()
        for key, values in _CHOICES.items():
            value = opts.get_str(key)
            if value is None:
                continue
            if value not in values:
                raise opts.error(f"invalid argument for {key}")
            if value == "allow":
                mine.add(key)
        out.enabled = True
        allowed = mine if allowed is None else allowed & mine
    out.allow = allowed or set()
    return out


# -- the filter -------------------------------------------------------------------------------

# Open flags that write or create: an open with any of them fails with EACCES.
_O_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
_O_TMPFILE_ONLY = 0o20000000  # __O_TMPFILE (O_TMPFILE is this | O_DIRECTORY)
_CLONE_THREAD = 0x00010000
#: The sub-option groups allowed by the filter this process loaded (None: no filter loaded).
_loaded_allow: frozenset[str] | None = None

#: Groups of system calls allowed outright, with the reason (docs/sandbox.md repeats them).
ALLOWED: dict[str, tuple[str, ...]] = {
    "memory": ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore", "membarrier"),
    "i/o on open descriptors": (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
        "pwritev2", "lseek", "fsync", "fdatasync", "ftruncate", "fallocate", "fadvise64",
        "sync_file_range", "close", "close_range", "dup", "dup2", "dup3", "fcntl", "flock", "fstat",
        "fstatfs", "pipe", "pipe2", "eventfd2", "copy_file_range"),
    "file metadata (Python's import system)": (
        "stat", "lstat", "newfstatat", "statx", "statfs", "access", "faccessat", "faccessat2",
        "readlink", "readlinkat", "getcwd", "getdents64"),
    "removing the VMM's own socket and pid files at exit": ("unlink", "unlinkat"),
    "polling and timers": (
        "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
        "select", "pselect6", "timerfd_create", "timerfd_settime", "timerfd_gettime",
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time"),
    "threads and synchronisation": (
        "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
        "sched_getaffinity", "sched_getparam", "sched_getscheduler", "getpid", "gettid", "getppid",
        "getpgrp", "getpgid", "getsid", "exit", "exit_group", "restart_syscall"),
    "signals (vCPU kicks, SIGTERM, reaping passt at exit)": (
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "rt_sigpending",
        "rt_sigsuspend", "sigaltstack", "kill", "tgkill", "tkill", "wait4", "waitid"),
    "sockets already open (QMP clients, passt, chardevs)": (
        "accept", "accept4", "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg", "sendmmsg",
        "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair"),
    "identity and limits, read only": (
        "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid", "uname",
        "getrlimit", "getrusage", "sysinfo", "getrandom", "getcpu", "times", "capget"),
}

#: Groups given back by ``-sandbox on,NAME=allow``.
OPTIONAL: dict[str, tuple[str, ...]] = {
    "spawn": ("fork", "vfork", "execve", "execveat", "arch_prctl"),  # arch_prctl: a new program's start
    "elevateprivileges": ("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                          "setgroups", "setfsuid", "setfsgid", "capset"),
    "resourcecontrol": ("setpriority", "sched_setparam", "sched_setscheduler", "sched_setattr",
                        "sched_setaffinity", "setrlimit", "mbind", "set_mempolicy", "migrate_pages",
                        "move_pages", "ioprio_set"),
    "obsolete": ("_sysctl", "uselib", "ustat", "sysfs", "create_module", "get_kernel_syms",
                 "query_module", "nfsservctl", "getpmsg", "putpmsg", "afs_syscall", "tuxcall",
                 "security", "vserver"),
}

#: Calls that Python's runtime makes on its own: they fail with EACCES instead of killing.
REFUSED_QUIETLY = ("creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "link", "linkat",
                   "symlink", "symlinkat", "chmod", "fchmodat", "chown", "lchown", "fchownat", "truncate",
                   "utimensat", "utime", "utimes")

# ioctl: KVM's whole range (type 0xAE) and these exact requests.
_KVMIO_TYPE = 0xAE
IOCTLS: dict[str, int] = {
    "TCGETS": 0x5401, "TCSETS": 0x5402, "TCSETSW": 0x5403, "TCSETSF": 0x5404, "TIOCGWINSZ": 0x5413,
    "FIONREAD": 0x541B, "FIONBIO": 0x5421, "FIONCLEX": 0x5450, "FIOCLEX": 0x5451, "TIOCGPTN": 0x80045430,
    "TUNGETIFF": 0x800454d2, "TUNSETOFFLOAD": 0x400454d0, "TUNSETVNETHDRSZ": 0x400454d8,
}
_PR_SET_NAME, _PR_GET_NAME = 15, 16


def _import_seccomp() -> Any:
    try:
        import seccomp  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("-sandbox on: libseccomp's Python bindings are missing "
                          "(Debian: apt-get install python3-seccomp; then scripts/bootstrap)") from None
    return seccomp


def available() -> bool:
    try:
        _import_seccomp()
    except ConfigError:
        return False
    return True


def build_filter(cfg: SandboxConfig) -> Any:
    """The libseccomp filter for ``cfg`` (not loaded)."""
    sc = _import_seccomp()
    f = sc.SyscallFilter(defaction=sc.KILL_PROCESS)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # e.g. x32 or i386 system calls

    def add(action: Any, name: str, *args: Any) -> None:
        try:
            f.add_rule(action, name, *args)
        except (RuntimeError, ValueError, OSError):  # not a system call on this architecture
            log.debug("sandbox: no system call %s here", name)

    for names in ALLOWED.values():
        for name in names:
            add(sc.ALLOW, name)
    for group, names in OPTIONAL.items():
        if group in cfg.allow:
            for name in names:
                add(sc.ALLOW, name)
    eacces = sc.ERRNO(errno.EACCES)
    for name in REFUSED_QUIETLY:
        add(eacces, name)
    # Threads yes, processes no: clone only with CLONE_THREAD; clone3's flags are behind a
    # pointer, so it answers ENOSYS and glibc falls back to clone.
    if "spawn" in cfg.allow:
        add(sc.ALLOW, "clone")
        add(sc.ALLOW, "clone3")
    else:
        add(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
        add(sc.ERRNO(errno.ENOSYS), "clone3")
    # Opens: read-only ones pass (Python imports modules lazily; the kernel is read again at a
    # reset); anything that writes or creates fails with EACCES.
    write_mask = _O_TMPFILE_ONLY
    for flag in _O_WRITE_FLAGS:
        write_mask |= flag
    for name, arg in (("open", 1), ("openat", 2)):
        add(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, write_mask, 0))
        for flag in (*_O_WRITE_FLAGS, _O_TMPFILE_ONLY):
            add(eacces, name, sc.Arg(arg, sc.MASKED_EQ, flag, flag))
    add(eacces, "openat2")
    # ioctl: KVM, the terminal, non-blocking and close-on-exec toggles; never TIOCSTI.
    add(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFF00, _KVMIO_TYPE << 8))
    for request in IOCTLS.values():
        add(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    for option in (_PR_SET_NAME, _PR_GET_NAME):
        add(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, option))
    # getrlimit through prlimit64 (no new limit) only, unless resource control is allowed.
    if "resourcecontrol" in cfg.allow:
        add(sc.ALLOW, "prlimit64")
    else:
        add(sc.ALLOW, "prlimit64", sc.Arg(2, sc.EQ, 0))
    return f


def prepare(cfg: SandboxConfig) -> Callable[[], None]:
    """Build the filter now (a few milliseconds); the returned function loads it for every
    thread of this process, after which it cannot be undone.  Nothing to do when off."""
    if not cfg.enabled:
        return lambda: None
    f = build_filter(cfg)

    def load() -> None:
        global _loaded_allow
        f.load()
        _loaded_allow = frozenset(cfg.allow)
        log.debug("sandbox: seccomp filter installed (allowing: %s)", ", ".join(sorted(cfg.allow)) or "nothing extra")

    return load


def refusal(needs_socket: bool, needs_spawn: bool) -> str | None:
    """Why the loaded filter would kill the process for an operation that makes a new socket or
    starts a program (e.g. ``migrate unix:`` or ``exec:``), or None if nothing forbids it: the
    caller answers with this instead of dying with SIGSYS."""
    if _loaded_allow is None:
        return None
    if needs_socket:
        return "-sandbox on forbids new sockets; pass a connected socket with getfd and use fd:NAME"
    if needs_spawn and "spawn" not in _loaded_allow:
        return "-sandbox on forbids starting programs (spawn=deny); pass a descriptor with getfd and use fd:NAME"
    return None


def install(cfg: SandboxConfig) -> None:
    """Build and load the filter at once."""
    prepare(cfg)()


# -- the test-only hook ----------------------------------------------------------------------

TEST_HOOK_ENV = "PYVMM_TEST_HOOKS"


def test_hooks_enabled() -> bool:
    return os.environ.get(TEST_HOOK_ENV) == "1"


def attempt(call: str, path: str = "") -> str:
    """Make one system call the sandbox forbids (the QMP test hook ``x-pyvmm-test-syscall``).

    Returns what happened when the call was not refused by killing the process.
    """
    if call == "execve":
        os.execvp("true", ["true"])
    if call == "listen":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            s.listen()
        finally:
            s.close()
        return "listening"
    if call == "open-write":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        return "opened"
    if call == "open-read":
        fd = os.open(path, os.O_RDONLY)
        os.close(fd)
        return "opened"
    if call == "ptrace":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # PTRACE_ATTACH to a pid that cannot exist: unsandboxed, it fails with ESRCH and stops nobody
        rc = libc.ptrace(16, 0x7FFFFFFF, 0, 0)
        return f"ptrace returned {rc} ({os.strerror(ctypes.get_errno())})"
    raise ValueError(f"unknown call '{call}' (execve, listen, open-write, open-read, ptrace)")
