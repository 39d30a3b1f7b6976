"""Run processes in a VM, whichever driver runs it: inside a namespace VM (its network
namespace and its init's PID, mount and UTS namespaces, see :mod:`vnic.dataplane.vminit`:
the process sees and signals the VM's processes only), or in its QEMU guest through the
guest agent (qemu).

The measurements (:mod:`vnic.lab.measure`), benchmarks and tests use these, so one
iperf3 or ping call measures a namespace VM and a real guest alike. A VM is
taken to be a guest when it has a QEMU run directory (see
:mod:`vnic.dataplane.qemu`), else a namespace.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from typing import Protocol

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import qemu
from vnic.plan import names

#: ``st`` of a listening socket in /proc/net/tcp (TCP_LISTEN) and of a bound UDP socket (TCP_CLOSE).
_LISTEN = {"tcp": "0A", "udp": "07"}


class Started(Protocol):
    """A process started in a VM (a :class:`subprocess.Popen`, or a guest's process)."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def is_guest(session: str, vm: str) -> bool:
    """Whether the VM is a QEMU guest (else a network namespace)."""
    return qemu.is_guest(session, vm)


def run(
    session: str, vm: str, argv: Sequence[str], *, timeout: float, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the VM to completion, output captured; TimeoutExpired after ``timeout`` s."""
    if is_guest(session, vm):
        return qemu.execute(qemu.run_files(session, vm), argv, timeout=timeout, stdin=input)
    return nsops.run(
        names.vm_netns(session, vm), argv, capture_output=True, timeout=timeout, input=input
    )


def start(session: str, vm: str, argv: Sequence[str]) -> Started:
    """Start ``argv`` in the VM without waiting; its output is discarded."""
    if is_guest(session, vm):
        return qemu.spawn(qemu.run_files(session, vm), argv, capture=False)
    return nsops.popen(
        names.vm_netns(session, vm),
        list(argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def listening_ports(proc_net: str, protocol: str = "tcp") -> set[int]:
    """Local ports of listening (TCP) or bound (UDP) sockets in /proc/net/{tcp,udp}{,6} text."""
    ports = set()
    for line in proc_net.splitlines():
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1] or fields[3] != _LISTEN[protocol]:
            continue
        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(
    session: str, vm: str, port: int, *, protocol: str = "tcp", timeout: float = 10.0
) -> None:
    """Wait until a socket in the VM listens on ``port``; TimeoutError after ``timeout`` s."""
    files = [f"/proc/net/{protocol}", f"/proc/net/{protocol}6"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run(session, vm, ["cat", *files], timeout=max(1.0, deadline - time.monotonic()))
        if port in listening_ports(proc.stdout, protocol):
            return
        time.sleep(0.02)
    raise TimeoutError(
        f"nothing in {session}/{vm} listening on {protocol} port {port} after {timeout}s"
    )
