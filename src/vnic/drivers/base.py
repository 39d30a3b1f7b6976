"""The driver interface.

A driver is the hypervisor side: it turns a :class:`~vnic.model.launch.LaunchRequest`
into a running VM with a configured vNIC, and declares which profile fields it can
honour on this host (:class:`~vnic.model.launch.Capabilities`).

:class:`Driver` is the one base of every driver. Five methods are abstract (what
every driver must do); every other capability is a method with a default that
does what the agent does with a driver that lacks it: a launch in one step, a
live change by rebuilding the VM, drift and inventory that find nothing, no
command execution and no link control (refused as
:class:`~vnic.errors.Unsupported`). A driver overrides what it can do better.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from vnic.errors import Unsupported, VnicError
from vnic.model.command import ExecResult
from vnic.model.launch import Capabilities, LaunchRequest

VmKey = tuple[str, str]


class Driver(ABC):
    """Base of every driver: the required methods, and each optional one with its default."""

    #: The driver's kind, as requests and the registry name it (``netns``, ``qemu``...).
    kind: str

    # ------------------------------------------------------------------ required

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """The profile fields this driver honours on this host, and why the others not."""

    @abstractmethod
    def launch(self, request: LaunchRequest) -> None:
        """Configure the vNIC and start the VM; on failure leave nothing behind and raise."""

    @abstractmethod
    def destroy(self, session: str, vm: str) -> None:
        """Stop the VM and remove everything made for it (idempotent)."""

    @abstractmethod
    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        """Remove the session's network and every VM of it (idempotent)."""

    @abstractmethod
    def running(self, session: str) -> list[str]:
        """Names of the session's VMs that exist on this host."""

    # ------------------------------------------------------------------ launch in two steps

    def launch_begin(self, request: LaunchRequest) -> None:
        """The part of a launch that touches the session's shared objects; the agent runs
        it under the session's lock and :meth:`launch_finish` outside it, so launches in
        one session overlap. On failure nothing is left and the error is raised.

        Default: the whole :meth:`launch` (and :meth:`launch_finish` does nothing).
        """
        self.launch(request)

    def launch_finish(self, request: LaunchRequest) -> None:
        """The end of a launch begun by :meth:`launch_begin` (e.g. waiting for a guest to
        boot). On failure it raises and the caller destroys the VM. Default: nothing."""
        return  # a default, not an abstract method: most drivers need nothing here

    # ------------------------------------------------------------------ live change

    def reconfigure(self, previous: LaunchRequest, request: LaunchRequest) -> list[str]:
        """Make the VM running ``previous`` run ``request``; one line per change made.

        Default (a driver without live change): rebuild the VM, which interrupts
        its traffic and restarts it, and say so in the one line returned.
        """
        self.destroy(request.session, request.vm)
        self.launch(request)
        return [
            f"rebuilt {request.session}/{request.vm} (the {self.kind} driver has no live change)"
        ]

    def reconfigure_many(
        self, pairs: Sequence[tuple[LaunchRequest, LaunchRequest]]
    ) -> dict[VmKey, list[str] | VnicError]:
        """:meth:`reconfigure` of each ``(previous, request)``, by ``(session, vm)``; a VM's
        failure (a :class:`~vnic.errors.VnicError`) is its outcome, not the others'.

        Default: one :meth:`reconfigure` after the other.
        """
        out: dict[VmKey, list[str] | VnicError] = {}
        for previous, request in pairs:
            try:
                out[(request.session, request.vm)] = self.reconfigure(previous, request)
            except VnicError as exc:
                out[(request.session, request.vm)] = exc
        return out

    # ------------------------------------------------------------------ reading back

    def drift(self, request: LaunchRequest) -> list[str]:
        """How the host differs from what :meth:`launch` builds for ``request``, one sentence
        per difference (empty: none). Read-only. Default: nothing is read, none found."""
        return []

    def drift_many(self, requests: Sequence[LaunchRequest]) -> dict[VmKey, list[str]]:
        """:meth:`drift` of each request, by ``(session, vm)``. Default: one after the other."""
        return {(r.session, r.vm): self.drift(r) for r in requests}

    def inventory(self) -> dict[str, set[str]]:
        """Every session with this driver's objects on the host, mapped to the VMs that have
        any (what reconcile may remove). Read-only. Default: none known."""
        return {}

    # ------------------------------------------------------------------ access to a VM

    def exec(
        self, session: str, vm: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the VM to completion (``kwargs`` as for :func:`subprocess.run`).
        Default: refused, the driver cannot run commands in its VMs."""
        raise Unsupported(f"the {self.kind} driver cannot run commands in VM {session}/{vm}")

    def exec_captured(
        self, session: str, vm: str, argv: Sequence[str], *, timeout: float, max_output: int
    ) -> ExecResult:
        """Run ``argv`` in the VM, its output captured (at most ``max_output`` bytes kept of
        each stream), killed after ``timeout`` seconds; the arguments are checked already
        (:func:`vnic.model.command.check_exec`). Default: refused, as :meth:`exec`."""
        raise Unsupported(f"the {self.kind} driver cannot run commands in VM {session}/{vm}")

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        """Set the link of the VM's vNIC ``nic`` up or down (the VM sees its carrier go).
        Default: refused, the driver cannot."""
        raise Unsupported(f"the {self.kind} driver cannot set the link of VM {session}/{vm}")
