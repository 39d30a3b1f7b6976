"""Processes the data plane started, found again by ownership: their command lines, and
the host they belong to."""

from __future__ import annotations

import os

#: Where named network namespaces are mounted (as in :mod:`vnic.dataplane.namespaces`).
NETNS_DIR = "/run/netns"


def cmdline(pid: int) -> list[bytes]:
    """The arguments of process ``pid`` as the kernel shows them (``/proc/PID/cmdline``);
    ``[]`` when it is gone, a zombie, or unreadable: a process whose tag cannot be read
    is never taken for one of ours."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def on_this_host(pid: int) -> bool:
    """Whether process ``pid`` belongs to the host this process is on: it sees the same
    directory of named network namespaces (``/run/netns``) as this process.

    An owner tag names a session and a VM, not a host. Hosts emulated on one
    machine (:mod:`vnic.lab.hostbed`: each a network namespace and a mount
    namespace with a ``/run/netns`` of its own) share its process table, so a
    scan of /proc by tag alone would find, and stop, the engine of the same VM
    on the neighbouring host. What vnic starts on a host (delay engines, QEMU,
    through ``ip netns exec``) runs in a copy of the host's mount namespace and so
    sees the host's ``/run/netns``. On an ordinary host every process sees the
    same one; when this process has none (no namespace was ever made here), the
    question does not arise and every process counts.
    """
    try:
        mine = os.stat(NETNS_DIR)
    except FileNotFoundError:
        return True
    try:
        theirs = os.stat(f"/proc/{pid}/root{NETNS_DIR}")
    except OSError:
        return False  # gone, or a process without a /run/netns (not started by a driver)
    return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)
