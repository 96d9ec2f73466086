"""pyvmm.qemuopts: QEMU's QemuOpts and JSON option syntax (no VM, no processes)."""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.qemuopts import OptionSyntax, format_opts, parse, parse_bool, parse_int, parse_size, split_opts

M = OptionSyntax("m", implied="size", keys=("size", "slots", "maxmem"))
SMP = OptionSyntax("smp", implied="cpus")
DEVICE = OptionSyntax("device", implied="driver", json=True)
MSG = OptionSyntax("msg", keys=("timestamp", "guest-name"))
DRIVE = OptionSyntax("drive")


def test_implied_first_key():
    assert parse(M, "16M").values == {"size": "16M"}
    assert parse(M, "size=16M").values == {"size": "16M"}
    assert parse(SMP, "2,sockets=2").values == {"cpus": "2", "sockets": "2"}
    assert parse(DEVICE, "virtio-rng-pci,id=r0").values == {"driver": "virtio-rng-pci", "id": "r0"}


def test_implied_key_only_for_the_first_element():
    # "16M=x": the first element has a '=', so its key is "16M" (QEMU: Invalid parameter '16M')
    with pytest.raises(ConfigError, match=r"^-m 16M=x: Invalid parameter '16M'$"):
        parse(M, "16M=x")
    # a later element without '=' is a flag, not a value for the implied key
    assert split_opts("a,b", "k") == [("k", "a", False), ("b", "on", True)]


def test_misspelt_key_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match=r"^-m sise=16M: Invalid parameter 'sise'$"):
        parse(M, "sise=16M")


def test_double_comma_escapes_a_comma_in_values():
    opts = parse(DRIVE, "file=/tmp/a,,b.img,format=raw")
    assert opts.values == {"file": "/tmp/a,b.img", "format": "raw"}
    assert parse(DEVICE, "x,serial=a,,,,b").values == {"driver": "x", "serial": "a,,b"}
    assert parse(OptionSyntax("name", implied="guest"), "foo,,bar").values == {"guest": "foo,bar"}


def test_format_opts_round_trips():
    values = {"file": "/tmp/a,b,,c.img", "readonly": True, "n": 3}
    assert parse(DRIVE, format_opts(values)).values == {"file": "/tmp/a,b,,c.img", "readonly": "on", "n": "3"}


def test_flags_and_negated_flags():
    assert parse(MSG, "timestamp").values == {"timestamp": "on"}
    assert parse(MSG, "notimestamp").values == {"timestamp": "off"}


def test_last_occurrence_wins():
    assert parse(M, "16M,size=32M").values == {"size": "32M"}


def test_trailing_comma_and_empty_first_element():
    assert parse(M, "16M,").values == {"size": "16M"}
    with pytest.raises(ConfigError, match="Invalid parameter 'bad'"):
        parse(OptionSyntax("name", implied="guest", keys=("guest",)), ",bad")


def test_help():
    assert parse(DEVICE, "help").help
    assert parse(OptionSyntax("machine", implied="type", keys=("type",)), "?").help
    assert parse(MSG, "help").help


@pytest.mark.parametrize("text,value", [("on", True), ("yes", True), ("true", True), ("y", True),
                                        ("off", False), ("no", False), ("false", False), ("n", False),
                                        (True, True), (False, False)])
def test_booleans(text, value):
    assert parse_bool(text, "k") is value


@pytest.mark.parametrize("text", ["1", "0", "ON", "", "maybe", 1])
def test_bad_booleans(text):
    with pytest.raises(ConfigError, match="Parameter 'k' expects 'on' or 'off'"):
        parse_bool(text, "k")


def test_bool_error_names_the_option():
    opts = parse(MSG, "timestamp=1")
    with pytest.raises(ConfigError, match=r"^-msg timestamp=1: Parameter 'timestamp' expects 'on' or 'off'$"):
        opts.get_bool("timestamp")


@pytest.mark.parametrize("text,value", [("10", 10), ("0x1f", 31), ("010", 8), ("-3", -3), (244, 244)])
def test_ints(text, value):
    assert parse_int(text, "k") == value


@pytest.mark.parametrize("text", ["yes", "1.5", "", "0x", True])
def test_bad_ints(text):
    with pytest.raises(ConfigError, match="expects integer"):
        parse_int(text, "k")


@pytest.mark.parametrize("text,suffix,value", [("16M", "", 16 << 20), ("512", "M", 512 << 20), ("2G", "", 2 << 30),
                                               ("1.5G", "", 3 << 29), ("4096", "", 4096), ("1k", "", 1024),
                                               ("3E", "", 3 << 60)])
def test_sizes(text, suffix, value):
    assert parse_size(text, "size", default_suffix=suffix) == value


@pytest.mark.parametrize("text", ["16X", "lots", "-5M", "1.5", "", "16 M M", "16E"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError, match="size"):
        parse_size(text, "size")


def test_json_keeps_types():
    opts = parse(DEVICE, '{"driver":"isa-debug-exit","iobase":244,"flag":true,"x":1.5}')
    assert opts.from_json
    assert opts.values == {"driver": "isa-debug-exit", "iobase": 244, "flag": True, "x": 1.5}
    assert opts.get_int("iobase") == 244 and opts.get_bool("flag") is True


def test_json_only_where_the_option_takes_it():
    # -machine has no JSON form in QEMU 7.2: '{' is just the start of a type name
    opts = parse(OptionSyntax("machine", implied="type"), '{"type":"pc"}')
    assert not opts.from_json and opts.values["type"] == '{"type":"pc"}'
    # a leading space: not JSON (QEMU looks at the first character)
    assert parse(DEVICE, ' {"driver":"x"}').values["driver"] == ' {"driver":"x"}'


@pytest.mark.parametrize("text,msg", [('{"driver":"virtio-rng-pci",', "JSON parse error"),
                                      ('{"driver":"a","driver":"b"}', "duplicate key 'driver'"),
                                      ("{1}", "JSON parse error")])
def test_json_errors_name_the_option(text, msg):
    with pytest.raises(ConfigError, match=r"^-device \{") as exc:
        parse(DEVICE, text)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_typed_accessors_refuse_wrong_json_types():
    opts = parse(DEVICE, '{"driver":"x","id":3,"iobase":"0xf4"}')
    with pytest.raises(ConfigError, match="expected: string"):
        opts.get_str("id")
    with pytest.raises(ConfigError, match="expects an identifier"):
        opts.check_id()
    assert opts.get_int("iobase") == 0xF4  # strings still parse as QemuOpts values would


@pytest.mark.parametrize("ident,ok", [("r0", True), ("a.b-c_d", True), ("1bad", False), ("", False),
                                      ("a b", False), ("-x", False)])
def test_ids(ident, ok):
    opts = parse(DEVICE, f"x,id={ident}")
    if ok:
        assert opts.check_id() == ident
    else:
        with pytest.raises(ConfigError, match="Parameter 'id' expects an identifier"):
            opts.check_id()


def test_check_keys():
    opts = parse(DEVICE, "virtio-rng-pci,bogus=1")
    with pytest.raises(ConfigError, match=r"^-device virtio-rng-pci,bogus=1: Invalid parameter 'bogus'$"):
        opts.check_keys(("driver", "id"))
