"""QEMU's memory back-end options: ``-object memory-backend-*``, ``-machine memory-backend=`` and ``-numa``.

QEMU 7.2 spells a guest RAM back-end as a user-creatable object::

    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem
    -object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm,share=on -numa node,memdev=mem
    -object memory-backend-ram,id=mem,size=512M

Guest RAM then comes from that back-end.  ``share=on`` on a memfd or a file is what
vhost-user needs: the back-end process maps the same file.  pyvmm has one NUMA node, so
``-numa`` names at most one node; the checks and their messages follow QEMU's.  One difference:
without ``-m``, RAM is the back-end's size for ``-numa`` as for ``-machine memory-backend=``
(QEMU compares a ``-numa`` node with its default 128 MiB; pyvmm's default is 512 MiB).
"""

from __future__ import annotations

from pyvmm.errors import ConfigError
from pyvmm.memory import RamBackend
from pyvmm.qemuopts import OptionSyntax, Opts, parse

OBJECT_SYNTAX = OptionSyntax("object", implied="qom-type", json=True)
NUMA_SYNTAX = OptionSyntax("numa", implied="type")

BACKEND_KINDS = {"memory-backend-ram": "ram", "memory-backend-memfd": "memfd", "memory-backend-file": "file"}
#: Properties every memory back-end has (QEMU's hostmem.c); some are honoured only in one setting.
_COMMON_KEYS = ("qom-type", "id", "size", "share", "prealloc", "prealloc-threads", "merge", "dump", "policy",
                "host-nodes", "reserve", "x-use-canonical-path-for-ramblock-id", "prealloc-context")
_KIND_KEYS = {"ram": (), "memfd": ("hugetlb", "hugetlbsize", "seal"),
              "file": ("mem-path", "align", "discard-data", "pmem", "readonly", "offset")}


def parse_object(text: str) -> tuple[str, str, RamBackend | None]:
    """One ``-object`` argument as (qom-type, id, its back-end if it is a memory back-end)."""
    opts = parse(OBJECT_SYNTAX, text)
    qom_type = opts.get_str("qom-type")
    if not qom_type:
        raise opts.error("Parameter 'qom-type' is missing")
    if "id" not in opts:
        raise opts.error("Parameter 'id' is missing")
    ident = opts.check_id() or ""
    kind = BACKEND_KINDS.get(qom_type)
    if kind is None:
        return qom_type, ident, None
    for key in opts.values:
        if key not in _COMMON_KEYS and key not in _KIND_KEYS[kind]:
            raise opts.error(f"Invalid parameter '{key}'") if not opts.from_json else \
                opts.error(f"Property '{qom_type}.{key}' not found")
    if "size" not in opts:
        raise opts.error("Parameter 'size' is missing")
    size = opts.get_size("size") or 0
    if size == 0:
        raise opts.error("can't create backend with size 0")
    if kind == "file" and not opts.get_str("mem-path"):
        raise opts.error("Parameter 'mem-path' is missing")
    _refuse_unhonoured(opts, kind)
    backend = RamBackend(id=ident, kind=kind, size=size, share=opts.get_bool("share"),
                         mem_path=opts.get_str("mem-path"), prealloc=opts.get_bool("prealloc"))
    return qom_type, ident, backend


def _refuse_unhonoured(opts: Opts, kind: str) -> None:
    def cannot(what: str) -> ConfigError:
        return opts.error(f"pyvmm cannot honour {what}")

    if opts.get_bool("hugetlb"):
        raise cannot("hugetlb=on (use memory-backend-file with mem-path= on a hugetlbfs mount)")
    if opts.get_bool("pmem") or opts.get_bool("readonly"):
        raise cannot("pmem=on or readonly=on")
    if "host-nodes" in opts or (opts.get_str("policy") or "default") != "default":
        raise cannot("host-nodes= or policy= (pyvmm does not bind guest RAM to host NUMA nodes)")
    if not opts.get_bool("reserve", True):
        raise cannot("reserve=off")
    for key in ("offset", "align", "hugetlbsize"):
        if key in opts:
            raise cannot(f"{key}=")


def backends_from_args(objects: list[str]) -> dict[str, RamBackend]:
    """Every ``-object``: memory back-ends by id; any other object is refused."""
    backends: dict[str, RamBackend] = {}
    ids: set[str] = set()
    for text in objects:
        qom_type, ident, backend = parse_object(text)
        if ident in ids:
            raise ConfigError(f"-object {text}: Duplicate ID '{ident}' for object")
        ids.add(ident)
        if backend is None:
            if qom_type == "secret":  # pyvmm.compat_options reads those
                continue
            raise ConfigError(f"-object {text}: pyvmm cannot honour -object {qom_type} "
                              f"(its only objects are {', '.join(BACKEND_KINDS)} and secret)")
        backends[ident] = backend
    return backends


def machine_backend(backends: dict[str, RamBackend], machine_prop: str | None, numa: list[str],
                    memory: int | None) -> RamBackend | None:
    """The back-end guest RAM comes from (``-machine memory-backend=`` or ``-numa node,memdev=``).

    ``memory`` is the ``-m`` size, or None when ``-m`` was not given (RAM is then the back-end's size).
    """
    memdevs: list[tuple[Opts, str]] = []
    for text in numa:
        opts = parse(NUMA_SYNTAX, text)
        ntype = opts.get_str("type", "") or ""
        if ntype != "node":
            if ntype in ("dist", "cpu", "hmat-lb", "hmat-cache"):
                raise opts.error(f"pyvmm cannot honour -numa {ntype} (it has one NUMA node)")
            raise opts.error(f"Parameter 'type' does not accept value '{ntype}'")
        opts.check_keys(("type", "nodeid", "mem", "memdev", "cpus", "initiator"))
        if "mem" in opts:
            raise opts.error("Parameter -numa node,mem is not supported by this machine type\n"
                             "Use -numa node,memdev instead")
        if opts.get_int("nodeid", 0) != 0 or "initiator" in opts:
            raise opts.error("pyvmm cannot honour a second NUMA node (it has one)")
        memdev = opts.get_str("memdev")
        if memdev is None:
            raise opts.error("pyvmm cannot honour a NUMA node without memdev=")
        if memdev not in backends:
            raise opts.error(f"memdev={memdev} is ambiguous")
        memdevs.append((opts, memdev))
    if len(memdevs) > 1:
        if memdevs[0][1] == memdevs[1][1]:
            raise ConfigError(f"memory backend {memdevs[0][1]} can't be used multiple times.")
        raise memdevs[1][0].error("pyvmm cannot honour a second NUMA node (it has one)")
    if machine_prop is not None:
        if memdevs:
            raise ConfigError("'-machine memory-backend' and '-numa memdev' properties are mutually exclusive")
        backend = backends.get(machine_prop)
        if backend is None:
            raise ConfigError(f"Memory backend '{machine_prop}' not found")
        if memory is not None and memory != backend.size:
            raise ConfigError("Machine memory size does not match the size of the memory backend")
        return backend
    if memdevs:
        backend = backends[memdevs[0][1]]
        if memory is not None and memory != backend.size:
            raise ConfigError(f"total memory for NUMA nodes ({backend.size:#x}) should equal RAM size "
                              f"({memory:#x})")
        return backend
    return None


__all__ = ["BACKEND_KINDS", "NUMA_SYNTAX", "OBJECT_SYNTAX", "backends_from_args", "machine_backend", "parse_object"]
