"""The netns driver: a VM is a network namespace on its session's bridge.

The driver is the shared host side (:mod:`vnic.drivers.hostside`: session
namespace, bridge, the port's IFB or engine relay, shaping, guard, delay
engine) composed with the netns VM side (:mod:`vnic.drivers.netns_vm`: the
VM's namespace, its init, ``eth0`` and addresses, TCP settings), by
:class:`~vnic.drivers.hosted.HostedDriver`, which also holds launch, destroy,
inventory, drift (:mod:`vnic.dataplane.drift`) and live change
(:mod:`vnic.drivers.live`). What this class adds is running commands in a VM, with
the caller's terminal or captured.

``capabilities_from_probe`` and ``choose_engine`` live in
:mod:`vnic.drivers.planning` and are importable from here too.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from vnic.dataplane.probe import Probe
from vnic.drivers.hosted import HostedDriver
from vnic.drivers.netns_vm import NetnsVm
from vnic.drivers.planning import EngineChoice, capabilities_from_probe, choose_engine
from vnic.model.command import ExecResult

__all__ = ["EngineChoice", "NetnsDriver", "capabilities_from_probe", "choose_engine"]


class NetnsDriver(HostedDriver):
    kind = "netns"

    def __init__(self, probe: Probe | None = None) -> None:
        self._vm = NetnsVm()
        super().__init__(self._vm, probe)

    def exec(
        self, session: str, vm: str, argv: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the VM (its network, PID, mount and UTS namespaces), to completion;
        ``kwargs`` as for :func:`subprocess.run`. :class:`Conflict` if the VM does not run."""
        return self._vm.exec(session, vm, argv, **kwargs)

    def exec_captured(
        self, session: str, vm: str, argv: Sequence[str], *, timeout: float, max_output: int
    ) -> ExecResult:
        """Run ``argv`` in the VM as :meth:`exec` does, without a terminal, its output
        captured; killed with what it started in its process group at ``timeout``."""
        return self._vm.exec_captured(session, vm, argv, timeout=timeout, max_output=max_output)
