"""virtio 1.x devices: split virtqueues, the device model, transports and device types.

* :mod:`.queue`  - split virtqueue walking (hardened against hostile rings)
* :mod:`.device` - transport-neutral device base (features, status, config, NEEDS_RESET)
* :mod:`.mmio`   - the virtio-mmio transport (register layout v2)
* :mod:`.blk`, :mod:`.rng`, :mod:`.console` - device types
* :mod:`.options` - ``--drive`` parsing; :mod:`.machine` - wiring helpers for the PC machine
"""
