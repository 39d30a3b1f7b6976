"""The driver interface.

A driver is the hypervisor side: it turns a :class:`~vnic.model.launch.LaunchRequest`
into a running VM with a configured vNIC, and declares which profile fields it can
honour on this host (:class:`~vnic.model.launch.Capabilities`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vnic.model.launch import Capabilities, LaunchRequest


class Driver(Protocol):
    """The narrow interface every driver implements."""

    @property
    def kind(self) -> str: ...

    def capabilities(self) -> Capabilities: ...

    def launch(self, request: LaunchRequest) -> None:
        """Configure the vNIC and start the VM; on failure leave nothing behind and raise."""

    def destroy(self, session: str, vm: str) -> None:
        """Stop the VM and remove everything made for it (idempotent)."""

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        """Remove the session's network and every VM of it (idempotent)."""

    def running(self, session: str) -> list[str]:
        """Names of the session's VMs that exist on this host."""
