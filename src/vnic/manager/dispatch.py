"""How the manager reaches its agent: the agent interface, and the gate that keeps a
reconcile from racing launches.

With this host's agent in process the gate *is* the agent's host lock
(:class:`~vnic.agent.hostlock.HostLock`, a file lock): an embedded command
on the same state directory (``vnic vm launch`` without ``--server``) holds
it shared from its database read to its database write
(:meth:`Service.launch_vm`), and a reconcile holds it exclusive from its
read of the database to the end of the agent's pass, so it never sees a
launch of another process half-done. With a remote agent the gate covers
this process's threads only (the agent locks its own host).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vnic.agent.client import AgentClient
from vnic.agent.core import Agent
from vnic.agent.hostlock import HostLock
from vnic.agent.port import DesiredVm, ReconcileReport, RepairEvent
from vnic.drivers.base import DriverLike as Driver
from vnic.manager.auth import Tokens
from vnic.manager.results import VmChange
from vnic.manager.rows import audit_row
from vnic.manager.runtime import REASON_MAX, Runtime
from vnic.manager.service import Service

if TYPE_CHECKING:
    from vnic.manager.live import LiveControl


class AgentLike(Driver, Protocol):
    """What the manager needs of an agent (in-process :class:`~vnic.agent.core.Agent`
    or :class:`~vnic.agent.client.AgentClient`): the driver interface plus these."""

    def reconfigure(self, request: Any) -> list[str]: ...

    def reconfigure_many(self, requests: Sequence[Any]) -> dict[tuple[str, str], Any]: ...

    def all_capabilities(self) -> Sequence[Any]: ...

    def metrics_text(self) -> str: ...

    def stats(self, session: str) -> list[dict[str, Any]]: ...

    def sync(self, vms: Sequence[DesiredVm]) -> ReconcileReport: ...


class Gate(HostLock):
    """Many dispatches at once, or one reconcile alone (a readers-writer lock) among
    this process's threads.

    A reconcile sends the agent the database's running VMs; a launch between
    its agent call and its database write would look like an orphan to it.
    """

    def __init__(self) -> None:
        super().__init__(None)


@dataclass
class Manager:
    service: Service
    tokens: Tokens
    agent: AgentLike
    agent_name: str = "local"
    #: The agent's host lock when it is this host's, else this process's :class:`Gate`.
    gate: HostLock = field(default_factory=Gate)

    #: The remote agent's run and the last repair of it audited (:meth:`collect_repairs`).
    _repairs_seen: tuple[str, int] = field(default=("", 0), init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.agent, Agent):
            self.gate = self.agent.host

    def collect_repairs(self) -> int:
        """Audit the drift repairs a remote agent made since the last call; return how
        many (an in-process agent's are audited as they happen). A manager that
        starts audits what the agent still keeps (:data:`vnic.agent.repair.KEPT`)."""
        if not isinstance(self.agent, AgentClient):
            return 0
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
        """:meth:`Service.reapply` through this manager's agent (``scope``: its keywords)."""
        with self.gate.shared():
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

    def record_repair(self, event: RepairEvent) -> None:
        """Write the agent's repair of a VM to the audit log (source ``agent``)."""
        outcome = "repaired" if event.ok else f"repair failed: {event.error}"
        reason = f"{outcome}; drift was: {'; '.join(event.differences)}"[:REASON_MAX]
        with self.service.db.transaction() as s:
            s.add(audit_row(self.service.clock(), event.session, event.vm, "agent", reason, {}))
        log.info("audit: %s/%s %s", event.session, event.vm, outcome)


log = logging.getLogger("vnic.manager")
