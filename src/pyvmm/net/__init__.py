"""Host network back-ends for virtio-net and their options.

* :mod:`.base`    - the back-end protocol (whole frames, optional 12-byte vnet header)
* :mod:`.tap`     - TAP interface with IFF_VNET_HDR
* :mod:`.user`    - user-mode networking through a passt helper (QEMU stream framing)
* :mod:`.options`  - ``-netdev`` parsing
* :mod:`.backends` - opening the back-end a ``-netdev`` names
"""
