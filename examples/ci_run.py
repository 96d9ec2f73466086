"""A CI-style run: share a source tree with a VM, run its tests there, and take their exit status.

The tree (here a tiny generated project with a test script) is shared with virtio-fs
(``VM(shares=[Share(HOST_DIR, TAG)])``, Debian's virtiofsd) and mounted at ``/mnt/TAG`` in the
guest; the test run writes its report into the same folder, where the host reads it.  The script
exits with the tests' status, so it can be a CI step itself.

Run: ``.venv/bin/python examples/ci_run.py``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pyvmm import VM, Share

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
    with VM(memory="512M", shares=[Share(tree, "src")]) as vm:
        r = vm.exec(["sh", "-c", "cd /mnt/src && sh run_tests.sh > report.txt 2>&1"], timeout=300)
    sys.stdout.write((tree / "report.txt").read_text())  # written by the guest, read on the host
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
