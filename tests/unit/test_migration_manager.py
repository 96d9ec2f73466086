"""Migration URIs and the QMP-side rules of the migration manager (QEMU's errors)."""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.migration.manager import MigrationError, MigrationManager
from pyvmm.migration.uri import MigrationUri, fd_of, parse


@pytest.mark.parametrize("text, want", [
    ("unix:/run/m.sock", MigrationUri("unix", "/run/m.sock")),
    ("tcp:10.0.0.2:4444", MigrationUri("tcp", "10.0.0.2", 4444)),
    ("tcp:[::1]:4444", MigrationUri("tcp", "::1", 4444)),
    ("exec:cat > /tmp/f", MigrationUri("exec", "cat > /tmp/f")),
    ("fd:migfd", MigrationUri("fd", "migfd")),
    ("file:/snap/vm", MigrationUri("file", "/snap/vm")),
])
def test_uris(text: str, want: MigrationUri) -> None:
    assert parse(text) == want


@pytest.mark.parametrize("text, error", [
    ("bogus:1", "unknown migration protocol"), ("nocolon", "unknown migration protocol"),
    ("tcp:host", "error parsing address"), ("tcp:host:99999", "error parsing address"), ("exec:", "names no"),
])
def test_bad_uris(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse(text)


def test_fd_names_and_numbers() -> None:
    with pytest.raises(OSError, match="has not been found"):
        fd_of("nosuch", {})
    assert fd_of("x", {"x": 7}) == 7
    assert fd_of("0", None) == 0
    with pytest.raises(OSError, match="not an open file descriptor"):
        fd_of("987654", None)


class _Source:
    memory = None

    def check_savable(self) -> None: ...


def test_manager_rules() -> None:
    m = MigrationManager(_Source(), incoming=None)  # type: ignore[arg-type]
    assert m.query() == {}
    with pytest.raises(MigrationError, match="waiting for an incoming migration"):
        m.migrate("unix:/x", inmigrate=True)
    with pytest.raises(MigrationError, match="unknown migration protocol"):
        m.migrate("bogus:1", inmigrate=False)
    with pytest.raises(MigrationError, match="has not been found"):
        m.migrate("fd:nosuch", inmigrate=False)
    with pytest.raises(MigrationError, match="requires a file: URI"):
        m.set_capabilities([{"capability": "mapped-ram", "state": True}])
        m.migrate("exec:cat", inmigrate=False)
    with pytest.raises(MigrationError, match="does not accept value 'nope'"):
        m.set_capabilities([{"capability": "nope", "state": True}])
    with pytest.raises(MigrationError, match="cannot honour"):
        m.set_capabilities([{"capability": "postcopy-ram", "state": True}])
    with pytest.raises(MigrationError, match="downtime_limit"):
        m.set_parameters({"downtime-limit": 2_000_001})
    m.set_parameters({"downtime-limit": 50, "max-bandwidth": 1})
    assert m.params.query() == {"downtime-limit": 50, "max-bandwidth": 1}
    with pytest.raises(MigrationError, match="'-incoming' was not specified"):
        m.start_incoming("unix:/x")


def test_deferred_incoming_starts_once() -> None:
    m = MigrationManager(_Source(), incoming="defer")  # type: ignore[arg-type]
    assert not m.incoming_started.is_set()
    m.start_incoming("tcp:0.0.0.0:4444")
    assert m.incoming_started.is_set() and m.incoming_uri == "tcp:0.0.0.0:4444"
    with pytest.raises(MigrationError, match="already been started"):
        m.start_incoming("tcp:0.0.0.0:4444")
