"""A CI-style run: put a source tree into a VM, run its tests there, and take their exit status.

The tree (here a tiny generated project with a test script) goes in with ``write_file``; with
virtio-fs a ``Share(HOST_DIR, TAG)`` mounts it at ``/mnt/TAG`` instead.  The script exits with
the tests' status, so it can be a CI step itself.

Run: ``.venv/bin/python examples/ci_run.py``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pyvmm import VM

PROJECT = {
    "lib.sh": "add() { echo $(($1 + $2)); }\n",
    "run_tests.sh": """\
. ./lib.sh
fail=0
check() { if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: got $2, want $3"; fail=1; fi; }
check 'add 2 3' "$(add 2 3)" 5
check 'add -1 1' "$(add -1 1)" 0
exit $fail
""",
}


def run_ci(tree: Path) -> int:
    with VM(memory="256M") as vm:
        vm.exec(["mkdir", "-p", "/src"], check=True)
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                vm.write_file(f"/src/{path.relative_to(tree)}", path.read_bytes())
        r = vm.exec(["sh", "-c", "cd /src && sh run_tests.sh"], timeout=300)
        sys.stdout.write(r.stdout.decode())
        sys.stderr.write(r.stderr.decode())
        return r.returncode


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        for name, text in PROJECT.items():
            (tree / name).write_text(text)
        status = run_ci(tree)
    print(f"tests exited with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
