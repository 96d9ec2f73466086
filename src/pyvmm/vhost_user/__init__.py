"""vhost-user: virtio devices whose queues another process runs (virtiofsd for virtio-fs).

* :mod:`.protocol`: the wire format (messages, request numbers, payload layouts);
* :mod:`.frontend`: the VMM's side of one connection (requests, reply-acks, back-end death);
* :mod:`.virtiofsd`: start Debian's virtiofsd for a host directory (``--share DIR:TAG``).

The device models that use it live with the other virtio devices
(:mod:`pyvmm.devices.virtio.vhost_user_fs`).
"""
