"""Fuzz target: the manager's request models (pyvmm.manager.models) on arbitrary JSON.

Clients send JSON bodies that become :class:`VmDefinitionIn` (define, update), :class:`KeysIn`
(send-key) and their parts.  Hypothesis sends documents shaped like them (every field, with values
of every JSON type: huge and negative numbers, 1e999, floats for integers, booleans, strings of
digits, relative paths, NULs, control characters, nested junk, unknown keys) and arbitrary bytes
(broken, truncated or non-UTF-8 JSON), through ``model_validate_json`` as a raw body and
``model_validate`` on the parsed value, as FastAPI does.

Asserted: the result is a valid model or a pydantic ``ValidationError`` (with a message and a
location per error), never another exception; a valid model keeps every documented constraint (ranges, name
pattern, absolute NUL-free paths, list lengths), had the declared JSON types already (no coercion
of "2", true or 2.0 to an integer, of 1 to a boolean) and survives a JSON round trip unchanged.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pyvmm.manager.models import (
    MAX_CMDLINE,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    NAME_PATTERN,
    DiskSpec,
    KeysIn,
    NetworkSpec,
    VmDefinitionIn,
)

scalar_st = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, 1, 2, 255, 256, -1, MAX_MEMORY_MIB, MAX_MEMORY_MIB + 1,
                                                              1 << 63, 1 << 64, 10 ** 400]),
    st.floats(), st.sampled_from([1e999, -1e999, 2.0, 2.5, 1e308]),
    st.text(max_size=30), st.sampled_from(["2", "512", "true", "/vmlinuz", "vmlinuz", "/a\x00b", "/", "", "raw",
                                           "qcow2", "user", "tap", "kvm", "tcg", "auto", "virtio-net",
                                           "52:54:00:12:34:56", "a" * 70, "vm-1", "-vm", "ctrl", "x\ny"]))
json_st = st.recursive(scalar_st, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=3), max_leaves=8)


path_st = st.builds(lambda p, t: p + t, st.sampled_from(["/", "/", "", "rel/", "//", "/dev/"]),
                    st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["a\x00b", "x\ny", "."]))
#: Values close to what each field takes (valid or just not), so that documents are often valid.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "name": st.from_regex(NAME_PATTERN, fullmatch=True) | st.sampled_from(["", "-a", "a" * 64, "a b", "ä"]),
    "uuid": st.uuids().map(str) | st.sampled_from(["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"]),
    "vcpus": st.integers(-1, MAX_VCPUS + 2) | st.sampled_from([True, "2", 2.0, 2.5, 1e999]),
    "memory_mib": st.integers(0, MAX_MEMORY_MIB + 2) | st.sampled_from([True, "512", 512.0, 1e999, -1e999]),
    "kernel": path_st, "initrd": path_st, "path": path_st,
    "cmdline": st.text(max_size=40) | st.just("x" * (MAX_CMDLINE + 1)),
    "accel": st.sampled_from(["auto", "kvm", "tcg", "hvf", "", "KVM"]),
    "format": st.sampled_from(["raw", "qcow2", "vmdk", "", "RAW"]),
    "readonly": st.booleans() | st.sampled_from([0, 1, "true", "yes"]),
    "autostart": st.booleans() | st.sampled_from([0, 1, "true", "yes"]),
    "type": st.sampled_from(["user", "tap", "bridge", ""]),
    "model": st.sampled_from(["virtio-net", "e1000", ""]),
    "mac": st.from_regex(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", fullmatch=True)
    | st.sampled_from(["52:54:00:12:34:5", "52-54-00-12-34-56", "52:54:00:12:34:56\n", ""]),
    "tap": st.text(st.sampled_from("tap0_.-/ \x00"), max_size=17),
    "keys": st.lists(st.sampled_from(["ctrl", "alt", "delete", "f1", "A", "", "x" * 21, "ctrl\n"]), max_size=9),
}


def shaped(model: type[BaseModel], nested: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A document with some of ``model``'s fields (mostly plausible values, sometimes anything),
    sometimes with an unknown key."""
    fields = sorted(model.model_fields)

    @st.composite
    def build(draw):
        doc = {}
        for name in draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields))):
            pick = draw(st.integers(0, 3))
            if pick == 0 or (name not in nested and name not in PLAUSIBLE):
                doc[name] = draw(json_st)
            else:
                doc[name] = draw(nested[name] if name in nested else PLAUSIBLE[name])
        if draw(st.integers(0, 7)) == 0:
            doc[draw(st.text(max_size=8))] = draw(json_st)
        return doc

    return build()


disk_st = shaped(DiskSpec, {})
net_st = shaped(NetworkSpec, {})
definition_st = shaped(VmDefinitionIn, {"disks": st.lists(disk_st, max_size=5),
                                        "networks": st.lists(net_st, max_size=9)})
keys_st = shaped(KeysIn, {})

MODELS: dict[str, tuple[type[BaseModel], st.SearchStrategy[Any]]] = {
    "VmDefinitionIn": (VmDefinitionIn, definition_st),
    "DiskSpec": (DiskSpec, disk_st),
    "NetworkSpec": (NetworkSpec, net_st),
    "KeysIn": (KeysIn, keys_st),
}


def _path_ok(p: object) -> bool:
    return isinstance(p, str) and p.startswith("/") and "\0" not in p


def check_constraints(m: BaseModel) -> None:
    if isinstance(m, VmDefinitionIn):
        assert re.fullmatch(NAME_PATTERN, m.name)
        assert type(m.vcpus) is int and 1 <= m.vcpus <= MAX_VCPUS
        assert type(m.memory_mib) is int and 2 <= m.memory_mib <= MAX_MEMORY_MIB
        assert m.kernel is None or _path_ok(m.kernel)
        assert m.initrd is None or _path_ok(m.initrd)
        assert len(m.cmdline) <= MAX_CMDLINE and not re.search(r"[\x00-\x1f\x7f]", m.cmdline)
        assert m.accel in ("auto", "kvm", "tcg") and type(m.autostart) is bool
        assert len(m.disks) <= 4 and len(m.networks) <= 8
        for d in m.disks:
            check_constraints(d)
        for n in m.networks:
            check_constraints(n)
    elif isinstance(m, DiskSpec):
        assert _path_ok(m.path) and m.format in ("raw", "qcow2") and type(m.readonly) is bool
    elif isinstance(m, NetworkSpec):
        assert m.type in ("user", "tap") and m.model == "virtio-net"
        assert m.mac is None or re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", m.mac)
        assert m.tap is None or re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", m.tap)
    elif isinstance(m, KeysIn):
        assert 1 <= len(m.keys) <= 8 and all(re.fullmatch(r"[a-z0-9_]{1,20}", k) for k in m.keys)


def validate(model: type[BaseModel], how: str, data: Any) -> None:
    try:
        m = model.model_validate_json(data) if how == "json" else model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        assert errors and all(isinstance(err["msg"], str) and isinstance(err["loc"], tuple) for err in errors)
        return
    check_constraints(m)
    again = model.model_validate_json(m.model_dump_json())
    assert again == m, (m, again)
    if how == "json":
        try:
            data = json.loads(data)
        except ValueError:
            raise AssertionError(f"{data!r} is no JSON, yet it was accepted") from None
    assert_not_coerced(model, data)


#: Fields whose JSON type must already be right (issue 11: "2", true and 2.0 are no integers).
_STRICT = {"vcpus": int, "memory_mib": int, "readonly": bool, "autostart": bool}


def assert_not_coerced(model: type[BaseModel], doc: Any) -> None:
    """An accepted document had the declared JSON types: nothing was converted."""
    assert isinstance(doc, dict), f"{model.__name__} accepted a {type(doc).__name__}"
    for key, value in doc.items():
        want = _STRICT.get(key)
        if want is not None:
            assert type(value) is want, f"{model.__name__}.{key}: {value!r} was coerced to {want.__name__}"
        if key in ("disks", "networks"):
            for item in value:
                assert_not_coerced(DiskSpec if key == "disks" else NetworkSpec, item)
        if key in ("name", "cmdline", "kernel", "initrd", "path", "mac", "tap", "uuid"):
            assert value is None or isinstance(value, str), f"{model.__name__}.{key}: {value!r} was coerced"


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # 1e999 arrives as a number too: Infinity or 1e999


@st.composite
def case(draw):
    name = draw(st.sampled_from(sorted(MODELS)))
    model, doc_st = MODELS[name]
    doc = draw(doc_st | json_st)
    how = draw(st.sampled_from(["python", "json", "json-bytes"]))
    if how == "python":
        return name, how, doc
    raw = _dumps(doc).replace(b"Infinity", b"1e999")
    if how == "json-bytes":  # break the text: cut it, splice bytes in
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=8)) + raw[cut + draw(st.integers(0, 4)):]
    return name, how, raw


def test_fuzz_manager_models(fuzz) -> None:
    def check(sc) -> None:
        name, how, data = sc
        model = MODELS[name][0]
        validate(model, "python" if how == "python" else "json", data)
        if how == "python" and isinstance(data, dict):
            # the same document as a raw body; NaN is not JSON, so only finite documents go as text
            text = json.dumps(data, allow_nan=True)
            if "NaN" not in text:
                validate(model, "json", text.replace("-Infinity", "-1e999").replace("Infinity", "1e999"))

    fuzz.run("manager-models", case(), check)


def test_non_finite_and_huge_numbers_are_validation_errors() -> None:
    """The cases that once gave a 500 (issue 11): they are ValidationErrors at the model."""
    for body in (b'{"name": "a", "memory_mib": 1e999}', b'{"name": "a", "memory_mib": 1e308}',
                 b'{"name": "a", "vcpus": 1e999}', b'{"name": "a", "vcpus": 18446744073709551616}'):
        try:
            VmDefinitionIn.model_validate_json(body)
        except ValidationError as e:
            assert e.errors()
        else:
            raise AssertionError(f"{body!r} was accepted")
    assert math.isinf(json.loads("1e999"))
