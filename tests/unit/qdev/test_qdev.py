"""pyvmm.qdev: typed properties, the registry built from the device modules, the device tree."""

from __future__ import annotations

import pytest

import pyvmm.devices
from pyvmm.devices import device_registry
from pyvmm.errors import ConfigError
from pyvmm.qdev import BusKind, DeviceTree, DeviceType, Prop, PropType, Registry, VirtioType
from pyvmm.qdev.props import convert


def _p(kind: PropType) -> Prop:
    return Prop("x", kind)


@pytest.mark.parametrize(("kind", "value", "typed", "want"), [
    (PropType.UINT32, "0xf4", False, 0xF4), (PropType.UINT32, "010", False, 8), (PropType.UINT32, 244, True, 244),
    (PropType.UINT16, "65535", False, 0xFFFF), (PropType.UINT8, "255", False, 255),
    (PropType.BOOL, "on", False, True), (PropType.BOOL, "no", False, False), (PropType.BOOL, True, True, True),
    (PropType.STR, "d0", False, "d0"), (PropType.STR, "a,b", True, "a,b"),
    (PropType.PCI_DEVFN, "5", False, 5 << 3), (PropType.PCI_DEVFN, "1f", False, 31 << 3),
    (PropType.PCI_DEVFN, "0x10", False, 16 << 3), (PropType.PCI_DEVFN, "06.0", False, 6 << 3),
    (PropType.PCI_DEVFN, "3.2", False, 3 << 3 | 2), (PropType.PCI_DEVFN, 40, True, 40),
    (PropType.MACADDR, "52:54:00:12:34:56", False, bytes.fromhex("525400123456")),
])
def test_values_convert_as_qemu_reads_them(kind, value, typed, want):
    assert convert(_p(kind), value, typed=typed) == want


@pytest.mark.parametrize(("kind", "value", "typed", "message"), [
    (PropType.UINT32, "abc", False, "Parameter 'x' expects integer"),
    (PropType.UINT32, "0x1ffffffff", False, "expects uint32_t"), (PropType.UINT32, "-1", False, "expects uint32_t"),
    (PropType.UINT16, "70000", False, "expects uint16_t"), (PropType.UINT8, "256", False, "expects uint8_t"),
    (PropType.UINT32, "0xf4", True, "expected: integer"), (PropType.UINT32, True, True, "expected: integer"),
    (PropType.BOOL, "maybe", False, "does not accept value 'maybe'"), (PropType.BOOL, "on", True, "expected: boolean"),
    (PropType.STR, 5, True, "expected: string"),
    (PropType.PCI_DEVFN, "zz", False, "doesn't take value 'zz'"), (PropType.PCI_DEVFN, "20", False, "doesn't take"),
    (PropType.PCI_DEVFN, "3.8", False, "doesn't take"), (PropType.PCI_DEVFN, 256, True, "doesn't take"),
    (PropType.MACADDR, "52:54:00:12:34", False, "doesn't take value"),
])
def test_bad_values_are_refused_in_one_line(kind, value, typed, message):
    with pytest.raises(ConfigError, match=message) as e:
        convert(_p(kind), value, typed=typed)
    assert "\n" not in str(e.value)


def test_registry_holds_the_drivers_the_issue_names_with_both_transports():
    reg = device_registry()
    names = set(reg.names())
    assert {"virtio-blk-pci", "virtio-blk-device", "virtio-rng-pci", "virtio-rng-device", "virtio-net-pci",
            "virtio-net-device", "virtio-console-pci", "isa-serial", "isa-debug-exit", "pvpanic"} <= names
    assert reg.lookup("virtio-blk-pci").bus is BusKind.PCI and reg.lookup("virtio-blk-device").bus is BusKind.VIRTIO
    pci_props = {p.name for p in reg.lookup("virtio-blk-pci").props}
    mmio_props = {p.name for p in reg.lookup("virtio-blk-device").props}
    assert pci_props - mmio_props == {"addr", "bus"}  # the device is written once; the transport adds its own
    assert reg.lookup("virtio-rng").name == "virtio-rng-device"  # pyvmm's older spellings are aliases
    assert reg.lookup("isa-debug-exit").prop("iobase") == Prop("iobase", PropType.UINT32, 0xF4)


def test_unknown_driver_and_property_use_qemus_words():
    reg = device_registry()
    with pytest.raises(ConfigError, match="'frobnicator' is not a valid device model name"):
        reg.lookup("frobnicator")
    with pytest.raises(ConfigError, match=r"Property 'virtio-rng-pci\.bogus' not found"):
        reg.lookup("virtio-rng-pci").resolve({"bogus": "1"})


def test_discovery_finds_every_module_declaring_types():
    """A device is added in one module: discovery walks the package, nothing lists it by hand."""
    import pkgutil

    declared = set()
    for info in pkgutil.walk_packages(pyvmm.devices.__path__, "pyvmm.devices."):
        module = __import__(info.name, fromlist=["_"])
        for t in getattr(module, "DEVICE_TYPES", ()):
            declared.add(t.name)
    reg = Registry.discover(pyvmm.devices)
    for name in declared:
        assert reg.get(name) is not None or reg.get(f"{name}-pci") is not None, name


def test_registering_a_name_twice_is_a_bug():
    t = DeviceType("x-dev", BusKind.ISA, lambda ctx, p: None)
    with pytest.raises(ValueError):
        Registry([t, t])
    with pytest.raises(ValueError):
        Registry([VirtioType("virtio-x", lambda ctx, p: None, aliases={"x-dev": "pci"}), t])


def test_tree_paths_ids_and_duplicates():
    tree = DeviceTree()
    a = tree.add("virtio-rng-pci", object(), ident="rng0", user=True)
    b = tree.add("virtio-rng-pci", object(), user=True)
    c = tree.add("i8042", object())
    assert (a.path, b.path, c.path) == ("/machine/peripheral/rng0", "/machine/peripheral-anon/device[0]",
                                        "/machine/unattached/device[0]")
    assert tree.find("rng0") is a and tree.find("/machine/unattached/device[0]") is c and tree.find("nope") is None
    with pytest.raises(ConfigError, match="Duplicate ID 'rng0' for device"):
        tree.add("isa-debug-exit", object(), ident="rng0", user=True)
    assert tree.count("virtio-rng-pci") == 2 and len(tree) == 3
