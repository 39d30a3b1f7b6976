"""The qemu driver: a VM is a QEMU guest whose virtio NIC sits on a tap in its session.

The driver is the shared host side (:mod:`vnic.drivers.hostside`: the session
namespace and bridge, the tap as the VM's port with its IFB or the delay
engine's relay, the same compiled plan with HTB for the guest's ingress on the
tap and IFB + HTB for its egress, the anti-spoofing guard, netem or the delay
engine, counters, drift and live changes) composed with the QEMU guest side
(:mod:`vnic.drivers.qemu_guest`: the guest, its tap, its settings through its
kernel command line and guest agent), by :class:`~vnic.drivers.hosted.HostedDriver`.
What this class adds is access to a running guest:
:meth:`QemuDriver.exec` runs commands through the guest agent, QMP gives the
NIC's link state (:meth:`QemuDriver.set_link`) and :meth:`QemuDriver.status`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from vnic.dataplane import qemu
from vnic.dataplane.probe import Probe
from vnic.drivers.hosted import HostedDriver
from vnic.drivers.qemu_guest import QemuGuest
from vnic.errors import Conflict, DataplaneError
from vnic.model.command import ExecResult
from vnic.plan import names
from vnic.plan.guest import NIC_ID, nic_id


class QemuDriver(HostedDriver):
    kind = "qemu"

    def __init__(self, probe: Probe | None = None) -> None:
        self._guest = QemuGuest()
        super().__init__(self._guest, probe)

    # ------------------------------------------------------------------ guest access

    def exec(
        self, session: str, vm: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the guest through its agent; output is returned when it ends.

        Takes ``timeout`` (seconds, default 600), ``input`` (stdin text) and
        ``capture_output``: without it (the CLI), the output is written to this
        process's stdout and stderr when the command ends.
        """
        run = self._running_guest(session, vm)
        proc = qemu.execute(
            run, argv, timeout=float(kwargs.get("timeout") or 600), stdin=kwargs.get("input")
        )
        if not kwargs.get("capture_output"):
            sys.stdout.write(proc.stdout)
            sys.stdout.flush()
            sys.stderr.write(proc.stderr)
            sys.stderr.flush()
        return proc

    def exec_captured(
        self, session: str, vm: str, argv: Sequence[str], *, timeout: float, max_output: int
    ) -> ExecResult:
        """Run ``argv`` in the guest through its agent, output captured (the guest agent
        returns it when the command ends: at a timeout it is lost, the command killed)."""
        run = self._running_guest(session, vm)
        try:
            proc = qemu.execute(run, argv, timeout=timeout)
        except subprocess.TimeoutExpired:
            return ExecResult(None, timed_out=True)
        return ExecResult.captured(
            proc.returncode, proc.stdout.encode(), proc.stderr.encode(), max_output
        )

    def spawn(self, session: str, vm: str, argv: Sequence[str]) -> qemu.GuestProcess:
        """Start ``argv`` in the guest without waiting (see :class:`qemu.GuestProcess`)."""
        return qemu.spawn(self._running_guest(session, vm), argv)

    def _running_guest(self, session: str, vm: str) -> Any:
        if not self._guest.present(session, vm):
            raise Conflict(f"VM {session}/{vm} is not running as a QEMU guest")
        return qemu.run_files(session, vm)

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        """Set the link of the guest's NIC of vNIC ``nic`` up or down (QMP ``set_link``):
        the guest sees carrier go. The vNIC is checked by the agent (its desired state)."""
        index = int(nic.removeprefix("eth"))
        qemu.qmp(self._running_guest(session, vm), "set_link", name=nic_id(index), up=up)

    def status(self, session: str, vm: str) -> dict[str, Any]:
        """The guest as QMP and the guest agent see it: run state, accelerator, the MAC its NIC
        filters on, and eth0's addresses and counters as the guest kernel counts them
        (``nic``: bytes and packets each way, errors, drops; None if the agent does not answer)."""
        run = self._running_guest(session, vm)
        state = dict(qemu.qmp(run, "query-status"))
        state["accelerator"] = qemu.accelerator().name
        with contextlib.suppress(DataplaneError):
            filters = qemu.qmp(run, "query-rx-filter", name=NIC_ID)
            state["mac"] = filters[0].get("main-mac") if filters else None
        state["nic"] = None
        with contextlib.suppress(DataplaneError):
            for nic in qemu.agent_call(run, "guest-network-get-interfaces"):
                if nic.get("name") == names.VM_IFNAME:
                    state["nic"] = {
                        "mac": nic.get("hardware-address"),
                        "addresses": [
                            f"{a['ip-address']}/{a['prefix']}" for a in nic.get("ip-addresses", [])
                        ],
                        **{k.replace("-", "_"): v for k, v in nic.get("statistics", {}).items()},
                    }
        return state
