"""pyvmm.config: the typed config, -smp's topology rules and -device specs (no VM)."""

from __future__ import annotations

import pytest

from pyvmm.config import DeviceSpec, MachineConfig, SmpConfig, parse_chardev_option
from pyvmm.errors import ConfigError


@pytest.mark.parametrize("text,expect", [
    # (cpus, sockets, dies, cores, threads, maxcpus), as QEMU 7.2's pc machine fills them in
    ("2", (2, 1, 1, 2, 1, 2)),
    ("cpus=2", (2, 1, 1, 2, 1, 2)),
    ("2,sockets=2", (2, 2, 1, 1, 1, 2)),
    ("sockets=2,cores=2", (4, 2, 1, 2, 1, 4)),
    ("8,sockets=2,cores=2", (8, 2, 1, 2, 2, 8)),
    ("2,maxcpus=4", (2, 1, 1, 4, 1, 4)),
    ("maxcpus=4", (4, 1, 1, 4, 1, 4)),
    ("4,dies=2", (4, 1, 2, 2, 1, 4)),
    ("threads=2", (2, 1, 1, 1, 2, 2)),
])
def test_smp_fills_missing_values_as_qemu(text, expect):
    s = SmpConfig.parse(text)
    assert (s.cpus, s.sockets, s.dies, s.cores, s.threads, s.maxcpus) == expect


@pytest.mark.parametrize("text,msg", [
    ("4,sockets=2,cores=3", r"product of the hierarchy must match maxcpus: sockets \(2\) \* dies \(1\) \* "
                            r"cores \(3\) \* threads \(0\) != maxcpus \(4\)"),
    ("2,sockets=2,cores=2", "product of the hierarchy"),
    ("2,maxcpus=1", r"maxcpus \(1\) < smp_cpus \(2\)"),
    ("2,clusters=2", "clusters not supported"),
    ("300", "The max CPUs supported by machine 'pc' is 254"),
    ("0", "greater than zero"),
    ("two", "Parameter 'cpus' expects integer"),
    ("-1", "non-negative"),
    ("2,bogus=1", "Invalid parameter 'bogus'"),
])
def test_smp_errors_are_one_line_naming_the_option(text, msg):
    with pytest.raises(ConfigError, match=msg) as exc:
        SmpConfig.parse(text)
    assert str(exc.value).startswith(f"-smp {text}: ") and "\n" not in str(exc.value)


def test_machine_config_smp_is_the_topology_cpus():
    cfg = MachineConfig(topology=SmpConfig.parse("4,sockets=2"))
    assert cfg.smp == 4


def test_device_spec_qemuopts_and_json():
    d = DeviceSpec.parse("isa-debug-exit,iobase=0xf4,iosize=4,id=dbg")
    assert (d.driver, d.id, d.props) == ("isa-debug-exit", "dbg", {"iobase": "0xf4", "iosize": "4", "id": "dbg"})
    assert d.int_prop("iobase", 0) == 0xF4 and d.int_prop("missing", 7) == 7
    j = DeviceSpec.parse('{"driver":"isa-debug-exit","iobase":244,"id":"dbg"}')
    assert (j.driver, j.id, j.props["iobase"]) == ("isa-debug-exit", "dbg", 244)
    assert j.int_prop("iobase", 0) == 244
    with pytest.raises(ConfigError, match="Parameter 'iobase' expects integer"):  # as QEMU's JSON visitor
        DeviceSpec.parse('{"driver":"isa-debug-exit","iobase":"0xf4"}').int_prop("iobase", 0)


def test_device_spec_errors():
    with pytest.raises(ConfigError, match="expects integer"):
        DeviceSpec.parse("isa-debug-exit,iobase=banana").int_prop("iobase", 0)
    with pytest.raises(ConfigError, match="Parameter 'id' expects an identifier"):
        DeviceSpec.parse("virtio-rng-pci,id=1bad")
    with pytest.raises(ConfigError, match="Parameter 'driver' is missing"):
        DeviceSpec.parse('{"id":"x"}')
    # QEMU 7.2 leaves a device with a non-string JSON id anonymous
    assert DeviceSpec.parse('{"driver":"virtio-rng-pci","id":3}').id is None


def test_chardev_option():
    assert parse_chardev_option("socket,id=c0,path=/tmp/a,,b,server=on,wait=off") == \
        ("c0", "unix:/tmp/a,,b,server=on,wait=off")  # ,, stays escaped in the spec
    assert parse_chardev_option("socket,id=c0,path=/tmp/s,server,nowait") == ("c0", "unix:/tmp/s,server=on,wait=off")
    assert parse_chardev_option("file,id=f,path=/tmp/x") == ("f", "file:/tmp/x")
    assert parse_chardev_option("null,id=n") == ("n", "null")
    for bad, msg in (("socket,id=c0", "path=PATH is required"), ("null", "id=NAME is required"),
                     ("tcp,id=t", "unknown back-end"), ("null,id=n,path=x", "Invalid parameter 'path'")):
        with pytest.raises(ConfigError, match=msg):
            parse_chardev_option(bad)
