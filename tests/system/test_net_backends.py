"""Network back-ends and options: option parsing, tap (IFF_VNET_HDR) and passt, each in its own netns."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pyvmm.errors import ConfigError
from pyvmm.net.options import format_mac, parse_mac, parse_netdev, random_mac
from support.netns import TAP_HOST_ADDR, USER_GATEWAY, in_ns, netns, setup_user_ns


def test_parse_netdev():
    s = parse_netdev("user,id=n0")
    assert (s.kind, s.id) == ("user", "n0")
    t = parse_netdev("tap,id=n1,ifname=tap0,script=no,downscript=no")
    assert (t.kind, t.id, t.ifname) == ("tap", "n1", "tap0")
    j = parse_netdev('{"type":"tap","id":"n2","ifname":"tap1"}')  # QEMU's JSON form
    assert (j.kind, j.id, j.ifname) == ("tap", "n2", "tap1")
    for bad in ("", "bridge,id=x", "user", "user,id=", "user,id=1x", "tap,id=a,ifname=waytoolonginterfacename",
                "tap,id=a,script=/etc/qemu-ifup", "user,id=a,foo=1", "user,id=a,id=b", "tap,id=a,ifname",
                '{"type":"user","id":"a","passt":1}', '{"type":"user",'):
        with pytest.raises(ConfigError):
            parse_netdev(bad)


def test_mac_addresses():
    m = random_mac()
    assert len(m) == 6 and m[0] & 2 and not m[0] & 1
    assert format_mac(parse_mac("52-54-00-AA-bb-0c")) == "52:54:00:aa:bb:0c"
    for bad in ("01:00:5e:00:00:01", "52:54:00:12:34"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


def test_cli_rejects_bad_netdev():
    from conftest import run_pyvmm

    r = run_pyvmm("--netdev", "bridge,id=x", "--kernel", "/nonexistent")
    assert r.returncode == 1 and "--netdev bridge: unsupported type" in r.stderr, r.describe()
    r = run_pyvmm("--accel", "tcg", "--device", "virtio-net-pci,netdev=nope", "--kernel", sys.executable)
    assert r.returncode == 1 and "can't find value 'nope'" in r.stderr, r.describe()


# An ARP request for TARGET from the "guest" (02:00:00:00:00:01, 10.0.9.9), as a frame.
_ARP_SCRIPT = textwrap.dedent("""
    import socket, struct, sys, time
    from pyvmm.loop import MainLoop
    target = socket.inet_aton(sys.argv[2])
    me_mac, me_ip = bytes.fromhex("020000000001"), socket.inet_aton(sys.argv[3])
    arp = b"\\xff" * 6 + me_mac + b"\\x08\\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) \\
        + me_mac + me_ip + bytes(6) + target
    if sys.argv[1] == "tap":
        import subprocess
        from pyvmm.net.tap import TapBackend
        b = TapBackend("tap0")
        subprocess.run(["ip", "link", "set", "tap0", "up"], check=True)
        hdr = bytes(12)
    else:
        from pyvmm.net.user import PasstBackend
        b = PasstBackend()
        hdr = b""
    got = []
    loop = MainLoop("t")
    def readable():
        while (f := b.recv()) is not None:
            got.append(f)
    b.start(loop, readable)
    loop.start_thread()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loop.call_soon_threadsafe(lambda: b.send(hdr + arp))
        time.sleep(0.3)
        for f in got:
            f = f[len(hdr):]
            if f[12:14] == b"\\x08\\x06" and f[20:22] == b"\\x00\\x02" and f[28:32] == target:
                print("ARP-REPLY", f[22:28].hex(), "hdrlen", len(hdr))
                loop.stop_thread(); b.close(); sys.exit(0)
    print("no reply; frames:", [f.hex()[:80] for f in got])
    sys.exit(1)
""")


def test_tap_backend_arp_in_netns(tmp_path):
    script = tmp_path / "arp.py"
    script.write_text(_ARP_SCRIPT)
    with netns("pyvmm-tap") as ns:
        subprocess.run(in_ns(ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"), check=True)
        subprocess.run(in_ns(ns, "ip", "addr", "add", f"{TAP_HOST_ADDR}/24", "dev", "tap0"), check=True)
        r = subprocess.run(in_ns(ns, sys.executable, str(script), "tap", TAP_HOST_ADDR, "10.0.3.9"),
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "ARP-REPLY" in r.stdout, r.stdout + r.stderr


def test_passt_backend_arp_in_netns(tmp_path):
    import shutil

    assert shutil.which("passt"), "passt is missing (apt-get install passt)"
    script = tmp_path / "arp.py"
    script.write_text(_ARP_SCRIPT)
    with netns("pyvmm-user") as ns:
        setup_user_ns(ns)
        r = subprocess.run(in_ns(ns, sys.executable, str(script), "user", USER_GATEWAY, "10.0.2.15"),
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "ARP-REPLY" in r.stdout, r.stdout + r.stderr
