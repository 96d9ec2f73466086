"""Run untrusted code in a throw-away VM with a timeout, and collect its output.

Each snippet runs in the guest kit's default guest through the guest agent: its stdout,
stderr and exit status come back separately, a snippet that runs too long is killed
(``VMTimeout``), and whatever it does stays inside the VM, which is gone afterwards.

Run: ``.venv/bin/python examples/sandbox.py``
"""

from __future__ import annotations

import sys

from pyvmm import VM, VMTimeout

SNIPPETS = {
    "well-behaved": "echo computing; echo $((6 * 7))",
    "fails": "echo 'about to fail' >&2; exit 4",
    "runs forever": "while :; do :; done",
    "tries to escape": "rm -rf /bin/* 2>/dev/null; echo 'deleted the guest /bin'",
}


def run_untrusted(vm: VM, code: str, timeout: float) -> tuple[str, int | None, bytes, bytes]:
    try:
        r = vm.exec(["sh", "-c", code], timeout=timeout)
        return "finished", r.returncode, r.stdout, r.stderr
    except VMTimeout:
        return "timed out (killed)", None, b"", b""


def main() -> int:
    results = {}
    for name, code in SNIPPETS.items():
        with VM(memory="256M") as vm:  # a fresh VM per snippet: nothing carries over
            results[name] = run_untrusted(vm, code, timeout=5)
        outcome, status, out, err = results[name]
        print(f"{name:16} {outcome:20} status={status} stdout={out!r} stderr={err!r}")
    assert results["well-behaved"][1:3] == (0, b"computing\n42\n")
    assert results["fails"][1] == 4 and results["fails"][3] == b"about to fail\n"
    assert results["runs forever"][0] == "timed out (killed)"
    return 0


if __name__ == "__main__":
    sys.exit(main())
