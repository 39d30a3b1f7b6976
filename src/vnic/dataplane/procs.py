"""Processes the data plane started, found again by ownership: their command lines."""

from __future__ import annotations


def cmdline(pid: int) -> list[bytes]:
    """The arguments of process ``pid`` as the kernel shows them (``/proc/PID/cmdline``);
    ``[]`` when it is gone, a zombie, or unreadable: a process whose tag cannot be read
    is never taken for one of ours."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []
