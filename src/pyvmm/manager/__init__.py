"""pyvmm's manager: a libvirt-style daemon (``pyvmmd``), its HTTP API, CLI and web console.

The daemon owns VM definitions (SQLite), runs each VM as its own ``pyvmm run``
process in its own session, and controls it over QMP.  See ``daemon.py`` for
the entry point and ``api.py`` for the operations.
"""
