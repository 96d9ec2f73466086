"""What a machine's ``run()`` returns: the process exit status and why (its own module, so that
``-machine none`` starts without importing the PC)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunResult:
    status: int
    reason: str
