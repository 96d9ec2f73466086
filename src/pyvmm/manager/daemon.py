"""``pyvmmd``: the manager daemon's entry point.

It listens on a unix socket (mode 0600, or 0660 for ``--socket-group``) and,
with ``--listen HOST:PORT``, on TCP, where every API request needs the token
from ``--token-file`` (created with a random token if missing) and TLS is
used when ``--tls-cert``/``--tls-key`` are given.  One lock file per state
directory keeps a second daemon out.  Stopping the daemon (SIGTERM, SIGINT,
or a crash) leaves the VMs running; the next daemon re-attaches to them.

When run as root with ``--vm-user USER`` (and USER exists), VM processes run
as that user with the ``kvm`` group; otherwise they run as the daemon's user.
Either way each VM process gets a cleaned environment, no inherited file
descriptors and its own session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import shlex
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import uvicorn

from pyvmm.manager.api import create_app
from pyvmm.manager.auth import TokenAuth, load_or_create_token
from pyvmm.manager.diskfull import status_and_message
from pyvmm.manager.paths import default_state_dir
from pyvmm.manager.supervisor import ManagerConfig, Supervisor

log = logging.getLogger("pyvmmd")


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: the daemon runs several servers and handles signals once."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def unix_listener(path: Path, group: str | None) -> socket.socket:
    """A listening unix socket that is never reachable with a wider mode than intended."""
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a dead daemon
        else:
            raise SystemExit(f"pyvmmd: another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def tcp_listener(spec: str) -> socket.socket:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    return sock


def listen_url(sock: socket.socket, scheme: str) -> str:
    """The address a browser on this host opens for a TCP listener (a wildcard address names this host)."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class _LogFormat(logging.Formatter):
    """``pyvmmd: message`` for the daemon's own lines, ``pyvmmd: library: message`` for its libraries'."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        own = record.name == log.name or record.name.startswith("pyvmm.manager")
        return f"pyvmmd: {text}" if own else f"pyvmmd: {record.name}: {text}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmmd", description="The pyvmm manager daemon.")
    p.add_argument("--state-dir", type=Path, default=None, help="definitions, VM run files and the socket "
                   "(default /var/lib/pyvmm as root, else $XDG_RUNTIME_DIR/pyvmm)")
    p.add_argument("--socket", type=Path, default=None, help="unix socket path (default STATE_DIR/pyvmmd.sock)")
    p.add_argument("--socket-group", default=None, help="make the unix socket 0660 for this group")
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve HTTP on TCP (token required)")
    p.add_argument("--token-file", type=Path, help="token for TCP clients (default STATE_DIR/token)")
    p.add_argument("--tls-cert", help="PEM certificate for the TCP listener")
    p.add_argument("--tls-key", help="PEM private key for the TCP listener")
    p.add_argument("--vm-user", help="run VM processes as this user when the daemon runs as root")
    p.add_argument("--pyvmm-command", default=None,
                   help="command that runs one VM (default: this Python's 'python -m pyvmm run')")
    p.add_argument("--no-sandbox", action="store_true", help="run VM processes without the seccomp sandbox "
                   "(snapshot, clone and migrate work either way: the daemon passes the state file or socket)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


async def serve(args: argparse.Namespace) -> None:
    # Files the daemon creates (database, token, run directories) are private unless made otherwise.
    os.umask(0o077)
    state_dir: Path = args.state_dir or default_state_dir()
    cfg = ManagerConfig(state_dir=state_dir, vm_user=args.vm_user, sandbox=not args.no_sandbox)
    if args.pyvmm_command:
        cfg.pyvmm_command = shlex.split(args.pyvmm_command)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(state_dir / "pyvmmd.lock", "w")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"pyvmmd: another daemon uses {state_dir}") from None
    token = None
    token_path = args.token_file or state_dir / "token"
    if args.listen:
        try:
            token = load_or_create_token(token_path)
        except ValueError as e:
            raise SystemExit(f"pyvmmd: {e}") from None
    # Bind before touching any VM, so a daemon that cannot serve (port taken, ...) changes nothing.
    sock_path = args.socket or state_dir / "pyvmmd.sock"
    usock = unix_listener(sock_path, args.socket_group)
    try:
        tsock = tcp_listener(args.listen) if args.listen else None
    except OSError as e:
        sock_path.unlink()
        raise SystemExit(f"pyvmmd: cannot listen on {args.listen}: {e.strerror}") from None
    try:
        sup = Supervisor(cfg)
    except (OSError, sqlite3.Error) as e:
        sock_path.unlink()
        _, message = status_and_message(e, f"cannot open the store in {state_dir}")
        raise SystemExit(f"pyvmmd: {message}") from None
    await sup.open()
    app = create_app(sup)
    level = "debug" if args.verbose > 1 else "warning"
    servers: list[tuple[_Server, socket.socket]] = []
    servers.append((_Server(uvicorn.Config(app, lifespan="off", log_level=level, ws="websockets-sansio")), usock))
    log.info("listening on unix:%s (CLI: export PYVMMD_SOCKET=%s)", sock_path, sock_path)
    if tsock is not None:
        assert token is not None    # loaded above: tsock exists only with --listen
        tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key} if args.tls_cert else {}
        guarded = TokenAuth(app, token, hint=f"the token is in {token_path}")
        servers.append((_Server(uvicorn.Config(guarded, lifespan="off", log_level=level, ws="websockets-sansio",
                                               **tls)), tsock))
        base = listen_url(tsock, "https" if tls else "http")
        log.info("listening on %s (token required; it is in %s)", base, token_path)
        log.info("web UI: %s/#token=%s", base, token)
    else:
        log.info("no web UI: it is served over TCP only (add --listen 127.0.0.1:8080)")
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s, _ in servers:
            s.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in servers))
    finally:
        await sup.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        lock.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, handlers=[handler])
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # every VM exit would log an end-of-file
    if args.tls_cert and not args.tls_key:
        print("pyvmmd: --tls-cert needs --tls-key", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
