"""query-qmp-schema, QOM introspection and the options libvirt passes: what the probe answers is
generated from pyvmm's own tables, so it must name every command and nothing else."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyvmm import compat_options
from pyvmm.errors import ConfigError
from pyvmm.monitor import qom, schema
from pyvmm.monitor.commands import COMMANDS, version_info
from pyvmm.monitor.errors import QmpError


def _ctx(machine: object | None = None) -> SimpleNamespace:
    return SimpleNamespace(machine=machine or SimpleNamespace())


def test_version_is_the_qemu_interface_level_with_pyvmm_as_package() -> None:
    info = version_info()
    assert info["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert info["package"].startswith("pyvmm ")


def test_schema_lists_exactly_the_command_table_and_resolves_every_type() -> None:
    entities = schema.build(COMMANDS)
    by_name = {e["name"]: e for e in entities}
    commands = {e["name"] for e in entities if e["meta-type"] == "command"}
    assert commands == set(COMMANDS)
    assert "blockdev-add" not in by_name and "device_add" not in by_name
    for e in entities:  # every reference names an entity in the schema
        refs = [e.get("arg-type"), e.get("ret-type"), e.get("element-type")]
        refs += [m["type"] for m in e.get("members", []) if "type" in m]
        for ref in filter(None, refs):
            assert ref in by_name, f"{e['name']} refers to missing type {ref}"
    assert len(by_name) == len(entities), "an entity is listed twice"


def test_schema_marks_optional_arguments_as_qapi_does() -> None:
    by_name = {e["name"]: e for e in schema.build(COMMANDS)}
    args = by_name[by_name["qom-list-types"]["arg-type"]]["members"]
    assert {m["name"]: "default" in m for m in args} == {"implements": True, "abstract": True}
    req = by_name[by_name["device-list-properties"]["arg-type"]]["members"]
    assert req == [{"name": "typename", "type": "str"}]
    assert by_name["query-qmp-schema"]["arg-type"] == "q_empty"
    assert {e["name"] for e in by_name.values() if e["meta-type"] == "event"} >= {"SHUTDOWN", "RESUME", "STOP"}


def test_qom_types_have_both_accelerators_and_registry_devices() -> None:
    names = {t["name"] for t in qom._qom_list_types(_ctx(), {})}
    assert {"tcg-accel", "kvm-accel", "none-machine", "pc-machine", "virtio-blk-pci", "isa-serial"} <= names
    assert "device" not in names  # abstract types only on request
    pci = {t["name"] for t in qom._qom_list_types(_ctx(), {"implements": "pci-device"})}
    assert "virtio-blk-pci" in pci and "isa-serial" not in pci


def test_property_lists_and_device_not_found() -> None:
    props = {p["name"] for p in qom._device_list_properties(_ctx(), {"typename": "isa-serial"})}
    assert "chardev" in props
    assert qom._qom_list_properties(_ctx(), {"typename": "memory-backend-file"})  # libvirt needs a list
    assert qom._qom_list_properties(_ctx(), {"typename": "none-machine"})
    with pytest.raises(QmpError) as e:
        qom._device_list_properties(_ctx(), {"typename": "e1000"})
    assert e.value.to_json() == {"class": "DeviceNotFound", "desc": "Device 'e1000' not found"}
    with pytest.raises(QmpError):
        qom._qom_list_properties(_ctx(), {"typename": "no-such-type"})


def test_query_kvm_reports_the_accelerator_in_use() -> None:
    assert qom._query_kvm(_ctx(SimpleNamespace(accelerator=lambda: "tcg")), {})["enabled"] is False
    assert qom._query_kvm(_ctx(SimpleNamespace(accelerator=lambda: "kvm")), {})["enabled"] is True


def test_qom_list_walks_the_device_tree() -> None:
    machine = SimpleNamespace(qom_devices=lambda: [("/machine/peripheral/virtio-disk0", "virtio-blk-pci",
                                                    [("drive", "str")])])
    listing = qom._qom_list(_ctx(machine), {"path": "/machine/peripheral"})
    assert {"name": "virtio-disk0", "type": "child<virtio-blk-pci>"} in listing
    device = qom._qom_list(_ctx(machine), {"path": "/machine/peripheral/virtio-disk0"})
    assert {"name": "drive", "type": "str"} in device
    with pytest.raises(QmpError):
        qom._qom_list(_ctx(machine), {"path": "/machine/nowhere"})


def test_command_line_options_name_qemu_lists() -> None:
    from pyvmm.monitor.cmdline_options import command_line_options

    table = {o["option"]: {p["name"] for p in o["parameters"]} for o in command_line_options()}
    assert "debug-threads" in table["name"] and "mem-lock" in table["overcommit"]
    assert "strict" in table["boot-opts"] and "usb" in table["machine"]


def test_secret_objects(tmp_path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\x01\x02")
    got = compat_options.parse_objects([f"secret,id=k,format=raw,file={key}",
                                        '{"qom-type":"secret","id":"b","data":"cHc=","format":"base64"}'])
    assert got == {"k": b"\x01\x02", "b": b"pw"}
    for bad in ("secret,id=s", "secret,id=s,data=x,file=y", "secret,id=s,data=x,keyid=k", "rng-random,id=r",
                "secret,id=s,data=!!,format=base64"):
        with pytest.raises(ConfigError):
            compat_options.parse_objects([bad])


def test_overcommit_and_globals() -> None:
    compat_options.check_overcommit(["mem-lock=off", "mem-lock=off,cpu-pm=off"])
    compat_options.check_globals(["PIIX4_PM.disable_s3=1", "driver=PIIX4_PM,property=disable_s4,value=1"])
    for bad in (["mem-lock=on"], ["cpu-pm=on"]):
        with pytest.raises(ConfigError):
            compat_options.check_overcommit(bad)
    for g in ("PIIX4_PM.disable_s3=0", "kvm-pit.lost_tick_policy=delay", "nonsense"):
        with pytest.raises(ConfigError):
            compat_options.check_globals([g])


def test_monitor_on_an_inherited_listening_fd() -> None:
    import socket

    from pyvmm.config import parse_chardev_option
    from pyvmm.monitor.server import MonitorSpec, _listen

    assert parse_chardev_option("socket,id=charmonitor,fd=7,server=on,wait=off") == \
        ("charmonitor", "fd:7,server=on,wait=off")
    with pytest.raises(ConfigError):
        parse_chardev_option("socket,id=m,fd=7")  # a client socket: refused
    srv = socket.socket(socket.AF_UNIX)
    srv.bind("\0pyvmm-test-inherited-fd")
    srv.listen(1)
    fd = srv.detach()
    spec = MonitorSpec.parse(f"fd:{fd},server=on,wait=off")
    assert (spec.kind, spec.fd, spec.wait) == ("fd", fd, False)
    sock = _listen(spec)
    try:
        assert sock.fileno() == fd
    finally:
        sock.close()
    a, b = socket.socketpair()
    try:
        with pytest.raises(Exception, match="not a listening"):
            _listen(MonitorSpec.parse(f"fd:{a.fileno()},server=on"))
    finally:
        a.close()
        b.close()


def test_netdev_tap_on_a_passed_fd() -> None:
    """-netdev tap,fd=N,vhost=off: libvirt opens the tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) and passes it."""
    import fcntl
    import os

    from pyvmm.errors import DeviceError
    from pyvmm.net import tap
    from pyvmm.net.options import parse_netdev

    spec = parse_netdev("tap,fd=9,id=hostnet0,vhost=off")
    assert (spec.kind, spec.fd, spec.id) == ("tap", 9, "hostnet0")
    for bad in ("tap,fd=9,id=n,vhost=on", "tap,fd=x,id=n", "tap,fd=9,ifname=t0,id=n"):
        with pytest.raises(ConfigError):
            parse_netdev(bad)
    for flags, ok in ((tap.IFF_TAP | tap.IFF_NO_PI | tap.IFF_VNET_HDR, True), (tap.IFF_TAP | tap.IFF_NO_PI, False)):
        fd = os.open(tap.TUN_DEVICE, os.O_RDWR)
        try:
            fcntl.ioctl(fd, tap.TUNSETIFF, tap.IfReq(ifr_name=b"", ifr_flags=flags))
            if ok:
                backend = tap.TapBackend.from_fd(fd)
                assert backend.name.startswith("tap") and not os.get_blocking(fd)
            else:
                with pytest.raises(DeviceError, match="IFF_VNET_HDR"):
                    tap.TapBackend.from_fd(fd)
        finally:
            os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(DeviceError, match="not a tap"):
            tap.TapBackend.from_fd(r)
    finally:
        os.close(r)
        os.close(w)
