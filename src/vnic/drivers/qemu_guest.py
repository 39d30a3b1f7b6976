"""The VM side of a QEMU guest: a guest whose virtio NIC sits on a tap in its session.

* plug makes the guest's run directory (it marks the VM as a guest from before
  its host side is built until after it is removed, see :meth:`QemuGuest.claims`),
  per vNIC a persistent, tagged tap (the vNIC's port, named from its unit) on
  its network's bridge, and starts QEMU in the session namespace with one
  virtio NIC per tap and the vNIC's MAC (it boots the image of
  ``scripts/vm/build-image.sh`` while the host side is built);
  :meth:`QemuGuest.wait_ready` returns once the guest's init reports its NICs
  up with their addresses;
* the profile's TCP settings and the egress offload switch go on the guest
  kernel's command line at launch, and through the QEMU guest agent on a live
  change (the guest has its own kernel: every available congestion control
  algorithm can be chosen by sysctl, no per-route trick needed);
* drift reads back, through QMP, the MAC each of the guest's NICs really filters on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import qemu
from vnic.drivers.planning import egress_per_packet
from vnic.drivers.vmside import VmSide
from vnic.errors import DataplaneError
from vnic.model.launch import LaunchRequest
from vnic.plan import names
from vnic.plan.guest import DEFAULT_CPUS, DEFAULT_MEMORY_MIB, GuestNic, GuestSpec, nic_id
from vnic.plan.model import Plan

#: The guest kernel's default congestion control (Debian's kernels build cubic in).
GUEST_DEFAULT_CONGESTION = "cubic"
#: Fields that live in the guest's kernel: per-VM there by construction.
_TCP_SYSCTL = {
    "congestion_control": "net.ipv4.tcp_congestion_control",
}


class QemuGuest(VmSide):
    kind = "qemu"

    def present(self, session: str, vm: str) -> bool:
        return qemu.guest_pid(session, vm, names.owner_tag(session, vm)) is not None

    def exists(self, session: str, vm: str) -> bool:
        return qemu.is_guest(session, vm)

    def thing(self, session: str, vm: str) -> str:
        return f"QEMU guest {qemu.run_files(session, vm).directory}"

    def plug(self, request: LaunchRequest, plans: Sequence[Plan]) -> None:
        """Run directory (marks the VM as a guest), a tagged tap per vNIC on its network's
        bridge, then QEMU: it boots while the rest of the host side is built."""
        spec = spec_for(request, plans)
        qemu.image()  # built (or found) before anything is made, so a failure leaves nothing
        qemu.run_files(request.session, request.vm).directory.mkdir(parents=True)
        session_ns = names.session_netns(request.session)
        for one, plan in zip(request.per_nic(), plans, strict=True):
            nsops.plug_tap(
                session_ns,
                request.session,
                one.unit,
                relay=plan.engine is not None,
                bridge=plan.devices.bridge,
            )
        qemu.start(session_ns, spec)

    def settings(self, request: LaunchRequest, plans: Sequence[Plan]) -> None:
        """Nothing at this point: the guest applies its settings from its command line."""

    def wait_ready(self, request: LaunchRequest) -> None:
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

    def set_offloads(self, request: LaunchRequest, *, on: bool) -> None:
        state = "on" if on else "off"
        self._guest_exec(request, ["ethtool", "-K", request.nic, "tso", state, "gso", state])

    def set_sysctl(self, request: LaunchRequest, key: str, value: str) -> None:
        self._guest_exec(request, ["sysctl", "-q", "-w", f"{key}={value}"])

    def set_congestion_control(self, request: LaunchRequest, algo: str | None) -> None:
        self.set_sysctl(
            request, _TCP_SYSCTL["congestion_control"], algo or GUEST_DEFAULT_CONGESTION
        )

    def remove(self, session: str, vm: str) -> None:
        """Stop QEMU (its tap is persistent: it goes with the other links). :func:`qemu.stop`
        finds the process by pid file and by tag, and does nothing when there is none."""
        qemu.stop(session, vm, names.owner_tag(session, vm))

    def forget(self, session: str, vm: str) -> None:
        """The run directory goes last: until then the VM counts as a guest, so the netns
        driver alongside never takes its leftovers for its own."""
        qemu.remove_run_dir(session, vm)

    def drift(self, request: LaunchRequest, plans: Sequence[Plan]) -> list[str]:
        """The MAC each of the guest's NICs filters on, read back through QMP (a NIC of a
        vNIC other than ``eth0`` named by it)."""
        run = qemu.run_files(request.session, request.vm)
        problems: list[str] = []
        for i, nic in enumerate(request.nics):
            try:
                filters = qemu.qmp(run, "query-rx-filter", name=nic_id(i))
            except DataplaneError as exc:
                return [*problems, f"QMP of guest {request.session}/{request.vm}: {exc}"]
            mac = str(filters[0].get("main-mac", "")) if filters else ""
            if mac != str(nic.mac):
                what = "guest NIC" if i == 0 else f"{nic.name}: guest NIC"
                problems.append(f"{what} MAC: expected {nic.mac}, found {mac or 'none'}")
        return problems

    def vms(self, only: str | None = None) -> dict[str, set[str]]:
        """Guests with a run directory or a QEMU process carrying their tag. (A guest's
        links and guards need no search of their own: its run directory is made before
        them and removed after them.)"""
        guests = qemu.guests()
        for owner in qemu.owned_processes(names.PREFIX + ":").values():
            session, _, vm = owner.removeprefix(names.PREFIX + ":").partition("/")
            if vm:
                guests.setdefault(session, set()).add(vm)
        return {s: vms for s, vms in guests.items() if only in (None, s)}

    def claims(self, only: str | None = None) -> dict[str, set[str]]:
        """Guests with a run directory."""
        return {s: vms for s, vms in qemu.guests().items() if only in (None, s)}

    def running(self, session: str) -> list[str]:
        return sorted(vm for vm in qemu.guests().get(session, set()) if self.present(session, vm))

    def every_vm(self) -> list[tuple[str, str]]:
        return [(s, vm) for s, guests in qemu.guests().items() for vm in guests]


def spec_for(request: LaunchRequest, plans: Sequence[Plan]) -> GuestSpec:
    """The guest's QEMU settings for ``request`` compiled to ``plans`` (one per vNIC; the
    TCP settings are the first's, per VM)."""
    plan = plans[0]
    more = tuple(
        GuestNic(
            name=one.nic,
            tap=p.devices.port,
            mac=str(one.mac),
            ipv4=str(one.ipv4),
            ipv6=str(one.ipv6),
            offload=not egress_per_packet(p),
        )
        for one, p in zip(request.per_nic()[1:], plans[1:], strict=True)
    )
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
        offload=not egress_per_packet(plan),
        accel=qemu.accelerator().name,
        memory_mib=int(os.environ.get("VNIC_QEMU_MEMORY") or DEFAULT_MEMORY_MIB),
        cpus=int(os.environ.get("VNIC_QEMU_CPUS") or DEFAULT_CPUS),
        more=more,
    )
