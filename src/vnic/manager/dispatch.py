"""How the manager reaches its agent: through the agent port
(:class:`~vnic.agent.port.AgentPort`), under its gate, which keeps a reconcile
from racing launches.

With this host's agent in process the gate *is* the agent's host lock (a
file lock, :mod:`vnic.agent.hostlock`): an embedded command on the same state
directory (``vnic vm launch`` without ``--server``) holds it shared from its
database read to its database write (:meth:`Service.launch_vm`), and a
reconcile holds it exclusive from its read of the database to the end of
the agent's pass, so it never sees a launch of another process half-done.
With a remote agent the gate covers this process's threads only (the agent
locks its own host). Which one it is, the agent says (:meth:`AgentPort.gate`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vnic.agent.port import AgentPort, DesiredVm, Gate, ReconcileReport, RepairEvent
from vnic.errors import Conflict, NotFound, Unsupported
from vnic.manager.auth import Tokens
from vnic.manager.results import VmChange, VmInfo
from vnic.manager.rows import audit_row
from vnic.manager.runtime import REASON_MAX, Runtime
from vnic.manager.service import Service
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT, ExecResult

if TYPE_CHECKING:
    from vnic.manager.live import LiveControl


@dataclass
class Manager:
    service: Service
    tokens: Tokens
    agent: AgentPort
    agent_name: str = "local"

    #: The agent's run and the last repair of it audited (:meth:`collect_repairs`).
    _repairs_seen: tuple[str, int] = field(default=("", 0), init=False, repr=False)

    @property
    def gate(self) -> Gate:
        """Many dispatches at once, or one reconcile alone (the agent's gate: a reconcile
        sends the agent the database's running VMs, and a launch between its agent call
        and its database write would look like an orphan to it)."""
        return self.agent.gate()

    def collect_repairs(self) -> int:
        """Audit the drift repairs the agent made since the last call; return how many.
        A manager that starts audits what the agent still keeps
        (:data:`vnic.agent.repair.KEPT`).

        For an agent whose repairs are not passed to :meth:`record_repair` as they
        happen: ``vnic serve`` polls a remote agent with it, and wires an in-process
        agent's repairer to :meth:`record_repair` instead (:mod:`vnic.server`).
        """
        run, seen = self._repairs_seen
        now, events = self.agent.repairs(seen)
        if now != run and seen:  # the agent restarted: its numbers started again
            now, events = self.agent.repairs(0)
        for event in events:
            self.record_repair(event)
        self._repairs_seen = (now, max([e.seq for e in events], default=seen if now == run else 0))
        return len(events)

    @functools.cached_property
    def runtime(self) -> Runtime:
        """Runtime adjustments, the audit log and controller settings."""
        return Runtime(self.service)

    @functools.cached_property
    def live(self) -> LiveControl:
        """The controller: rules, feedback and scenarios (started by ``vnic serve``)."""
        from vnic.manager.live import LiveControl

        return LiveControl(self)

    def reapply(self, **scope: Any) -> list[VmChange]:
        """:meth:`Service.reapply` through this manager's agent (``scope``: its keywords;
        it holds the gate itself, for the manager's own agent's VMs only)."""
        return self.service.reapply(self.agent, **scope)

    def reconcile(self) -> ReconcileReport:
        """Send the agent the VMs the database says run; it rebuilds, reaps and reports.

        The database is read under the gate, exclusive, and the agent's pass runs
        under it: a launch (of this process or, with a local agent, of any on the
        host) is either wholly before the read or wholly after the pass.
        """
        with self.gate.exclusive():
            desired = [DesiredVm(kind, request) for kind, request in self.service.desired()]
            return self.agent.sync(desired)

    # Access to a running VM and to the host (admins only, the API says: a command in
    # a VM reaches whatever the VM's network does).

    def running_vm(self, session: str, vm: str) -> VmInfo:
        """The VM's record; NotFound if it is not defined, Conflict if it does not run."""
        info = self.service.get_vm(session, vm)
        if info.state != "running":
            raise Conflict(f"VM {session}/{vm} is not running (it is {info.state}): launch it")
        if info.host is not None:
            # The manager has no control channel into a host: its agent dials out.
            raise Unsupported(
                f"VM {session}/{vm} runs on host {info.host}: commands and links reach only "
                "VMs of the manager's own agent (run them on that host)"
            )
        return info

    def exec_in_vm(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float = TIMEOUT_DEFAULT,
        max_output: int = OUTPUT_DEFAULT,
    ) -> ExecResult:
        """Run ``argv`` in a running VM through the agent, output captured, killed after
        ``timeout`` seconds (:meth:`AgentPort.exec`, which checks the bounds). No gate:
        a command may take minutes, and a reconcile must not wait for it."""
        self.running_vm(session, vm)
        return self.agent.exec(session, vm, argv, timeout=timeout, max_output=max_output)

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        """Set the link of a running QEMU guest's vNIC ``nic`` up or down
        (:meth:`AgentPort.set_link`); NotFound for a vNIC the VM does not have."""
        info = self.running_vm(session, vm)
        known = [n.name for n in info.nics]
        if nic not in known:
            raise NotFound(f"vNIC of VM {session}/{vm}", nic, known)
        self.agent.set_link(session, vm, up, nic)

    def doctor(self) -> dict[str, Any]:
        """The agent's host report (:meth:`AgentPort.doctor`)."""
        return self.agent.doctor()

    def record_repair(self, event: RepairEvent) -> None:
        """Write the agent's repair of a VM to the audit log (source ``agent``)."""
        outcome = "repaired" if event.ok else f"repair failed: {event.error}"
        reason = f"{outcome}; drift was: {'; '.join(event.differences)}"[:REASON_MAX]
        with self.service.db.transaction() as s:
            s.add(audit_row(self.service.clock(), event.session, event.vm, "agent", reason, {}))
        log.info("audit: %s/%s %s", event.session, event.vm, outcome)


log = logging.getLogger("vnic.manager")
