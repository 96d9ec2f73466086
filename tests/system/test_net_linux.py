"""Guest-level acceptance for virtio-net-pci: stock Debian kernel (guest kit) on tcg, one boot.

The VM runs inside a network namespace of its own (``ip netns exec``) with two NICs:

* eth0 on ``--netdev user`` (passt): the guest gets its address by DHCP from passt and
  fetches a page from an HTTP server the test runs on the namespace's loopback, reached
  through the gateway address (passt maps it to the host loopback).  The namespace has no
  route out, so passt cannot reach anything else.
* eth1 on ``--netdev tap`` (a tap the test created in the namespace): the guest pings the
  host side of the tap.

The same boot checks the PCI view (vendor/device ids, the host bridge), MRG_RXBUF on eth1,
and the other virtio-pci devices: virtio-blk-pci on an ``if=none`` drive and virtio-rng-pci.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from support.netns import TAP_GUEST_ADDR, TAP_HOST_ADDR, USER_GATEWAY, in_ns, netns, setup_tap_ns, setup_user_ns

pytestmark = pytest.mark.slow

DHCP_SCRIPT = ("printf '#!/bin/sh\\n[ $1 = bound ] || exit 0\\nip addr add $ip/$mask dev $interface\\n"
               "ip route add default via $router dev $interface\\necho dhcp-bound=$ip gw=$router\\n' > /tmp/dh")


def _free_port(ns: str) -> int:
    return 20000 + secrets.randbelow(20000)


def _wait_http(ns: str, port: int) -> None:
    for _ in range(100):
        r = subprocess.run(in_ns(ns, sys.executable, "-c",
                                 f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"),
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    pytest.fail("HTTP server in the namespace did not start", pytrace=False)


def test_linux_virtio_net_user_dhcp_http_and_tap_ping(tmp_path):
    assert shutil.which("passt"), "passt is missing (apt-get install passt)"
    token = secrets.token_hex(16)
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text(f"pyvmm-net-{token}\n")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(f"pyvmm-disk-{token}\n".encode().ljust(1 << 20, b"\0"))
    with netns("pyvmm-net") as ns:
        setup_user_ns(ns)
        setup_tap_ns(ns, "tap0")
        port = _free_port(ns)
        http = subprocess.Popen(in_ns(ns, sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                      "--directory", str(www), str(port)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_http(ns, port)
            script = (f"{DHCP_SCRIPT} && chmod +x /tmp/dh && ip link set eth0 up && "
                      "udhcpc -i eth0 -n -q -t 10 -T 1 -s /tmp/dh && "
                      f"wget -q -O - http://{USER_GATEWAY}:{port}/hello.txt && "
                      f"ip addr add {TAP_GUEST_ADDR}/24 dev eth1 && ip link set eth1 up && "
                      f"ping -c 3 -W 5 {TAP_HOST_ADDR} && "
                      "echo eth0=$(cat /sys/class/net/eth0/address) eth1=$(cat /sys/class/net/eth1/address) && "
                      "echo mrg=$(cut -c16 /sys/class/net/eth1/device/features) && "
                      "head -c 44 /dev/vda && echo rng=$(cat /sys/class/misc/hw_random/rng_current) && "
                      "for d in /sys/bus/pci/devices/*; do echo pcidev $(basename $d) $(cat $d/vendor) "
                      "$(cat $d/device); done && grep -E 'virtio|PCI' /proc/interrupts; true")
            assert '"' not in script and len(script) < 1500
            cmd = in_ns(ns, sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", "-m", "512M",
                        "--netdev", "user,id=u0", "--netdev", "tap,id=t0,ifname=tap0",
                        "--device", "virtio-net-pci,netdev=u0,mac=52:54:00:12:34:56,addr=3",
                        "--device", "virtio-net-pci,netdev=t0,mac=52:54:00:12:34:57,addr=4,mrg_rxbuf=on",
                        "--drive", f"file={disk},format=raw,if=none,id=d0", "--device", "virtio-blk-pci,drive=d0",
                        "--device", "virtio-rng-pci",
                        "--append", f'console=ttyS0 panic=-1 quiet pyvmm_run="{script}"')
            try:
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"").decode(errors="replace")
                pytest.fail(f"guest did not finish:\n{out[-4000:]}", pytrace=False)
        finally:
            http.terminate()
            http.wait()
    out = r.stdout.decode(errors="replace").replace("\r", "")
    desc = f"status {r.returncode}\n--- serial ---\n{out[-5000:]}\n--- stderr ---\n{r.stderr.decode()[-3000:]}"
    assert "pyvmm-guest: exit status 0" in out, desc
    assert re.search(r"dhcp-bound=10\.0\.2\.15 gw=10\.0\.2\.2", out), desc
    assert f"pyvmm-net-{token}" in out, desc
    assert re.search(r"3 packets transmitted, 3 packets received", out), desc
    assert "eth0=52:54:00:12:34:56 eth1=52:54:00:12:34:57" in out, desc
    assert "pcidev 0000:00:03.0 0x1af4 0x1041" in out and "pcidev 0000:00:04.0 0x1af4 0x1041" in out, desc
    assert "pcidev 0000:00:00.0 0x8086" in out, desc
    assert "mrg=1" in out and f"pyvmm-disk-{token}" in out and "rng=virtio_rng." in out, desc
    assert re.search(r"PCI-MSI.*virtio\d-input", out), desc  # MSI-X through the tcg LAPICs
    assert re.search(r"pcidev 0000:00:0\w\.0 0x1af4 0x1042", out), desc
