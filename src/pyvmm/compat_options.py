"""QEMU options management tools pass on every command line, each honoured with its QEMU meaning.

* ``-object secret,id=ID,data=...|file=...[,format=raw|base64]``: a named secret, read at start
  and kept in :data:`SECRETS` (libvirt passes its master key this way).  Encrypted secrets
  (``keyid=``/``iv=``) are refused; memory back-ends are :mod:`pyvmm.memory_options`' and any
  other object type is refused.
* ``-overcommit mem-lock=off,cpu-pm=off``: pyvmm never locks guest RAM and never lets the guest
  idle the host CPU, so only ``off`` is accepted.
* ``-global PIIX4_PM.disable_s3=1`` / ``disable_s4=1``: pyvmm's ACPI tables offer S5 only, so
  S3 and S4 are already disabled; asking for them (``=0``) and every other global is refused.
* ``-no-hpet``: pyvmm has no HPET.
"""

from __future__ import annotations

import base64
import binascii

from pyvmm.errors import ConfigError
from pyvmm.memory_options import BACKEND_KINDS, OBJECT_SYNTAX
from pyvmm.qemuopts import OptionSyntax, Opts, parse

OVERCOMMIT_SYNTAX = OptionSyntax("overcommit", keys=("mem-lock", "cpu-pm"))
GLOBAL_SYNTAX = OptionSyntax("global", keys=("driver", "property", "value"))

#: ``-object secret`` id -> its bytes, for the objects that may name them.
SECRETS: dict[str, bytes] = {}

#: (driver, property) -> the values pyvmm already has (the property's QEMU meaning holds as is).
_GLOBALS = {("PIIX4_PM", "disable_s3"): "its ACPI tables offer no S3 sleep state",
            ("PIIX4_PM", "disable_s4"): "its ACPI tables offer no S4 sleep state"}


def parse_objects(texts: list[str]) -> dict[str, bytes]:
    secrets: dict[str, bytes] = {}
    for text in texts:
        opts = parse(OBJECT_SYNTAX, text)
        qom_type = opts.get_str("qom-type")
        if not qom_type:
            raise opts.error("Parameter 'qom-type' is missing")
        ident = opts.check_id()
        if ident is None:
            raise opts.error("Parameter 'id' is missing")
        if ident in secrets:
            raise opts.error(f"attempt to add duplicate property '{ident}' to object (type 'container')")
        if qom_type in BACKEND_KINDS:  # guest RAM back-ends: pyvmm.memory_options
            continue
        if qom_type != "secret":
            raise opts.error(f"pyvmm cannot honour -object {qom_type} "
                             f"(its only objects are {', '.join(BACKEND_KINDS)} and secret)")
        secrets[ident] = _secret(opts)
    SECRETS.clear()
    SECRETS.update(secrets)
    return secrets


def _secret(opts: Opts) -> bytes:
    opts.check_keys(("qom-type", "id", "data", "file", "format", "keyid", "iv", "loaded"))
    for key in ("keyid", "iv"):
        if key in opts:
            raise opts.error(f"pyvmm cannot honour {key}= (encrypted secrets)")
    fmt = opts.get_str("format", "raw")
    if fmt not in ("raw", "base64"):
        raise opts.error(f"Parameter 'format' does not accept value '{fmt}'")
    data, path = opts.get_str("data"), opts.get_str("file")
    if (data is None) == (path is None):
        raise opts.error("'file' and 'data' are mutually exclusive" if data is not None
                         else "Either 'file' or 'data' must be provided")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except OSError as e:
            raise opts.error(f"Unable to read {path}: {e.strerror}") from None
    else:
        raw = (data or "").encode()
    if fmt == "base64":
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise opts.error("Invalid base64 data") from None
    return raw


def check_overcommit(texts: list[str]) -> None:
    for text in texts:
        opts = parse(OVERCOMMIT_SYNTAX, text)
        for key in ("mem-lock", "cpu-pm"):
            if key in opts and opts.get_bool(key):
                what = "it never locks guest RAM" if key == "mem-lock" else "it does not pass CPU idling to guests"
                raise opts.error(f"pyvmm cannot honour {key}=on ({what})")


def check_globals(texts: list[str]) -> None:
    for text in texts:
        if "=" in text.split(",", 1)[0] and text.startswith("driver="):
            opts = parse(GLOBAL_SYNTAX, text)
            driver, prop, value = opts.get_str("driver"), opts.get_str("property"), opts.get_str("value")
        else:
            name, eq, value = text.partition("=")
            driver, dot, prop = name.rpartition(".")
            if not (eq and dot and driver and prop):
                raise ConfigError(f"-global {text}: Invalid parameter, expected DRIVER.PROPERTY=VALUE")
        why = _GLOBALS.get((driver or "", prop or ""))
        if why is None:
            raise ConfigError(f"-global {text}: pyvmm cannot honour global property {driver}.{prop} "
                              "(it has only PIIX4_PM.disable_s3=1 and PIIX4_PM.disable_s4=1)")
        if (value or "").lower() not in ("1", "on", "true", "yes"):
            raise ConfigError(f"-global {text}: pyvmm cannot honour {driver}.{prop}={value} ({why})")
