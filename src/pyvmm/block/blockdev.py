"""``-blockdev``: QEMU's block node options, parsed from JSON or key=value (keyval) text.

One ``-blockdev`` describes one node, and may describe its children inline::

    -blockdev '{"driver":"file","filename":"/x.qcow2","node-name":"s","auto-read-only":true,"discard":"unmap"}'
    -blockdev '{"driver":"qcow2","node-name":"f","read-only":false,"file":"s"}'
    -blockdev driver=qcow2,node-name=f,file.driver=file,file.filename=/x.qcow2

Drivers: ``file`` (a host file: ``filename``, ``locking``, ``aio=threads``), ``raw`` and ``qcow2``
(a format over a ``file`` child; qcow2 also ``backing``: a node name, ``null``/``""`` for none, or
the image's own backing file when absent).  Options every node has: ``node-name``, ``read-only``,
``auto-read-only``, ``discard`` (``ignore``/``off`` or ``unmap``/``on``), ``cache.direct`` (only
off: pyvmm always uses the host page cache), ``cache.no-flush``, ``detect-zeroes`` (only off),
``force-share`` (only off).  Anything else is refused: with QEMU's "Parameter 'x' is unexpected"
where QEMU has no such option either, with "pyvmm cannot honour" where QEMU has it.

The nodes themselves (opening, attaching to devices, statistics) are :mod:`pyvmm.block.graph`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.qemuopts import OptionSyntax, Opts, parse, split_opts

BLOCKDEV_SYNTAX = OptionSyntax("blockdev", json=True)
DRIVERS = ("file", "raw", "qcow2")
#: Drivers QEMU 7.2 has that pyvmm does not (QEMU's own refusal is "does not accept value").
_QEMU_DRIVERS = ("blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
                 "copy-on-read", "dmg", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https",
                 "iscsi", "iser", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate",
                 "qcow", "qed", "quorum", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi",
                 "vhdx", "vmdk", "vpc", "vvfat")
COMMON_KEYS = ("driver", "node-name", "discard", "cache.direct", "cache.no-flush", "read-only", "auto-read-only",
               "force-share", "detect-zeroes")
DRIVER_KEYS = {
    "file": ("filename", "locking", "aio", "aio-max-batch", "drop-cache", "pr-manager", "x-check-cache-dropped"),
    "raw": ("file", "offset", "size"),
    "qcow2": ("file", "backing", "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
              "pass-discard-other", "overlap-check", "cache-size", "l2-cache-size", "l2-cache-entry-size",
              "refcount-cache-size", "cache-clean-interval", "encrypt", "data-file"),
}
#: Options QEMU has that pyvmm refuses rather than ignores.
_NOT_HONOURED = {"aio-max-batch", "drop-cache", "pr-manager", "x-check-cache-dropped", "offset", "size",
                 "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
                 "overlap-check", "cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                 "cache-clean-interval", "encrypt", "data-file"}
DISCARD = {"ignore": False, "off": False, "unmap": True, "on": True}
LOCKING = ("auto", "on", "off")
#: QEMU's id_wellformed(), and its node-name length limit (32 bytes with the NUL).
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
NODE_NAME_MAX = 31

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")

_auto_names = itertools.count(1)


def auto_node_name() -> str:
    """A generated node name, as QEMU's ``#blockNNN`` (names users cannot give: they start with '#')."""
    return f"#block{next(_auto_names):03d}"


@dataclass
class NodeOptions:
    """One block node as the user described it (children are named, not nested)."""

    driver: str
    node_name: str
    read_only: bool = False
    auto_read_only: bool = False
    discard: bool = False          # discard=unmap: guest discards reach the image
    cache_direct: bool = False
    cache_no_flush: bool = False
    filename: str = ""             # file
    locking: str = "auto"          # file
    file: str = ""                 # raw, qcow2: the file child's node name
    backing: str | None = None     # qcow2: a node name; None with backing_set: no backing file
    backing_set: bool = False      # qcow2: False: the image's own backing file
    text: str = ""                 # the -blockdev argument, for error messages
    option: str = "blockdev"

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"-{self.option} {self.text}: {message}")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """QEMU's qdict_flatten: nested JSON objects become dotted keys."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _Reader:
    """Typed access to one node's flat options, with QEMU's (keyval / QAPI visitor) errors."""

    def __init__(self, opts: Opts, values: dict[str, Any], prefix: str) -> None:
        self.opts = opts
        self.values = values
        self.prefix = prefix
        self.typed = opts.from_json

    def has(self, key: str) -> bool:
        return key in self.values

    def text(self, key: str, default: str | None = None) -> str | None:
        if key not in self.values:
            return default
        value = self.values[key]
        if not isinstance(value, str):
            raise self.opts.error(f"Invalid parameter type for '{self.prefix}{key}', expected: string")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        if key not in self.values:
            return default
        value = self.values[key]
        if self.typed:
            if not isinstance(value, bool):
                raise self.opts.error(f"Invalid parameter type for '{self.prefix}{key}', expected: boolean")
            return value
        if value in _TRUE:  # QEMU's qapi_bool_parse
            return True
        if value in _FALSE:
            return False
        raise self.opts.error(f"Parameter '{self.prefix}{key}' expects 'on' or 'off'")

    def enum(self, key: str, choices: tuple[str, ...] | dict[str, Any], default: str) -> str:
        value = self.text(key, default)
        assert value is not None
        if value not in choices:
            raise self.opts.error(f"Parameter '{self.prefix}{key}' does not accept value '{value}'")
        return value


def parse_blockdev(text: str) -> list[NodeOptions]:
    """The nodes one ``-blockdev`` argument describes, children before parents.

    Raises ConfigError with QEMU's wording (``-blockdev TEXT: ...``).
    """
    if not text.startswith("{"):  # keyval, stricter than QemuOpts: no "flag" shorthand
        for key, value, flag in split_opts(text):
            if flag and key not in ("help", "?"):
                raise ConfigError(f"-blockdev {text}: Expected '=' after parameter "
                                  f"'{key if value == 'on' else 'no' + key}'")
    opts = parse(BLOCKDEV_SYNTAX, text)
    values = _flatten(opts.values) if opts.from_json else dict(opts.values)
    if opts.help:
        raise opts.error("Parameter 'driver' is missing")
    nodes: list[NodeOptions] = []
    _node(opts, values, "", nodes, root=True)
    return nodes


def _node(opts: Opts, values: dict[str, Any], prefix: str, out: list[NodeOptions], *, root: bool) -> str:
    r = _Reader(opts, values, prefix)
    driver = r.text("driver")
    if driver is None:
        raise opts.error(f"Parameter '{prefix}driver' is missing")
    if driver not in DRIVERS:
        if driver in _QEMU_DRIVERS:
            raise opts.error(f"pyvmm cannot honour driver '{driver}' (it has file, raw and qcow2)")
        raise opts.error(f"Parameter '{prefix}driver' does not accept value '{driver}'")
    children = {k.partition(".")[0] for k in values if "." in k and not k.startswith("cache.")}
    allowed = set(COMMON_KEYS) | set(DRIVER_KEYS[driver])
    for key in values:
        head = key.partition(".")[0]
        if key in allowed or (head in children and head in ("file", "backing") and head in allowed):
            continue
        raise opts.error(f"Parameter '{prefix}{key}' is unexpected")
    for key in values:
        if key in _NOT_HONOURED:
            raise opts.error(f"pyvmm cannot honour '{prefix}{key}' (a {driver} node option it does not have)")
    name = r.text("node-name")
    if name is None:
        if root:
            raise opts.error("'node-name' must be specified for the root node")
        name = auto_node_name()
    elif not _NAME_RE.match(name):
        raise opts.error(f"Invalid node-name: '{name}'")
    elif len(name) > NODE_NAME_MAX:
        raise opts.error("Node name too long")
    node = NodeOptions(driver=driver, node_name=name, text=opts.text)
    node.read_only = r.flag("read-only")
    node.auto_read_only = r.flag("auto-read-only")
    node.discard = DISCARD[r.enum("discard", DISCARD, "ignore")]
    node.cache_direct = r.flag("cache.direct")
    node.cache_no_flush = r.flag("cache.no-flush")
    if node.cache_direct:
        raise opts.error(f"pyvmm cannot honour '{prefix}cache.direct=on' (it always uses the host page cache)")
    if r.flag("force-share"):
        raise opts.error(f"pyvmm cannot honour '{prefix}force-share=on'")
    zeroes = r.enum("detect-zeroes", ("off", "on", "unmap"), "off")
    if zeroes != "off":
        raise opts.error(f"pyvmm cannot honour '{prefix}detect-zeroes={zeroes}' (only off)")
    if driver == "file":
        filename = r.text("filename")
        if filename is None:
            raise opts.error(f"Parameter '{prefix}filename' is missing")
        node.filename = filename
        node.locking = r.enum("locking", LOCKING, "auto")
        aio = r.enum("aio", ("threads", "native", "io_uring"), "threads")
        if aio != "threads":
            raise opts.error(f"pyvmm cannot honour '{prefix}aio={aio}' (only threads)")
    else:
        node.file = _child(opts, values, prefix, "file", out, r)
        if driver == "qcow2" and ("backing" in values or "backing" in children):
            node.backing_set = True
            if "backing" in children:
                node.backing = _child(opts, values, prefix, "backing", out, r)
            else:
                value = values["backing"]
                if value is not None and not isinstance(value, str):
                    raise opts.error(f"Invalid parameter type for '{prefix}backing', expected: string")
                node.backing = value or None  # null or "": no backing file
    out.append(node)
    return name


def _child(opts: Opts, values: dict[str, Any], prefix: str, key: str, out: list[NodeOptions], r: _Reader) -> str:
    """A child reference: a node name, or an inline definition (``file.driver=...``)."""
    sub = {k[len(key) + 1:]: v for k, v in values.items() if k.startswith(key + ".")}
    if sub:
        if key in values:
            raise opts.error(f"Parameter '{prefix}{key}' is unexpected")
        return _node(opts, sub, f"{prefix}{key}.", out, root=False)
    ref = r.text(key)
    if ref is None:
        raise opts.error(f"Parameter '{prefix}{key}' is missing")
    return ref
