"""pyvmm.cli: QEMU's option names and what each option puts in the config (no VM, no processes)."""

from __future__ import annotations

import pytest

from pyvmm.cli import configure, parse_run_args
from pyvmm.errors import ConfigError


def cfg(*argv: str):
    return configure(parse_run_args(list(argv)))


@pytest.mark.parametrize("argv,name", [
    (["-machine", "pc"], "machine"), (["--machine", "pc"], "machine"), (["-M", "pc"], "machine"),
    (["-m", "16M"], "m"), (["--m", "16M"], "m"), (["--memory", "16M"], "m"), (["--memory=16M"], "m"),
    (["-mon", "x"], "mon"), (["-msg", "timestamp=on"], "msg"), (["-S"], "S"), (["--S"], "S"),
])
def test_exact_names_one_or_two_dashes(argv, name):
    assert list(parse_run_args(argv).given) == [name]


@pytest.mark.parametrize("argv,msg", [
    (["-machin", "pc"], "-machin: invalid option"), (["-mach", "pc"], "-mach: invalid option"),
    (["-mem", "16M"], "-mem: invalid option"), (["-ms", "x"], "-ms: invalid option"),
    (["-machine"], "-machine: requires an argument"), (["-S=1"], "-S=1: invalid option"),
    (["--nodefaults=1"], "--nodefaults=1: takes no argument"), (["disk.img"], "disk.img: unexpected argument"),
])
def test_unknown_names_prefixes_and_missing_arguments(argv, msg):
    with pytest.raises(ConfigError, match=f"^{msg}"):
        parse_run_args(argv)


def test_defaults():
    c, p = cfg()
    assert (c.machine, c.memory, c.smp, c.accel, c.serial, c.acpi, c.start_paused) == \
        ("pc", 512 << 20, 1, "auto", "stdio", True, False)
    assert not p.daemonize and p.pidfile is None


def test_options_fill_the_config():
    c, p = cfg("-machine", "pc,accel=tcg,usb=off", "-m", "size=64M", "-smp", "4,sockets=2", "-name", "guest=vm1",
               "-uuid", "12345678-ABCD-1234-1234-123456789abc", "-S", "-no-acpi", "-rtc", "base=localtime",
               "-boot", "order=cd,menu=on", "-pidfile", "x.pid", "-nodefaults")
    assert (c.accel, c.memory, c.smp, c.topology.sockets, c.topology.cores) == ("tcg", 64 << 20, 4, 2, 2)
    assert (c.name, c.uuid, c.start_paused, c.acpi, c.rtc_base) == \
        ("vm1", "12345678-abcd-1234-1234-123456789abc", True, False, "localtime")
    assert (c.boot.order, c.boot.menu, c.serial, p.pidfile) == ("cd", True, "none", "x.pid")


def test_merge_options_later_keys_win():
    c, _ = cfg("-m", "16M", "-m", "32M", "-smp", "2", "-smp", "sockets=2")
    assert c.memory == 32 << 20 and (c.smp, c.topology.sockets) == (2, 2)


@pytest.mark.parametrize("argv,accel", [
    (["-enable-kvm"], "kvm"), (["-accel", "tcg"], "tcg"), (["--accel", "auto"], "auto"),
    (["-accel", "tcg", "-accel", "kvm"], "tcg"), (["-machine", "accel=tcg:kvm"], "tcg"),
])
def test_accelerators(argv, accel):
    assert cfg(*argv)[0].accel == accel


def test_mon_on_a_socket_chardev_is_a_qmp_monitor():
    c, _ = cfg("-chardev", "socket,id=m0,path=/tmp/m,,0.sock,server=on,wait=off", "-mon", "chardev=m0,mode=control")
    assert c.qmp == ["unix:/tmp/m,,0.sock,server=on,wait=off"] and c.chardevs == {}


def test_json_device_and_netdev():
    c, _ = cfg("-device", '{"driver":"virtio-rng-pci","id":"r0"}', "-netdev", '{"type":"user","id":"n0"}')
    assert (c.devices[0].driver, c.devices[0].id) == ("virtio-rng-pci", "r0")
    assert (c.netdevs[0].kind, c.netdevs[0].id) == ("user", "n0")


@pytest.mark.parametrize("argv,start", [
    (["-m", "sise=16M"], "-m sise=16M: Invalid parameter 'sise'"),
    (["-machine", "q35"], "-machine q35: pyvmm cannot honour"),
    (["-machine", "pc,bogus=1"], "-machine pc,bogus=1: Property"),
    (["-display", "gtk"], "-display gtk: pyvmm cannot honour"),
    (["-display", "none,gl=on"], "-display none,gl=on: Invalid parameter 'gl'"),
    (["-uuid", "x"], "-uuid x: failed to parse UUID"),
    (["-rtc", "clock=vm"], "-rtc clock=vm: pyvmm cannot honour"),
    (["-boot", "order=cc"], "-boot order=cc: Boot device 'c' was given twice"),
    (["-overcommit", "mem-lock=on"], "-overcommit mem-lock=on: pyvmm cannot honour"),
    (["-global", "PIIX4_PM.disable_s3=0"], "-global PIIX4_PM.disable_s3=0: pyvmm cannot honour"),
    (["-global", "e1000.romfile=x"], "-global e1000.romfile=x: pyvmm cannot honour"),
    (["-object", "secret,id=s,data=x,keyid=k"], "-object secret,id=s,data=x,keyid=k: pyvmm cannot honour"),
    (["-object", "rng-random,id=r"], "-object rng-random,id=r: pyvmm cannot honour"),
    (["-blockdev", "driver=file,filename=x"], "-blockdev driver=file,filename=x: 'node-name' must be specified"),
    (["-audiodev", "pa,id=a"], "-audiodev pa,id=a: pyvmm cannot honour"),
    (["-monitor", "stdio"], "-monitor stdio: pyvmm cannot honour"),
    (["-serial", "null", "-serial", "null"], "-serial null: pyvmm cannot honour a second serial port"),
    (["-serial", "bogus"], "-serial bogus: unknown chardev"),
    (["-daemonize", "-serial", "stdio"], "-daemonize: -serial stdio"),
    (["-machine", "none", "-kernel", "k"], "-kernel: -machine none has no guest"),
    (["-machine", "none", "-smp", "2"], "-smp 2: Invalid SMP CPUs 2"),
    (["-device", "pvpanic,id=x", "-device", "virtio-rng-pci,id=x"],
     "-device virtio-rng-pci,id=x: Duplicate ID 'x' for device"),
    (["-device", '{"driver":"virtio-blk-pci","file":"x","readonly":"on"}'], '-device {"driver":"virtio-blk-pci"'),
    (["-drive", "file=/nonexistent/a,,b.img,if=none,id=d"], "-drive file=/nonexistent/a,,b.img: Could not open"),
])
def test_errors_are_one_line_naming_the_option(argv, start):
    with pytest.raises(ConfigError) as exc:
        cfg(*argv)
    assert str(exc.value).startswith(start) and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("opt", ["-machine", "-device", "-accel"])
def test_help_lists_and_exits_zero(opt, capsys):
    from pyvmm.cli import main

    assert main(["run", opt, "help"]) == 0
    assert capsys.readouterr().out.strip()
