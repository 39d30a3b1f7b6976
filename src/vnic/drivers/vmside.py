"""The VM side of a host-side driver: what a VM is, besides its link's host end.

A :class:`~vnic.drivers.hosted.HostedDriver` composes the shared host side
(:mod:`vnic.drivers.hostside`) with one :class:`VmSide`: a network namespace
(:class:`~vnic.drivers.netns_vm.NetnsVm`) or a QEMU guest on a tap
(:class:`~vnic.drivers.qemu_guest.QemuGuest`). The VM side makes the VM and
its port into the session's bridge, applies the settings that live in the VM
(TCP, egress offloads), reads them back, and finds its VMs on the host.

A method taking ``plans`` gets the whole VM's request and one plan per vNIC,
in the request's order (:func:`vnic.drivers.planning.plans_for`); one that
acts on one vNIC (:meth:`VmSide.set_offloads`) gets that vNIC's one-vNIC
request; the VM's TCP settings take the whole request (they are per VM,
from ``eth0``'s plan, on every vNIC's routes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from vnic.model.launch import LaunchRequest
from vnic.plan.model import Plan


class VmSide(ABC):
    """One kind of VM on a session's bridge."""

    #: The driver kind whose VMs these are.
    kind: str
    #: Whether this kind's driver takes host-side leftovers that no VM side claims (a
    #: killed launch's links, guards, engines) as its own, to remove them: exactly one
    #: kind does (netns), so nothing is left to nobody and nothing is removed twice.
    adopts_leftovers: bool = False

    @abstractmethod
    def present(self, session: str, vm: str) -> bool:
        """Whether the VM runs."""

    @abstractmethod
    def exists(self, session: str, vm: str) -> bool:
        """Whether anything of the VM itself exists, running or half-made by a killed launch."""

    @abstractmethod
    def thing(self, session: str, vm: str) -> str:
        """What the VM is, in messages (``namespace vnic.s.a``...)."""

    @abstractmethod
    def plug(self, request: LaunchRequest, plans: Sequence[Plan]) -> None:
        """Make the VM and one port per vNIC into its network's bridge (the host side's
        IFB or relay with each); its start may go on while the host side is built."""

    @abstractmethod
    def settings(self, request: LaunchRequest, plans: Sequence[Plan]) -> None:
        """The plans' settings inside the VM, at launch (TCP from the first, egress
        offloads per vNIC)."""

    @abstractmethod
    def wait_ready(self, request: LaunchRequest) -> None:
        """Wait until the VM that :meth:`plug` started is ready; raise if it cannot be."""

    @abstractmethod
    def set_offloads(self, request: LaunchRequest, *, on: bool) -> None:
        """TSO/GSO of the VM's own interface of the one-vNIC ``request`` (VM egress is
        segmented there)."""

    @abstractmethod
    def set_sysctl(self, request: LaunchRequest, key: str, value: str) -> None:
        """One sysctl in the VM, on a live change."""

    @abstractmethod
    def set_congestion_control(self, request: LaunchRequest, algo: str | None) -> None:
        """The VM's TCP congestion control on a live change (None: the default)."""

    @abstractmethod
    def remove(self, session: str, vm: str) -> None:
        """Stop the VM itself and remove what it is made of (idempotent). Its port may go
        with it; the host side's remaining links are removed after."""

    def forget(self, session: str, vm: str) -> None:
        """The last step of a destroy, after the host side is gone: drop what marks the VM
        as this kind's (see :meth:`claims`). Default: nothing."""
        return  # a default, not an abstract method: most drivers need nothing here

    @abstractmethod
    def drift(self, request: LaunchRequest, plans: Sequence[Plan]) -> list[str]:
        """How the running VM itself differs from the request (empty: not at all); a
        difference of a vNIC other than ``eth0`` names it."""

    @abstractmethod
    def vms(self, only: str | None = None) -> dict[str, set[str]]:
        """This kind's VMs with anything of the VM itself on the host, by session (of
        session ``only``, or all)."""

    def claims(self, only: str | None = None) -> dict[str, set[str]]:
        """VMs marked as this kind's from before their host side is built until after it is
        removed, by session: other kinds leave their host-side objects alone, and the
        session's network stays while any is left. Default: none."""
        return {}

    @abstractmethod
    def running(self, session: str) -> list[str]:
        """Names of the session's VMs of this kind that run."""

    @abstractmethod
    def every_vm(self) -> list[tuple[str, str]]:
        """``(session, vm)`` of every VM of this kind on the host (for host-wide reports)."""
