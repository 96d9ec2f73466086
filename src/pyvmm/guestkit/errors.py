"""The guest kit's error type.

Everything that can go wrong while preparing a guest (no apt, package not found,
no network, a corrupt .deb, a missing busybox) is reported as one clear line.
"""

from pyvmm.errors import PyvmmError


class GuestKitError(PyvmmError):
    """The default guest (kernel, busybox, initramfs) could not be prepared."""
