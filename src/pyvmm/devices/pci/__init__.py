"""PCI: the host bridge (config mechanism #1), configuration space helpers, MSI-X.

* :mod:`.config` - configuration space bytes, write masks, capabilities, BAR descriptions
* :mod:`.msix`   - MSI-X table/PBA and delivery through a pluggable MSI sender
* :mod:`.host`   - :class:`~.host.PciHost` (0xcf8/0xcfc, bus 0, BAR mapping, INTx) and :class:`~.host.PciDevice`
"""
