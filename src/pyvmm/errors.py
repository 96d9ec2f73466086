"""Exception types, one per layer.  The CLI turns any :class:`PyvmmError` into one clear line."""


class PyvmmError(Exception):
    """Base class for errors that are reported to the user as one line."""


class KvmError(PyvmmError):
    """/dev/kvm is missing, inaccessible, too old, or an ioctl failed."""


class AccelError(PyvmmError):
    """The chosen accelerator cannot run this machine."""


class GuestMemoryError(PyvmmError):
    """A guest-physical range lies outside guest RAM."""


class BootImageError(PyvmmError):
    """A kernel, initrd or multiboot image is missing, corrupt or unsupported."""


class ConfigError(PyvmmError):
    """A command-line option or machine configuration is invalid."""


class DeviceError(PyvmmError):
    """A device back-end could not be set up."""
