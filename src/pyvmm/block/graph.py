"""The block node graph: ``-blockdev`` nodes, ``-drive`` back-ends, and the devices using them.

As in QEMU, a *node* is a driver instance: ``file`` nodes are host files, ``raw`` and ``qcow2``
nodes are formats over a ``file`` child (qcow2 also over a backing node).  A *block backend*
(QEMU's BlockBackend) is what a device uses: a named one per ``-drive`` (its id), an anonymous one
when ``-device ...,drive=NODE`` names a node.  Every ``-drive`` becomes a file node and a format node
here too (with generated ``#blockNNN`` names), so both options share one code path.

Opening follows QEMU's permission model (:mod:`pyvmm.block.lock`): a node nobody uses is open with
the permissions its format takes for itself (a writable qcow2 writes its metadata, so it holds the
write lock and lets no one else write; a raw node holds nothing); a device attaching reopens its
node with the device's permissions.  ``snapshot=on`` (``-snapshot``) puts a temporary qcow2 overlay
over a ``-drive``: the image is only read, guest writes go to the overlay, which is deleted at once
(its open file stays until the VM exits).

The monitor reads this graph for ``query-block``, ``query-named-block-nodes`` and
``query-blockstats`` (:mod:`pyvmm.block.info`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pyvmm.block.base import BlockBackend, BlockError, check_image_file, probe_format
from pyvmm.block.blockdev import NodeOptions, auto_node_name
from pyvmm.block.lock import PERM_ALL, Perm, backing_perms, device_perms
from pyvmm.block.stats import AccountedImage
from pyvmm.errors import ConfigError, PyvmmError

log = logging.getLogger(__name__)


@dataclass
class Node:
    """One block node: its options, its children, and the image stack open on it (if any)."""

    opts: NodeOptions
    file: Node | None = None
    backing: Node | None = None
    parents: list[tuple[Node, str]] = field(default_factory=list)
    image: BlockBackend | None = None   # open while it is a root: unused, or a device's
    read_only: bool = False             # effective (auto-read-only applied)
    probed: bool = False                # -drive without format=: the format was probed
    temporary: bool = False             # a -snapshot overlay (never reopened)
    #: A node of the backing chain a qcow2 header names (no ``backing`` option): the image open
    #: for it inside its overlay's stack, and the (format, file) node pairs of such a chain below
    #: a root, reused across reopens so that their generated names stay.
    chain_image: BlockBackend | None = None
    implicit: list[tuple[Node, Node]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.opts.node_name

    @property
    def driver(self) -> str:
        return self.opts.driver

    @property
    def filename(self) -> str:
        """The host file at the bottom of this node."""
        if self.opts.driver == "file":
            return self.opts.filename
        assert self.file is not None
        return self.file.filename


@dataclass
class Backend:
    """QEMU's BlockBackend: a device's (or a -drive's) handle on a root node."""

    name: str                           # the -drive id; "" for a -device drive=NODE
    root: Node
    qdev: str | None = None             # the device's QOM path, once attached
    image: AccountedImage | None = None
    serial: str = ""


class BlockGraph:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.backends: list[Backend] = []

    # -- building ---------------------------------------------------------------------------------
    def add_blockdev(self, nodes: list[NodeOptions]) -> None:
        """The nodes of one ``-blockdev`` (children first), opened as QEMU opens them."""
        for opts in nodes:
            self._add(opts)

    def _add(self, opts: NodeOptions) -> Node:
        if opts.node_name in self.nodes or any(b.name == opts.node_name for b in self.backends):
            raise opts.error(f"Duplicate nodes with node-name='{opts.node_name}'")
        node = Node(opts)
        if opts.driver == "file":
            self._check_file(node)
        else:
            node.file = self._child(opts, opts.file, "file", node)
            node.read_only = opts.read_only
            if not node.read_only and node.file.read_only:
                raise opts.error("Block node is read-only")
            if opts.driver == "qcow2":
                self._check_qcow2_magic(node)
            if opts.backing is not None:
                try:
                    node.backing = self._child(opts, opts.backing, "backing", node)
                except ConfigError as e:
                    raise opts.error(f"Could not open backing file: {str(e).partition(': ')[2]}") from None
        self.nodes[opts.node_name] = node
        if not node.temporary:
            self._open_unused(node)
        return node

    def _check_file(self, node: Node) -> None:
        opts = node.opts
        path = opts.filename
        try:
            check_image_file(path)
        except BlockError as e:
            why = "No such file or directory" if not os.path.lexists(path) else str(e).removeprefix(path + ": ")
            raise opts.error(f"Could not open '{path}': {why}") from None
        writable = os.access(path, os.W_OK)
        node.read_only = opts.read_only or (opts.auto_read_only and not writable)
        if not node.read_only and not writable:
            raise opts.error(f"Could not open '{path}': Permission denied")

    def _check_qcow2_magic(self, node: Node) -> None:
        try:
            with open(node.filename, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise node.opts.error(f"Could not open '{node.filename}': {e.strerror}") from None
        if magic != b"QFI\xfb":
            raise node.opts.error("Image is not in qcow2 format")

    def _child(self, opts: NodeOptions, ref: str, role: str, parent: Node) -> Node:
        child = self.nodes.get(ref)
        if child is None:
            backend = next((b for b in self.backends if b.name == ref), None)
            if backend is None:
                raise opts.error(f"Cannot find device='{ref}' nor node-name='{ref}'")
            child = backend.root
        for other, other_role in child.parents:
            if role == "file" and other_role == "file" and "qcow2" in (other.driver, opts.driver) \
                    and not (other.read_only and opts.read_only):
                first, second = (other.name, opts.node_name) if other.driver == "qcow2" else (opts.node_name,
                                                                                             other.name)
                raise opts.error(f"Permission conflict on node '{child.name}': permissions 'write, resize' are "
                                 f"both required by node '{first}' (uses node '{child.name}' as 'file' child) "
                                 f"and unshared by node '{second}' (uses node '{child.name}' as 'file' child).")
        if any(b.root is child and b.image is not None for b in self.backends):
            raise opts.error(f"Node '{child.name}' is already used by a device")
        self._close_image(child)  # the parent's image stack covers it now
        child.parents.append((parent, role))
        return child

    def add_drive(self, ident: str, path: str, fmt: str | None, *, read_only: bool, locking: str, serial: str,
                  snapshot: bool, text: str) -> Backend:
        """A ``-drive``: a file node and a format node with generated names, and a backend ``ident``."""
        if ident in self.nodes:
            raise ConfigError(f"-drive {text}: Device name '{ident}' conflicts with an existing node name")
        probed = fmt is None
        if fmt is None:
            try:
                fmt = probe_format(path)
            except (BlockError, OSError) as e:
                raise ConfigError(f"-drive {text}: {e}") from None
        common: dict[str, Any] = {"read_only": read_only, "discard": True, "text": text, "option": "drive"}
        fnode = self._add(NodeOptions("file", auto_node_name(), filename=path, locking=locking, **common))
        top = self._add_format(fmt, fnode, probed, common)
        if snapshot:
            top = self._add_overlay(top, locking, text)
        backend = Backend(ident, top, serial=serial)
        self.backends.append(backend)
        return backend

    def _add_format(self, fmt: str, fnode: Node, probed: bool, common: dict[str, Any]) -> Node:
        opts = NodeOptions(fmt, auto_node_name(), file=fnode.name, **common)
        node = Node(opts, probed=probed)
        node.file = self._child(opts, fnode.name, "file", node)
        node.read_only = opts.read_only
        if fmt == "qcow2":
            self._check_qcow2_magic(node)
        self.nodes[opts.node_name] = node
        self._open_unused(node)
        return node

    def _add_overlay(self, base: Node, locking: str, text: str) -> Node:
        """``snapshot=on``: a temporary qcow2 over ``base`` in $TMPDIR (else /var/tmp), as QEMU makes it."""
        from pyvmm.block.qcow2 import Qcow2Image
        from pyvmm.block.qcow2_create import create_qcow2

        size = base.image.size if base.image is not None else 0
        self._close_image(base)
        tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
        try:
            fd, tmp = tempfile.mkstemp(prefix="vl.", dir=tmpdir)
        except OSError as e:
            raise ConfigError(f"-drive {text}: Could not get temporary filename: {e.strerror}") from None
        backing: BlockBackend | None = None
        try:
            try:
                create_qcow2(fd, size)  # as QEMU's: the header names no backing file; it is attached below
            finally:
                os.close(fd)
            fopts = NodeOptions("file", auto_node_name(), filename=tmp, discard=True, cache_no_flush=True,
                                text=text, option="drive")
            fnode = Node(fopts)
            opts = NodeOptions("qcow2", auto_node_name(), file=fopts.node_name, discard=True, cache_no_flush=True,
                               backing=base.name, backing_set=True, text=text, option="drive")
            node = Node(opts, file=fnode, backing=base, temporary=True, read_only=base.read_only)
            fnode.parents.append((node, "file"))
            base.parents.append((node, "backing"))
            # The original is opened read-only underneath; a readonly=on drive keeps a read-only
            # overlay, as in QEMU.
            perms = device_perms(node.read_only, False)
            backing = self._open_stack(base, True, backing_perms(*perms), warn=False)
            node.image = Qcow2Image(tmp, read_only=node.read_only, perms=perms, locking=locking,
                                    backing_override=True, backing_image=backing)
            base.chain_image = backing
            self._sync_implicit(base)
        except PyvmmError as e:
            if backing is not None:
                backing.close()
            raise ConfigError(f"-drive {text}: {e}") from None
        finally:
            os.unlink(tmp)  # nothing to clean up later, even after a crash
        log.info("-drive %s: snapshot=on: guest writes go to a temporary overlay (deleted)", base.filename)
        self.nodes[fopts.node_name] = fnode
        self.nodes[opts.node_name] = node
        return node

    # -- opening ------------------------------------------------------------------------------------
    def _open_unused(self, node: Node) -> None:
        """Open a node nobody uses, with the permissions its format takes for itself."""
        try:
            node.image = self._open_stack(node, node.read_only, (Perm(0), PERM_ALL), warn=False)
        except PyvmmError as e:
            msg = str(e).removeprefix(node.filename + ": ")
            raise node.opts.error(msg) from None
        self._sync_implicit(node)

    def _sync_implicit(self, root: Node) -> None:
        """List the backing chain the open qcow2 ``root`` found through its header as nodes, as
        QEMU does (read-only format and file nodes with generated names)."""
        from pyvmm.block.qcow2 import Qcow2Image

        pairs: list[tuple[Node, Node]] = []
        parent, image = root, root.image if root.image is not None else root.chain_image
        while (isinstance(image, Qcow2Image) and image.backing is not None
               and (parent is not root or not root.opts.backing_set)):
            below = image.backing
            fmt = "qcow2" if isinstance(below, Qcow2Image) else "raw"
            i = len(pairs)
            if i < len(root.implicit) and root.implicit[i][0].driver == fmt \
                    and root.implicit[i][1].opts.filename == below.path:
                fnode, fileno = root.implicit[i]
            else:
                fileno = Node(NodeOptions("file", auto_node_name(), read_only=True, filename=below.path),
                              read_only=True)
                fnode = Node(NodeOptions(fmt, auto_node_name(), read_only=True, file=fileno.name),
                             file=fileno, read_only=True)
                fileno.parents.append((fnode, "file"))
            fnode.chain_image = below
            fnode.parents = [(parent, "backing")]
            parent.backing = fnode
            pairs.append((fnode, fileno))
            parent, image = fnode, below
        for fnode, fileno in root.implicit[len(pairs):]:
            self.nodes.pop(fnode.name, None)
            self.nodes.pop(fileno.name, None)
        for fnode, fileno in pairs:
            self.nodes.setdefault(fileno.name, fileno)
            self.nodes.setdefault(fnode.name, fnode)
        root.implicit = pairs

    def _open_stack(self, node: Node, read_only: bool, perms: tuple[Perm, Perm], *, warn: bool) -> BlockBackend:
        from pyvmm.block.qcow2 import Qcow2Image
        from pyvmm.block.raw import RawImage

        if node.driver == "file":
            return RawImage(node.filename, read_only=read_only, perms=perms, locking=node.opts.locking)
        assert node.file is not None
        locking = node.file.opts.locking
        if node.driver == "raw":
            return RawImage(node.filename, read_only=read_only, perms=perms, locking=locking,
                            probed=node.probed and warn)
        backing: BlockBackend | None = None
        if node.opts.backing_set and node.backing is not None:
            backing = self._open_stack(node.backing, True, backing_perms(*perms), warn=False)
        try:
            return Qcow2Image(node.filename, read_only=read_only, perms=perms, locking=locking,
                              backing_override=node.opts.backing_set, backing_image=backing)
        except BaseException:
            if backing is not None:
                backing.close()
            raise

    @staticmethod
    def _close_image(node: Node) -> None:
        if node.image is not None:
            node.image.close()
            node.image = None

    # -- devices --------------------------------------------------------------------------------------
    def find(self, ident: str) -> Backend | Node | None:
        """A -drive backend by id, else a node by node-name."""
        backend = next((b for b in self.backends if b.name == ident), None)
        return backend if backend is not None else self.nodes.get(ident)

    def attach(self, ident: str, *, read_only: bool, share_rw: bool, qdev: str,
               driver: str = "virtio-blk-device") -> Backend:
        """Give a device the backend ``ident`` names (a -drive id or a node-name), its root opened
        with the device's permissions; raises ConfigError with QEMU's wording."""
        found = self.find(ident)
        if found is None:
            raise ConfigError(f"Property '{driver}.drive' can't find value '{ident}'")
        if isinstance(found, Backend):
            backend = found
            if backend.qdev is not None:
                raise ConfigError(f"Drive '{ident}' is already in use by another device")
        else:
            if found.parents:
                raise ConfigError(f"Node '{ident}' is already in use by node '{found.parents[0][0].name}' "
                                  "(pyvmm gives a device only a root node)")
            prior = next((b for b in self.backends if b.root is found and b.qdev is not None), None)
            if prior is not None:
                raise ConfigError(f"Permission conflict on node '{ident}': permissions 'write' are both required "
                                  f"by block device '{prior.qdev}' (uses node '{ident}' as 'root' child) and "
                                  f"unshared by block device '{qdev}' (uses node '{ident}' as 'root' child).")
            backend = Backend("", found)
            self.backends.append(backend)
        root = backend.root
        read_only = read_only or root.read_only
        if not root.temporary:
            self._close_image(root)
            try:
                root.image = self._open_stack(root, read_only, device_perms(read_only, share_rw), warn=True)
            except PyvmmError as e:
                if backend.name == "":
                    self.backends.remove(backend)
                msg = str(e)
                raise ConfigError(msg if root.filename in msg else f"{root.filename}: {msg}") from None
        assert root.image is not None
        if not root.temporary:
            self._sync_implicit(root)
        backend.image = AccountedImage(root.image, discard=root.opts.discard, no_flush=root.opts.cache_no_flush)
        backend.qdev = qdev
        return backend

    def attach_file(self, path: str, fmt: str | None, *, read_only: bool, share_rw: bool, qdev: str) -> Backend:
        """pyvmm's ``-device virtio-blk-pci,file=PATH`` shorthand: anonymous nodes for the image."""
        if fmt is None:
            check_image_file(path)
            fmt = probe_format(path)
            probed = True
        else:
            probed = False
        common: dict[str, Any] = {"read_only": read_only, "discard": True, "text": f"file={path}",
                                  "option": "device"}
        fnode = self._add(NodeOptions("file", auto_node_name(), filename=path, **common))
        top = self._add_format(fmt, fnode, probed, common)
        return self.attach(top.name, read_only=read_only, share_rw=share_rw, qdev=qdev)

    def close(self) -> None:
        for node in self.nodes.values():
            self._close_image(node)
        for backend in self.backends:
            backend.image = None
