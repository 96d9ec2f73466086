"""Migration: QEMU's ``migrate`` / ``-incoming`` transports (:mod:`.uri`), the source's
pre-copy job (:mod:`.outgoing`) and the bookkeeping QMP reports (:mod:`.status`)."""
