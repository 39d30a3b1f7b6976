"""The qemu driver: a VM is a QEMU guest whose virtio NIC sits on a tap in its session.

Everything on the host side is the netns driver's (this class inherits it):
the session namespace and bridge, the tap as the VM's port with its IFB (or
the delay engine's relay), the same compiled plan with HTB for the guest's
ingress on the tap and IFB + HTB for its egress, the anti-spoofing guard,
netem or the delay engine, counters, drift and live changes. What differs is
the VM side:

* launch makes a persistent, tagged tap, starts QEMU in the session namespace
  with the allocated MAC (it boots the image of ``scripts/vm/build-image.sh``
  while the host side is built), and returns once the guest's init reports
  eth0 up with its addresses;
* the profile's TCP settings and the egress offload switch go on the guest
  kernel's command line at launch, and through the QEMU guest agent on a live
  change (the guest has its own kernel: every available congestion control
  algorithm can be chosen by sysctl, no per-route trick needed);
* :meth:`QemuDriver.exec` runs commands through the guest agent; QMP gives the
  NIC's link state (:meth:`QemuDriver.set_link`) and the MAC the guest's NIC
  really filters on (drift).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import qemu
from vnic.dataplane.probe import Probe
from vnic.drivers.netns import NetnsDriver, _egress_per_packet
from vnic.errors import Conflict, DataplaneError
from vnic.model.launch import Capabilities, LaunchRequest
from vnic.plan import names
from vnic.plan.guest import DEFAULT_CPUS, DEFAULT_MEMORY_MIB, NIC_ID, GuestSpec
from vnic.plan.model import Plan

#: The guest kernel's default congestion control (Debian's kernels build cubic in).
GUEST_DEFAULT_CONGESTION = "cubic"
#: Fields that live in the guest's kernel: per-VM there by construction.
_TCP_SYSCTL = {
    "congestion_control": "net.ipv4.tcp_congestion_control",
}


class QemuDriver(NetnsDriver):
    kind = "qemu"

    def __init__(self, probe: Probe | None = None) -> None:
        super().__init__(probe)

    def capabilities(self) -> Capabilities:
        caps = super().capabilities()
        return Capabilities(self.kind, caps.fields, caps.missing)

    # ------------------------------------------------------------------ the VM side

    def _vm_present(self, session: str, vm: str) -> bool:
        return qemu.guest_pid(session, vm, names.owner_tag(session, vm)) is not None

    def _vm_exists(self, session: str, vm: str) -> bool:
        return qemu.is_guest(session, vm)

    def _vm_thing(self, session: str, vm: str) -> str:
        return f"QEMU guest {qemu.run_files(session, vm).directory}"

    def spec_for(self, request: LaunchRequest, plan: Plan) -> GuestSpec:
        """The guest's QEMU settings for ``request`` compiled to ``plan``."""
        sysctls = [(s.key, s.value) for s in plan.sysctls]
        if plan.congestion_control is not None:
            sysctls.append((_TCP_SYSCTL["congestion_control"], plan.congestion_control))
        return GuestSpec(
            session=request.session,
            vm=request.vm,
            tap=plan.devices.port,
            mac=str(request.mac),
            ipv4=str(request.ipv4),
            ipv6=str(request.ipv6),
            sysctls=tuple(sysctls),
            offload=not _egress_per_packet(plan),
            accel=qemu.accelerator().name,
            memory_mib=int(os.environ.get("VNIC_QEMU_MEMORY") or DEFAULT_MEMORY_MIB),
            cpus=int(os.environ.get("VNIC_QEMU_CPUS") or DEFAULT_CPUS),
        )

    def _plug(self, request: LaunchRequest, plan: Plan) -> None:
        """Run directory (marks the VM as a guest), tagged tap on the bridge, then QEMU: it
        boots while the rest of the host side is built."""
        spec = self.spec_for(request, plan)
        qemu.image()  # built (or found) before anything is made, so a failure leaves nothing
        qemu.run_files(request.session, request.vm).directory.mkdir(parents=True)
        session_ns = names.session_netns(request.session)
        nsops.plug_tap(session_ns, request.session, request.vm, relay=plan.engine is not None)
        qemu.start(session_ns, spec)

    def _vm_settings(self, request: LaunchRequest, plan: Plan) -> None:
        """Nothing at this point: the guest applies its settings from its command line."""

    def _wait_ready(self, request: LaunchRequest) -> None:
        """Wait for the guest's NIC (the boot overlapped the host-side work)."""
        qemu.wait_ready(
            qemu.run_files(request.session, request.vm),
            names.owner_tag(request.session, request.vm),
        )

    def _guest_exec(self, request: LaunchRequest, argv: Sequence[str]) -> None:
        run = qemu.run_files(request.session, request.vm)
        qemu.wait_agent(run, timeout=30)
        proc = qemu.execute(run, argv, timeout=30)
        if proc.returncode != 0:
            who = f"{request.session}/{request.vm}"
            raise DataplaneError(
                f"{' '.join(argv)} in guest {who} failed: {(proc.stderr or proc.stdout).strip()}"
            )

    def _set_vm_offloads(self, request: LaunchRequest, *, on: bool) -> None:
        state = "on" if on else "off"
        self._guest_exec(request, ["ethtool", "-K", names.VM_IFNAME, "tso", state, "gso", state])

    def _set_sysctl(self, request: LaunchRequest, key: str, value: str) -> None:
        self._guest_exec(request, ["sysctl", "-q", "-w", f"{key}={value}"])

    def _set_congestion_control(self, request: LaunchRequest, algo: str | None) -> None:
        self._set_sysctl(
            request, _TCP_SYSCTL["congestion_control"], algo or GUEST_DEFAULT_CONGESTION
        )

    def _remove_vm(self, session: str, vm: str) -> None:
        """Stop QEMU (its tap is persistent: it goes with the other links). :func:`qemu.stop`
        finds the process by pid file and by tag, and does nothing when there is none."""
        qemu.stop(session, vm, names.owner_tag(session, vm))

    def destroy(self, session: str, vm: str) -> None:
        """Stop the guest and remove its tap, IFB or relay, guard and engine. Idempotent.

        The run directory goes last: until then the VM counts as a guest, so the
        netns driver alongside never takes its leftovers for its own.
        """
        super().destroy(session, vm)
        qemu.remove_run_dir(session, vm)

    def _vm_drift(self, request: LaunchRequest, plan: Plan) -> list[str]:
        """The MAC the guest's NIC filters on, read back through QMP."""
        run = qemu.run_files(request.session, request.vm)
        try:
            filters = qemu.qmp(run, "query-rx-filter", name=NIC_ID)
        except DataplaneError as exc:
            return [f"QMP of guest {request.session}/{request.vm}: {exc}"]
        mac = str(filters[0].get("main-mac", "")) if filters else ""
        if mac != str(request.mac):
            return [f"guest NIC MAC: expected {request.mac}, found {mac or 'none'}"]
        return []

    def _vms(self, only: str | None = None) -> dict[str, set[str]]:
        """Guests with a run directory or a QEMU process carrying their tag. (A guest's
        links and guards need no search of their own: its run directory is made before
        them and removed after them.)"""
        guests = qemu.guests()
        for owner in qemu.owned_processes(names.PREFIX + ":").values():
            session, _, vm = owner.removeprefix(names.PREFIX + ":").partition("/")
            if vm:
                guests.setdefault(session, set()).add(vm)
        return {s: vms for s, vms in guests.items() if only in (None, s)}

    def running(self, session: str) -> list[str]:
        return sorted(
            vm for vm in qemu.guests().get(session, set()) if self._vm_present(session, vm)
        )

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

    def spawn(self, session: str, vm: str, argv: Sequence[str]) -> qemu.GuestProcess:
        """Start ``argv`` in the guest without waiting (see :class:`qemu.GuestProcess`)."""
        return qemu.spawn(self._running_guest(session, vm), argv)

    def _running_guest(self, session: str, vm: str) -> Any:
        if not self._vm_present(session, vm):
            raise Conflict(f"VM {session}/{vm} is not running as a QEMU guest")
        return qemu.run_files(session, vm)

    def set_link(self, session: str, vm: str, up: bool) -> None:
        """Set the guest NIC's link up or down (QMP ``set_link``): the guest sees carrier go."""
        qemu.qmp(self._running_guest(session, vm), "set_link", name=NIC_ID, up=up)

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
